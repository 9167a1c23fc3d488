"""Damped fixed-point (Picard) iteration: ``z <- tau F(z) + (1 - tau) z``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from implicit_core import Solver
from implicit_core.plugin import check_range


@dataclass(eq=False)
class FixedPointIteration(Solver):
    """Damped fixed-point iteration. Converges for contractive ``F`` (rate ``||J||`` at ``tau=1``).

    Args:
        tau: damping in ``(0, 1]``; ``tau < 1`` stabilises maps with eigenvalues near -1.
    """

    name = "fixed_point"

    tau: float = 1.0

    def __post_init__(self) -> None:
        self.tau = check_range("fixed_point", "tau", self.tau, 0.0, 1.0, low_open=True)

    def init(self, problem, z0) -> dict[str, Any]:
        return {"z": z0, "fz": problem.F(z0)}

    def step(self, problem, state, k, active) -> dict[str, Any]:
        z = state["fz"] if self.tau == 1.0 else self.tau * state["fz"] + (1.0 - self.tau) * state["z"]
        return {"z": z, "fz": problem.F(z)}
