"""Phantom gradients: a few damped Neumann steps (Geng et al., 2021)."""

from __future__ import annotations

from typing import Any

from implicit_core import GradientEstimator
from implicit_core.plugin import check_positive_int, check_range


class Phantom(GradientEstimator):
    """The phantom gradient of Geng et al. (2021): ``u = lam Σ_{t<k} (lam Jᵀ + (1 - lam) I)ᵗ g``.

    It is the exact gradient of ``k`` damped fixed-point steps ``z <- lam F(z) + (1 - lam) z``
    unrolled from ``z*``, and is computed as ``k`` steps of ``u <- lam (g + Jᵀ u) + (1 - lam) u``
    from ``u = 0`` (``k - 1`` VJPs: the first step needs none). ``k`` and ``lam`` are TorchDEQ's
    ``grad=k`` and ``tau=lam``: ``k = 1, lam = 1`` is JFB; with ``lam = 1`` it is the ``k``-term
    Neumann sum ``Σ_{t<k} (Jᵀ)ᵗ g``, which tends to the exact ``u`` as ``k`` grows
    (contractive ``F``).

    Args:
        k: number of unrolled steps (>= 1). lam: damping in ``(0, 1]``.
    """

    name = "phantom"

    def __init__(self, k: int = 5, lam: float = 0.8):
        self.k = check_positive_int("phantom", "k", k, minimum=1)
        self.lam = check_range("phantom", "lam", lam, 0.0, 1.0, low_open=True)

    @property
    def uses_jacobian(self) -> bool:
        return self.k > 1

    def estimate(self, ctx) -> Any:
        g = self.lam * ctx.g
        u = g  # the first step from u = 0
        for _ in range(self.k - 1):
            u = g + self.lam * ctx.JT(u) + (1.0 - self.lam) * u
        return u
