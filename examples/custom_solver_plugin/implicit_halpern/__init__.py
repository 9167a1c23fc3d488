"""Halpern's anchored iteration, registered as the ``halpern`` solver.

    z_{k+1} = β_k z_0 + (1 - β_k) F(z_k),    β_k = 1 / (k + 2)

Pulling every iterate back towards the anchor ``z_0`` makes the iteration converge for maps
that are only nonexpansive (``||F(a) - F(b)|| <= ||a - b||``), where plain fixed-point
iteration can cycle forever; the residual falls as O(1/k), the best possible rate for that
class (Halpern, 1967; Lieder, 2021).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import implicit_core


@dataclass(eq=False)
class Halpern(implicit_core.Solver):
    """Anchored fixed-point iteration; ``anchor_decay`` scales ``β_k = anchor_decay / (k + 2)``."""

    name = "halpern"

    anchor_decay: float = 1.0  # the solver's options are its dataclass fields

    def __post_init__(self) -> None:
        if not 0.0 < self.anchor_decay <= 1.0:
            raise implicit_core.ConfigurationError(f"halpern: anchor_decay must be in (0, 1], got {self.anchor_decay!r}")

    def init(self, problem: implicit_core.Problem, z0: Any) -> dict[str, Any]:
        return {"z": z0, "fz": problem.F(z0), "anchor": z0}

    def step(self, problem: implicit_core.Problem, state: dict[str, Any], k: Any, active: Any) -> dict[str, Any]:
        beta = self.anchor_decay / (problem.xp.astype(k, state["z"].dtype) + 2)  # k: a 0-d int array
        z = beta * state["anchor"] + (1 - beta) * state["fz"]
        return {"z": z, "fz": problem.F(z), "anchor": state["anchor"]}


@implicit_core.hookimpl
def implicit_core_solvers(register):
    register(Halpern)
