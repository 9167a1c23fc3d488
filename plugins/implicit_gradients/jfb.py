"""Jacobian-free backpropagation (Fung et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from implicit_core import GradientEstimator


@dataclass(eq=False)
class JFB(GradientEstimator):
    """``u = g``: the Neumann series ``sum_k (J^T)^k g`` cut after its first term.

    Costs nothing beyond the final VJP. For contractive ``F`` it is a descent direction of
    the loss (Fung et al., 2022), not the exact gradient.
    """

    name = "jfb"

    @property
    def uses_jacobian(self) -> bool:
        return False

    def estimate(self, ctx) -> Any:
        return ctx.g
