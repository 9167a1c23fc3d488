"""Phantom gradients: a few damped Neumann steps (Geng et al., 2021)."""

from __future__ import annotations

from typing import Any

from implicit_core import GradientEstimator
from implicit_core._plugin_base import check_positive_int, check_range


class Phantom(GradientEstimator):
    """``k`` damped steps on the adjoint system from ``u0 = g``:
    ``u <- lam (g + J^T u) + (1 - lam) u``.

    ``k`` VJPs. ``k = 0`` is JFB; as ``k`` grows (contractive ``F``) it tends to the exact
    ``u``; with ``lam = 1`` it is the ``k+1``-term Neumann sum ``sum_{i<=k} (J^T)^i g``.

    Args:
        k: number of steps (>= 0). lam: damping in ``(0, 1]``.
    """

    name = "phantom"

    def __init__(self, k: int = 5, lam: float = 0.8):
        self.k = check_positive_int("phantom", "k", k, minimum=0)
        self.lam = check_range("phantom", "lam", lam, 0.0, 1.0, low_open=True)

    def estimate(self, ctx) -> Any:
        g, u = ctx.g, ctx.g
        for _ in range(self.k):
            u = self.lam * (g + ctx.JT(u)) + (1.0 - self.lam) * u
        return u
