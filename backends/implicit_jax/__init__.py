"""The JAX backend: the solve loop as ``lax.while_loop``, the backward as a ``jax.custom_vjp``.

The whole forward solve runs inside the primal rule of a ``custom_vjp`` function, so that
``jax.grad`` never differentiates the loop; the rule's residuals are ``z*``, the parameters
and, for SHINE / Broyden reuse, the forward solver's state. The user's function is
closure-converted first (``jax.closure_convert``): values it captures from an enclosing trace
(an Equinox model's weights, a ``jit`` argument) become explicit inputs of the rule and receive
their gradients like ``args`` do. Everything composes with ``jit``, ``vmap`` and ``grad``.

Non-convergence under ``jit``: the ``info`` arrays are returned as usual; ``on_fail="warn"``
warns from a host callback (``jax.debug.callback``) when the program runs, and
``on_fail="raise"`` raises from it, which JAX surfaces as a ``JaxRuntimeError`` whose message
holds the ``ConvergenceError`` text. Called outside any trace, the checks run directly and
raise ``ConvergenceError`` itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from implicit_core import Backend, SolveInfo, hookimpl
from implicit_core._loop import SolveResult

#: SolveInfo fields returned by the custom-VJP rule as arrays.
_INFO_FIELDS = ("steps", "residual", "rel_residual", "converged", "status")


class JaxBackend(Backend):
    name = "jax"
    traced = True

    def available(self) -> tuple[bool, str]:
        try:
            import jax  # noqa: F401
        except Exception as exc:
            return False, f"jax is not importable ({type(exc).__name__}: {exc}); pip install 'implicit-core[jax]'"
        return True, ""

    def owns(self, x: Any) -> bool:
        import sys

        if "jax" not in sys.modules:  # never import JAX just to look at an array
            return False
        import jax

        return isinstance(x, jax.Array)

    def namespace(self) -> Any:
        import jax.numpy as jnp

        return jnp

    # ----------------------------------------------------------------- arrays
    def device(self, x: Any) -> Any:
        return None  # placement (and sharding) is JAX's business: arrays follow their inputs

    def stop_gradient(self, x: Any) -> Any:
        import jax

        return jax.lax.stop_gradient(x)

    def at_set(self, buffer: Any, index: Any, value: Any) -> Any:
        return buffer.at[index].set(value)

    def is_concrete(self, x: Any) -> bool:
        import jax

        return not isinstance(x, jax.core.Tracer)

    def to_python(self, x: Any) -> Any:
        import numpy as np

        return np.asarray(x).tolist()

    def random_normal(self, like: Any, seed: int) -> Any:
        import jax

        return jax.random.normal(jax.random.key(seed), like.shape, like.dtype)

    # ----------------------------------------------------------------- trees and control flow
    def tree_flatten(self, tree: Any) -> tuple[list[Any], Any]:
        import jax

        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return leaves, treedef

    def tree_unflatten(self, treedef: Any, leaves: list[Any]) -> Any:
        import jax

        return jax.tree_util.tree_unflatten(treedef, leaves)

    def cond(self, pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
        import jax

        return jax.lax.cond(pred, true_fn, false_fn)

    def while_loop(self, cond: Callable[[Any], Any], body: Callable[[Any], Any], carry: Any) -> Any:
        import jax

        return jax.lax.while_loop(cond, body, carry)

    # ----------------------------------------------------------------- autodiff
    def linearise(self, problem: Any, z: Any) -> Callable[[Any], Any]:
        import jax

        _, vjp = jax.vjp(problem.F, z)
        return lambda v: vjp(v)[0]

    def solve_implicit(self, problem, z0, forward, make_backward, with_jacobian=True):
        import jax

        fn_conv, consts = jax.closure_convert(problem.fn, problem.unflatten(z0), problem.args)
        solver: list[Any] = []  # the solver object, static: recorded while tracing the primal

        def bind(args: Any, consts: Any) -> Any:
            return dataclasses.replace(problem, fn=lambda z, a: fn_conv(z, a, *consts), args=args, _checked=True)

        def primal(z0: Any, args: Any, consts: Any) -> tuple[tuple[Any, Any], Any]:
            result = forward(bind(args, consts), z0)
            solver[:] = [result.solver]
            info = tuple(getattr(result.info, f) for f in _INFO_FIELDS) + (result.info.trace,)
            return (result.z, info), result

        @jax.custom_vjp
        def implicit(z0: Any, args: Any, consts: Any) -> tuple[Any, Any]:
            return primal(z0, args, consts)[0]

        def implicit_fwd(z0, args, consts):
            out, result = primal(z0, args, consts)
            return out, (result.z, result.state, args, consts, z0)

        def implicit_bwd(residuals, cotangents):
            z_star, state, args, consts, z0 = residuals
            p = bind(args, consts)
            lin = None
            if with_jacobian:
                _, vjp_z = jax.vjp(p.F, z_star)
                lin = lambda v: vjp_z(v)[0]  # noqa: E731
            forward_result = SolveResult(z=z_star, info=None, state=state, solver=solver[0])
            # info=None: a report from inside this trace could not leave it; the backward
            # solve's failures are reported through Backend.report's host callback instead.
            u = make_backward(p, forward_result, None)(cotangents[0], lin)
            _, vjp_params = jax.vjp(lambda a, c: bind(a, c).F(z_star), args, consts)
            d_args, d_consts = vjp_params(u)
            return jax.numpy.zeros_like(z0), d_args, d_consts

        implicit.defvjp(implicit_fwd, implicit_bwd)
        z_flat, arrays = implicit(z0, problem.args, consts)
        fields = dict(zip(_INFO_FIELDS, arrays[:-1]))
        info = SolveInfo(**fields, trace=arrays[-1], solver=solver[0].name, to_python=self.to_python)
        return problem.unflatten(z_flat), info

    def report(self, info: Any, on_fail: str, stage: str = "forward") -> None:
        from implicit_core._info import report

        if on_fail == "ignore":
            return
        arrays = tuple(getattr(info, f) for f in _INFO_FIELDS)
        if all(self.is_concrete(a) for a in arrays):
            report(info, on_fail, stage)
            return
        import jax

        solver = info.solver

        def on_host(*values: Any) -> None:
            host = SolveInfo(**dict(zip(_INFO_FIELDS, values)), solver=solver, to_python=self.to_python)
            report(host, on_fail, stage)

        jax.debug.callback(on_host, *arrays)


@hookimpl
def implicit_core_backends(register):
    register(JaxBackend)
