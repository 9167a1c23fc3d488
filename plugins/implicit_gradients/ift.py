"""Implicit differentiation: solve the adjoint system exactly (Bai, Kolter & Koltun, 2019)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from implicit_core import GradientEstimator, get_solver
from implicit_core.plugin import check_choice, check_positive_int, check_range

from ._solver_option import resolve_solver


@dataclass(eq=False)
class IFT(GradientEstimator):
    """Exact implicit gradient: ``u`` solves ``u = g + J^T u``, i.e. ``(I - J^T) u = g``.

    The adjoint system is itself a fixed-point problem, solved by any registered solver
    (one VJP per iteration), warm-started at ``u0 = g``. Its convergence is reported in
    ``info.backward`` and handled by ``on_fail`` like the forward solve.

    Args:
        solver: backward solver name or instance; by default Anderson for fixed points and
            Broyden for root problems (whose ``J`` need not be contractive).
        tol, max_iter: backward stopping rule; ``None`` uses the forward's.
        stop_mode: ``"rel"`` (default): ``tol`` is relative to ``||u||``, so the gradient's
            accuracy does not depend on the scale of the loss; ``"abs"``: absolute.
    """

    name = "ift"

    solver: Any = None
    tol: float | None = None
    max_iter: int | None = None
    stop_mode: str = "rel"
    _solver: Any = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self._solver = None if self.solver is None else resolve_solver("ift", self.solver)
        if self.tol is not None:
            self.tol = check_range("ift", "tol", self.tol, 0.0, float("inf"), low_open=True)
        if self.max_iter is not None:
            self.max_iter = check_positive_int("ift", "max_iter", self.max_iter)
        self.stop_mode = check_choice("ift", "stop_mode", self.stop_mode, ("abs", "rel"))

    def estimate(self, ctx) -> Any:
        solver = self._solver or get_solver("broyden" if ctx.problem.form == "root" else "anderson")
        return ctx.solve_adjoint(solver, ctx.g, tol=self.tol, max_iter=self.max_iter, stop_mode=self.stop_mode)
