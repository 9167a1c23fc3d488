"""Shared by the backends without autodiff (NumPy, CuPy): VJPs come from the user.

The user passes ``vjp(z, args, v) -> (v_z, v_args)`` for their function; the solution is
returned as a plain array and ``info.vjp(g)`` gives ``dL/dargs`` by the chosen estimator.
"""

from __future__ import annotations

from typing import Any, Callable

from ._backend import Backend
from ._errors import ConfigurationError, ShapeError
from ._problem import ROOT, Problem


class ExplicitVJPBackend(Backend):
    """A backend whose VJPs are given explicitly by the user's ``vjp=`` function."""

    explicit_vjp = True

    def _call_vjp(self, problem: Problem, z_tree: Any, v_flat: Any) -> tuple[Any, Any]:
        if problem.user_vjp is None:
            raise ConfigurationError(
                f"the {self.name!r} backend has no automatic differentiation: pass "
                "vjp=f_vjp to fixed_point/root, with f_vjp(z, args, v) -> (v_z, v_args) "
                "the vector-Jacobian products of your function with respect to z and args"
            )
        out = problem.user_vjp(z_tree, problem.args, problem.unflatten(v_flat))
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ShapeError("the vjp function must return a pair (v_z, v_args)")
        return out

    def linearise(self, problem: Problem, z: Any) -> Callable[[Any], Any]:
        z_tree = problem.unflatten(z)

        def JT(v: Any) -> Any:
            v_z, _ = self._call_vjp(problem, z_tree, v)
            problem.check_output(v_z, what="vjp(z, args, v)[0]")
            flat = problem.flatten(v_z)
            return v - flat if problem.form == ROOT else flat  # J_F = I - ∂g/∂z

        return JT

    def attach(
        self, problem: Problem, z_star: Any, backward: Callable[..., Any], with_jacobian: bool = True
    ) -> tuple[Any, Any]:
        z_tree = problem.unflatten(z_star)

        def vjp(g: Any) -> Any:
            """``dL/dargs`` for the cotangent ``g = dL/dz*`` (same structure as ``z*``)."""
            problem.check_output(g, what="the cotangent g passed to info.vjp",
                                 advice="pass dL/dz*, shaped like z* (np.ones_like(z) for L = sum(z*))")
            u = backward(problem.flatten(g))
            # dL/dargs = uᵀ ∂F/∂args; for root problems F = z - g, so it is (-u)ᵀ ∂g/∂args
            return self._call_vjp(problem, z_tree, -u if problem.form == ROOT else u)[1]

        return z_tree, vjp
