"""What a gradient estimator sees in the backward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ._errors import ConfigurationError
from ._info import SolveInfo
from ._linear import InverseJacobian
from ._loop import SolveResult, solve
from ._plugin_base import Solver
from ._problem import Problem


@dataclass
class BackwardContext:
    """The backward pass of one solve: ``z*``, the cotangent ``g`` and the forward's state.

    Estimators use :attr:`xp`, :meth:`JT` (one VJP ``J^T v`` at ``z*`` per call, with
    ``J = dF/dz``), :meth:`inverse` (the forward solver's inverse-Jacobian estimate) and
    :meth:`solve_adjoint` (solve ``u = g + J^T u`` with any registered solver).
    """

    problem: Problem
    z_star: Any
    g: Any
    forward: SolveResult
    tol: float
    max_iter: int
    stop_mode: str
    on_fail: str
    extras: dict[str, Any] = field(default_factory=dict)
    backward_info: SolveInfo | None = None
    _lin: Callable[[Any], Any] | None = field(default=None, repr=False)
    #: Set by a backend when this backward pass is itself differentiated (torch's
    #: ``create_graph=True``): ``JT(v)`` with a graph, and ``adjoint(u, g)`` giving the adjoint
    #: solution ``u`` the derivative of ``(I - Jᵀ)⁻¹ g``.
    differentiable: Any = field(default=None, repr=False)

    @property
    def xp(self) -> Any:
        return self.problem.xp

    def JT(self, v: Any) -> Any:
        """``J^T v`` at ``z*``; the linearisation is built once and reused."""
        if self.differentiable is not None:
            return self.differentiable.JT(v)
        return self._plain_JT(v)

    def _plain_JT(self, v: Any) -> Any:
        if self._lin is None:
            self._lin = self.problem.backend.linearise(self.problem, self.z_star)
        return self._lin(v)

    def inverse(self) -> InverseJacobian:
        if self.differentiable is not None:
            raise ConfigurationError(
                "a backward pass that is itself differentiated (create_graph=True, second derivatives) "
                "cannot go through an estimator that reuses the forward's inverse estimate (shine, "
                "broyden_reuse): that estimate is a by-product of the iterations, with no derivative. "
                "Use gradient='ift' (exact), 'jfb' or 'phantom' when you need second derivatives."
            )
        solver = self.forward.solver
        if not solver.provides_inverse:
            raise ConfigurationError(f"solver {solver.name!r} keeps no inverse-Jacobian estimate")
        if self.forward.inverse is not None:  # taken out of the state after the forward
            return self.forward.inverse
        return solver.inverse_jacobian(self.problem, self.forward.state)

    def solve_adjoint(
        self,
        solver: Solver,
        u0: Any,
        *,
        tol: float | None = None,
        max_iter: int | None = None,
        on_fail: str | None = None,
        stop_mode: str = "rel",
        return_state: bool = False,
    ) -> Any:
        """Solve ``u = g + J^T u`` from ``u0``; the outcome is reported in ``info.backward``.

        With ``return_state=True`` the result is ``(u, state)``, the solver's final state
        beside the solution (e.g. to take one more quasi-Newton step without evaluating it).

        The default ``stop_mode="rel"`` stops a sample when ``||g + Jᵀu - u|| <= tol ·
        ||g + Jᵀu||``: ``u`` is linear in ``g``, so the gradient's accuracy must not depend on
        how the loss is scaled (a mean over a batch of 256 makes every sample's ``g`` 256×
        smaller, and an absolute ``tol`` would then stop the adjoint solve almost at once).
        """
        g = self.g
        backend = self.problem.backend
        if self.differentiable is not None:
            if return_state:
                raise ConfigurationError(
                    "solve_adjoint(return_state=True) is not available in a backward pass that is itself "
                    "differentiated (create_graph=True): the solver's state has no derivative"
                )
            # The value by the ordinary solve (no graph through the iterations); its derivative
            # is attached afterwards, by the implicit function theorem again.
            with backend.forward_context():
                u = self._solve_adjoint_value(backend.stop_gradient(g), solver, u0, tol, max_iter, on_fail, stop_mode).z
            return self.differentiable.adjoint(u, g)
        result = self._solve_adjoint_value(g, solver, u0, tol, max_iter, on_fail, stop_mode)
        return (result.z, result.state) if return_state else result.z

    def _solve_adjoint_value(self, g, solver, u0, tol, max_iter, on_fail, stop_mode) -> SolveResult:
        result = _solve_linear(
            self.problem, g, self._plain_JT, solver, self.problem.backend.stop_gradient(u0),
            tol=self.tol if tol is None else tol, max_iter=self.max_iter if max_iter is None else max_iter,
            stop_mode=stop_mode,
        )
        self.backward_info = result.info  # before the report: info.backward says what failed
        self.problem.backend.report(result.info, self.on_fail if on_fail is None else on_fail, stage="backward")
        return result


def solve_tangent(
    problem: Problem, jvp: Callable[[Any], Any], b: Any, solver: Solver, *, tol: float, max_iter: int, on_fail: str
) -> Any:
    """Solve ``(I - J) v = b``, i.e. ``v = b + J v``, for forward-mode derivatives of ``z*``.

    ``jvp(v) = J v`` with ``J = dF/dz`` at ``z*``; ``b = dF/dargs · dargs``. The tangent
    ``v = dz*`` is linear in ``b``, so it stops on the relative residual, like the adjoint solve.
    """
    result = _solve_linear(problem, b, jvp, solver, b, tol=tol, max_iter=max_iter, stop_mode="rel")
    problem.backend.report(result.info, on_fail, stage="tangent")
    return result.z


def _solve_linear(
    problem: Problem, b: Any, apply: Callable[[Any], Any], solver: Solver, x0: Any, *,
    tol: float, max_iter: int, stop_mode: str,
) -> SolveResult:
    """The fixed point of ``x -> b + apply(x)``: the adjoint and tangent systems."""
    linear = Problem.on_flat(problem.backend, b, lambda x: b + apply(x))
    # No re-measurement: the forward's already caught samples that depend on each other.
    return solve(linear, solver, x0, tol=tol, max_iter=max_iter, stop_mode=stop_mode, divergence=1e6, verify=False)
