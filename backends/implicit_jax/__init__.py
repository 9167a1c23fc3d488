"""The JAX backend: the solve loop as ``lax.while_loop``, the backward as a ``jax.custom_vjp``.

The whole forward solve runs inside the primal rule of a ``custom_vjp`` function, so that
``jax.grad`` never differentiates the loop; the rule's residuals are ``z*``, the parameters
and, for SHINE / Broyden reuse, the forward solver's state. The user's function is
closure-converted first (``jax.closure_convert``): values it captures from an enclosing trace
(an Equinox model's weights, a ``jit`` argument) become explicit inputs of the rule and receive
their gradients like ``args`` do. Everything composes with ``jit``, ``vmap`` and ``grad``.

Under ``jax.grad`` the gradients flow as usual; ``info.vjp(g)`` also gives ``dL/dargs``
directly, as on NumPy (it runs the solve again inside ``jax.vjp``).

Non-convergence under ``jit``: the ``info`` arrays are returned as usual; ``on_fail="warn"``
warns from a host callback (``jax.debug.callback``) when the program runs, and
``on_fail="raise"`` raises from it, which JAX surfaces as a ``JaxRuntimeError`` whose message
holds the ``ConvergenceError`` text. Called outside any trace, the checks run directly and
raise ``ConvergenceError`` itself.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from implicit_core import Backend, ImplicitError, SolveInfo, hookimpl
from implicit_core._loop import SolveResult

def exact_ift() -> Any:
    from implicit_core import get_gradient

    return get_gradient("ift")


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

    def accepts(self, x: Any) -> bool:
        import numpy as np

        return isinstance(x, np.ndarray)  # jax.numpy consumes NumPy arrays as constants

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

    def all_finite(self, x: Any) -> bool | None:
        import numpy as np

        if not self.is_concrete(x):
            return None
        # On the host: inside a trace even an operation on a concrete array is staged.
        return bool(np.all(np.isfinite(np.asarray(x))))

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

        _register_solve_info()
        # One checked call first: the user's errors and wrong outputs become typed errors
        # before anything is traced for the loop.
        problem.call_user(problem.unflatten(z0))
        try:  # traces the user's function once more: its errors are the user's, typed as such
            fn_conv, consts = jax.closure_convert(problem.fn, problem.unflatten(z0), problem.args)
        except ImplicitError:
            raise
        except Exception as exc:
            raise problem.user_error(exc) from exc
        solver: list[Any] = []  # the solver object, static: recorded while tracing the primal
        info_box: list[Any] = []  # the SolveInfo, once built: eager backward passes report into it

        def bind(args: Any, consts: Any) -> Any:
            return dataclasses.replace(problem, fn=lambda z, a: fn_conv(z, a, *consts), args=args, _checked=True)

        def primal(z0: Any, args: Any, consts: Any) -> tuple[tuple[Any, Any], Any]:
            # The loop never sees a tangent (reverse mode cannot cross lax.while_loop): when
            # this rule is itself differentiated (grad of grad), z* gets its derivative from
            # ``reattach`` below instead.
            z0, args, consts = jax.lax.stop_gradient((z0, args, consts))
            result = forward(bind(args, consts), z0)
            solver[:] = [result.solver]
            return (result.z, result.info), result  # SolveInfo is a registered pytree

        @jax.custom_vjp
        def implicit(z0: Any, args: Any, consts: Any) -> tuple[Any, Any]:
            return primal(z0, args, consts)[0]

        def implicit_fwd(z0, args, consts):
            (z, info), result = primal(z0, args, consts)
            # Identity in value; when this rule is differentiated (grad of grad), the output
            # depends on args through the implicit function theorem, not through the loop.
            z = reattach(z, result.state, args, consts)
            return (z, info), (result.z, result.state, args, consts, z0)

        def backward_rule(z_star, state, args, consts, g, estimator=None):
            """``dL/d(args, consts)`` for ``g = dL/dz*``."""
            # Differentiating this rule again (grad of grad) needs dz*/dargs: ``reattach``
            # gives z* that derivative by exact IFT, without solving the forward again.
            z = reattach(jax.lax.stop_gradient(z_star), state, args, consts)
            p = bind(args, consts)
            lin = None
            if with_jacobian or estimator is not None:
                _, vjp_z = jax.vjp(p.F, z)
                lin = lambda v: vjp_z(v)[0]  # noqa: E731
            forward_result = SolveResult(z=z, info=None, state=state, solver=solver[0])
            # Run eagerly (concrete residuals), the backward solve's report lands in
            # info.backward; inside a trace it could not leave it, and failures are reported
            # through Backend.report's host callback instead.
            target = info_box[0] if info_box and estimator is None and self.is_concrete(z_star) else None
            u = make_backward(p, forward_result, target, estimator)(g, lin)
            _, vjp_params = jax.vjp(lambda a, c: bind(a, c).F(z), args, consts)
            return vjp_params(u)

        @jax.custom_vjp
        def reattach(z_star, state, args, consts):
            return z_star

        def reattach_fwd(z_star, state, args, consts):
            return z_star, (z_star, state, args, consts)

        def reattach_bwd(residuals, g):
            z_star, state, args, consts = residuals
            d_args, d_consts = backward_rule(z_star, state, args, consts, g, estimator=exact_ift())
            zeros = jax.tree_util.tree_map(jax.numpy.zeros_like, (z_star, state))
            return zeros[0], zeros[1], d_args, d_consts

        reattach.defvjp(reattach_fwd, reattach_bwd)

        def implicit_bwd(residuals, cotangents):
            z_star, state, args, consts, z0 = residuals
            d_args, d_consts = backward_rule(z_star, state, args, consts, cotangents[0])
            return jax.numpy.zeros_like(z0), d_args, d_consts

        implicit.defvjp(implicit_fwd, implicit_bwd)
        z_flat, info = implicit(z0, problem.args, consts)
        if info.trace is not None and self.is_concrete(info.trace):
            # The loop ran max(steps) iterations: drop the unused rows, as eager backends do.
            info.trace = info.trace[: int(info.steps.max()) + 1]
        info_box.append(info)

        def vjp(g: Any) -> Any:
            """``dL/dargs`` for ``g = dL/dz*``, as on NumPy (re-runs the forward solve)."""
            problem.check_output(g, what="the cotangent g passed to info.vjp")
            _, pullback = jax.vjp(lambda a: implicit(z0, a, consts)[0], problem.args)
            return pullback(problem.flatten(g))[0]

        info.vjp = vjp
        return problem.unflatten(z_flat), info

    def report(self, info: Any, on_fail: str, stage: str = "forward") -> None:
        from implicit_core._info import report

        if on_fail == "ignore":
            return
        if all(self.is_concrete(getattr(info, f)) for f in _INFO_FIELDS):
            report(info, on_fail, stage)
            return
        import jax

        # The callback receives the SolveInfo pytree with host arrays in place of tracers.
        jax.debug.callback(lambda host: report(host, on_fail, stage), info)


@functools.lru_cache(maxsize=1)
def _register_solve_info() -> None:
    """Make ``SolveInfo`` a pytree, so that a jitted function can return it.

    Its arrays are the children; the names are static; ``backward``, ``extras`` and ``vjp``
    (host-side objects) do not cross a ``jit`` boundary.
    """
    import jax

    def flatten(info: SolveInfo):
        children = tuple(getattr(info, f) for f in _INFO_FIELDS) + (info.trace,)
        return children, (info.solver, info.gradient, info.to_python)

    def unflatten(aux, children):
        solver, gradient, to_python = aux
        fields = dict(zip(_INFO_FIELDS, children[:-1]))
        return SolveInfo(**fields, trace=children[-1], solver=solver, gradient=gradient, to_python=to_python)

    jax.tree_util.register_pytree_node(SolveInfo, flatten, unflatten)


@hookimpl
def implicit_core_backends(register):
    register(JaxBackend)
