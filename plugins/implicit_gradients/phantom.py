"""Phantom gradients: a few damped Neumann steps (Geng et al., 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from implicit_core import GradientEstimator
from implicit_core.plugin import check_positive_int, check_range


@dataclass(eq=False)
class Phantom(GradientEstimator):
    """The phantom gradient of Geng et al. (2021): ``u = λ Σ_{t<k} (λ Jᵀ + (1 - λ) I)ᵗ g``, ``λ = damping``.

    It is the exact gradient of ``k`` damped fixed-point steps ``z <- λ F(z) + (1 - λ) z``
    unrolled from ``z*``, and is computed as ``k`` steps of ``u <- λ (g + Jᵀ u) + (1 - λ) u``
    from ``u = 0`` (``k - 1`` VJPs: the first step needs none). ``k`` and ``damping`` are
    TorchDEQ's ``grad=k`` and ``tau=damping``: ``k = 1, damping = 1`` is JFB; with
    ``damping = 1`` it is the ``k``-term Neumann sum ``Σ_{t<k} (Jᵀ)ᵗ g``, which tends to the
    exact ``u`` as ``k`` grows (contractive ``F``).

    Args:
        k: number of unrolled steps (>= 1). damping: ``λ`` in ``(0, 1]`` (formerly ``lam``,
            which Anderson also uses for its regularisation).
    """

    name = "phantom"
    deprecated_options = {"lam": "damping"}

    k: int = 5
    damping: float = 0.8

    def __post_init__(self) -> None:
        self.k = check_positive_int("phantom", "k", self.k, minimum=1)
        self.damping = check_range("phantom", "damping", self.damping, 0.0, 1.0, low_open=True)

    @property
    def uses_jacobian(self) -> bool:
        return self.k > 1

    def estimate(self, ctx) -> Any:
        lam = self.damping
        g = lam * ctx.g
        u = g  # the first step from u = 0
        for _ in range(self.k - 1):
            u = g + lam * ctx.JT(u) + (1.0 - lam) * u
        return u
