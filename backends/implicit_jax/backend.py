"""The JAX backend: the solve loop as ``lax.while_loop``, derivatives by a ``jax.custom_jvp``.

The whole forward solve is the primal of a ``custom_jvp`` function, so that no derivative ever
goes through the loop. Its JVP rule gives ``dz* = (I - J)⁻¹ dF/dargs · dargs`` through
``lax.custom_linear_solve``: forward mode (``jvp``, ``jacfwd``) solves that system (Anderson,
to the forward's ``tol``); reverse mode (``grad``, ``vjp``) transposes it, and the transpose
solve is the chosen gradient estimator (``ift``, ``jfb``, ``shine``, ...), so parameter
gradients are ``uᵀ dF/dargs`` as on every backend. The rule computes its primal through the
same ``custom_jvp`` function, so derivatives of every order (grad of grad, hessians) are again
implicit: exact with ``ift``; an approximate estimator's derivative is that of the linear solve
it stands for (``du = E(dg - dAᵀ u)`` with ``A = I - J`` and ``E`` the estimator).

The user's function is closure-converted first (``jax.closure_convert``): values it captures
from an enclosing trace (an Equinox model's weights, a ``jit`` argument) become explicit inputs
and receive their derivatives like ``args`` do. Everything composes with ``jit``, ``vmap``,
``grad``, ``jvp`` and ``lax.scan``.

``info.vjp(g)`` also gives ``dL/dargs`` directly, as on NumPy (the estimator runs eagerly).

Non-convergence under ``jit``: the ``info`` arrays are returned as usual; ``on_fail="warn"``
warns from a host callback (``jax.debug.callback``) when the program runs, and
``on_fail="raise"`` raises from it, which JAX surfaces as a ``JaxRuntimeError`` whose message
holds the ``ConvergenceError`` text. Called outside any trace, the checks run directly and
raise ``ConvergenceError`` itself.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import weakref
from typing import Any, Callable

from implicit_core import Backend, ConfigurationError, ImplicitError, SolveInfo, hookimpl
from implicit_core.plugin import SolveResult

#: SolveInfo fields returned by the custom-VJP rule as arrays.
_INFO_FIELDS = ("steps", "residual", "rel_residual", "converged", "status")


class JaxBackend(Backend):
    name = "jax"
    traced = True
    requires = ("jax",)
    install_hint = "pip install 'implicit-core[jax]'"

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

    def at_set_where(self, buffer: Any, axis: int, slot: Any, value: Any, mask: Any) -> Any:
        # The row is read with the slot's axis kept and selected in that shape: XLA then
        # writes it in place. Read through an index (a squeezed slice), the select and the
        # update became separate passes over the row, a quarter of a JAX Broyden step.
        import jax
        import jax.numpy as jnp

        old = jax.lax.dynamic_slice_in_dim(buffer, slot, 1, axis=axis)
        row = jnp.where(jnp.expand_dims(mask, axis), jnp.expand_dims(value, axis), old)
        return jax.lax.dynamic_update_slice_in_dim(buffer, row, slot, axis=axis)

    def all_finite(self, x: Any) -> bool | None:
        import numpy as np

        if not _is_concrete(x):
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

    def switch(self, index: Any, branches: Any) -> Any:
        import jax

        return jax.lax.switch(index, list(branches))

    def while_loop(self, cond: Callable[[Any], Any], body: Callable[[Any], Any], carry: Any) -> Any:
        import jax

        return jax.lax.while_loop(cond, body, carry)

    # ----------------------------------------------------------------- autodiff
    def linearise(self, problem: Any, z: Any) -> Callable[[Any], Any]:
        return self.value_and_linearise(problem, z)[1]

    def value_and_linearise(self, problem: Any, z: Any) -> tuple[Any, Callable[[Any], Any]]:
        import jax

        out, vjp = jax.vjp(problem.F, z)
        return out, lambda v: vjp(v)[0]

    def solve_implicit(self, problem, z0, forward, make_backward, with_jacobian=True, make_tangent=None):
        import jax

        _register_solve_info()
        # One checked call first: the user's errors and wrong outputs become typed errors
        # before anything is traced for the loop.
        problem.call_user(problem.unflatten(z0))
        fn_conv, consts, structure = _convert(problem, z0)

        def bind(args: Any, consts: Any) -> Any:
            return dataclasses.replace(problem, fn=lambda z, a: fn_conv(z, a, *consts), args=args, _checked=True)

        key = None
        if problem.config_key is not None and all(_is_concrete(x) for x in jax.tree_util.tree_leaves((z0, problem.args, consts))):
            key = (structure, problem.config_key, _avals((z0, problem.args, consts)))
        cached = _COMPILED.get(key) if key is not None else None
        if cached is None:
            run, solver = _implicit(bind, forward, make_backward, make_tangent, with_jacobian)
            if key is not None:
                # Eager calls: compiled once per function and configuration, then reused (the
                # captured values are inputs, never constants of the compiled program).
                run = jax.jit(run)
                _COMPILED.put(key, (run, solver))
        else:
            run, solver = cached
        z_flat, info, state = run(z0, problem.args, consts)
        if info.trace is not None and _is_concrete(info.trace):
            # The loop ran max(steps) iterations: drop the unused rows, as eager backends do.
            info.trace = info.trace[: int(info.steps.max()) + 1]

        def vjp(g: Any) -> Any:
            """``dL/dargs`` for ``g = dL/dz*``, as on NumPy: the estimator runs here (compiled once
            per key when called eagerly), and its backward solve's report lands in ``info.backward``."""
            problem.check_output(g, what="the cotangent g passed to info.vjp",
                                 advice="pass dL/dz*, shaped like z* (jnp.ones_like(z) for L = sum(z*))")
            g_flat = problem.flatten(g)
            if key is None or not _is_concrete(g_flat):
                sink = SolveInfo(None, None, None, None, None)
                d_args = pullback(z_flat, state, problem.args, consts, g_flat, sink)
                target = info_ref()
                if target is not None:
                    target.backward, target.extras = sink.backward, {**target.extras, **sink.extras}
                return d_args
            compiled = _COMPILED.get(("vjp",) + key)
            if compiled is None:
                reports: list[tuple[str, str]] = []

                def traced(z_flat, state, args, consts, g_flat):
                    sink = SolveInfo(None, None, None, None, None)
                    _DEFERRED.reports = reports
                    try:
                        d_args = pullback(z_flat, state, args, consts, g_flat, sink)
                    finally:
                        _DEFERRED.reports = None
                    return d_args, sink.backward, sink.extras

                compiled = (jax.jit(traced), reports)
                _COMPILED.put(("vjp",) + key, compiled)
            run_vjp, reports = compiled
            d_args, backward, extras = run_vjp(z_flat, state, problem.args, consts, g_flat)
            target = info_ref()
            if target is not None:
                target.backward, target.extras = backward, {**target.extras, **extras}
            for on_fail, stage in reports:
                if backward is not None:
                    self.report(backward, on_fail, stage)
            return d_args

        def pullback(z_flat, state, args, consts, g_flat, sink):
            u = _estimate(make_backward, bind(args, consts), z_flat, state, solver[0], with_jacobian, g_flat, sink)
            _, vjp_args = jax.vjp(lambda a: bind(a, consts).F(z_flat), args)
            return vjp_args(u)[0]

        info_ref = weakref.ref(info)  # info.vjp refers to info: weakly, so no reference cycle
        info.vjp = vjp
        return problem.unflatten(z_flat), info

    def report(self, info: Any, on_fail: str, stage: str = "forward") -> None:
        if on_fail == "ignore":
            return
        deferred = getattr(_DEFERRED, "reports", None)
        if deferred is not None:  # tracing a cached eager backward: reported after it ran
            deferred.append((on_fail, stage))
            return
        if all(_is_concrete(getattr(info, f)) for f in _INFO_FIELDS):
            super().report(info, on_fail, stage)
            return
        import jax

        # The callback receives the SolveInfo pytree with host arrays in place of tracers.
        jax.debug.callback(lambda host: Backend.report(self, host, on_fail, stage), info)


#: While a cached eager backward is traced, the reports it would make (on_fail, stage) are
#: collected here and made from its concrete results once it has run.
_DEFERRED = threading.local()


def _is_concrete(x: Any) -> bool:
    """False for placeholders of a trace (tracers), whose values are unknown here."""
    import jax

    return not isinstance(x, jax.core.Tracer)


def _implicit(bind, forward, make_backward, make_tangent, with_jacobian):
    """``(z0, args, consts) -> (z*, info, solver state)``, differentiable to every order."""
    import jax

    solver: list[Any] = []  # the solver object, static: recorded while tracing the primal

    @jax.custom_jvp
    def implicit(z0: Any, args: Any, consts: Any) -> tuple[Any, Any, Any]:
        # The loop is never differentiated: derivatives come from the rule below.
        z0, args, consts = jax.lax.stop_gradient((z0, args, consts))
        result = forward(bind(args, consts), z0)
        solver[:] = [result.solver]
        return result.z, result.info, result.state  # SolveInfo is a registered pytree

    @implicit.defjvp
    def implicit_jvp(primals, tangents):
        z0, args, consts = primals
        _, d_args, d_consts = tangents
        # The primal through ``implicit`` itself: differentiating this rule again (grad of
        # grad, hessians) differentiates z* by this same rule, never through the loop.
        out = implicit(z0, args, consts)
        z, _, state = out
        p = bind(args, consts)
        _, rhs = jax.jvp(lambda a, c: bind(a, c).F(z), (args, consts), (d_args, d_consts))
        _, jvp_z = jax.linearize(p.F, z)

        def tangent_solve(matvec, b):  # forward mode: dz* solves (I - J) dz = dF/dargs · dargs
            return make_tangent(p)(jvp_z, b)

        def adjoint_solve(vecmat, g):  # reverse mode: the chosen estimator's u ≈ (I - Jᵀ)⁻¹ g
            return _estimate(make_backward, p, z, state, solver[0], with_jacobian, g)

        dz = jax.lax.custom_linear_solve(lambda v: v - jvp_z(v), rhs, tangent_solve, adjoint_solve)
        return out, (dz, *_zero_tangents(out[1:]))

    return implicit, solver


def _estimate(make_backward, p, z, state, solver, with_jacobian, g, sink=None):
    """The chosen estimator's ``u`` for the cotangent ``g`` at ``z*`` (``sink`` receives its report)."""
    import jax

    lin = None
    if with_jacobian:
        _, vjp_z = jax.vjp(p.F, z)
        lin = lambda v: vjp_z(v)[0]  # noqa: E731
    return make_backward(p, SolveResult(z=z, info=None, state=state, solver=solver), sink)(g, lin)


def _convert(problem: Any, z0: Any) -> tuple[Callable[..., Any], list[Any], Any]:
    """The user's function as ``fn(z, args, *consts)``, with every value it captures (arrays of
    an enclosing trace, an Equinox model's weights, plain constants) an explicit input, so that
    they receive derivatives and are never baked into a compiled program; and a hashable
    description of the computation (for the compile cache)."""
    import jax

    import numbers

    import numpy as np

    for leaf in jax.tree_util.tree_leaves(problem.args):
        if not (isinstance(leaf, (jax.Array, np.ndarray, np.generic, numbers.Number)) or hasattr(leaf, "__jax_array__")):
            raise ConfigurationError(
                f"args holds a {type(leaf).__name__} ({leaf!r:.40}): on JAX, args are traced and may hold "
                "only arrays and numbers. Close over other values in f instead (f = lambda z, a: g(z, a, mode))"
            )
    fn_now = problem.fn
    try:  # traces the user's function once more: its errors are the user's, typed as such
        # A new function object each time: JAX's tracing cache, keyed by the function, would
        # otherwise replay the first trace and miss values the function reads at call time.
        closed, out_shape = jax.make_jaxpr(lambda z, a: fn_now(z, a), return_shape=True)(
            problem.unflatten(z0), problem.args)
    except ImplicitError:
        raise
    except Exception as exc:
        raise problem.user_error(exc) from exc
    jaxpr, out_tree = closed.jaxpr, jax.tree_util.tree_structure(out_shape)

    def fn(z: Any, args: Any, *consts: Any) -> Any:
        out = jax.core.eval_jaxpr(jaxpr, consts, *jax.tree_util.tree_leaves((z, args)))
        return jax.tree_util.tree_unflatten(out_tree, out)

    return fn, list(closed.consts), (str(jaxpr), str(out_tree))


def _avals(tree: Any) -> tuple:
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (str(treedef),) + tuple((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves)


class _LRU:
    """A small bounded cache: memory stays flat however many distinct solves a program makes."""

    def __init__(self, size: int) -> None:
        self.size, self.items = size, collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)


#: Compiled eager solves, keyed by the function's computation, the configuration and the
#: shapes and dtypes of every input.
_COMPILED = _LRU(64)


def _zero_tangents(tree: Any) -> Any:
    """Zero tangents for outputs that carry no derivative (solve reports, solver state)."""
    import jax
    import numpy as np

    def zero(x: Any) -> Any:
        if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact):
            return jax.numpy.zeros_like(x)
        return np.zeros(x.shape, dtype=jax.dtypes.float0)  # integer and boolean outputs

    return jax.tree_util.tree_map(zero, tree)


_REGISTERED = threading.Lock()
_registered: list[bool] = []


def _register_solve_info() -> None:
    """Make ``SolveInfo`` a pytree, so that a jitted function can return it (once per process,
    also when several threads make their first JAX solve at the same time).

    Its arrays are the children; the names are static; ``backward``, ``extras`` and ``vjp``
    (host-side objects) do not cross a ``jit`` boundary.
    """
    if _registered:
        return
    with _REGISTERED:
        if _registered:
            return
        _register_pytree()
        _registered.append(True)


def _register_pytree() -> None:
    import jax

    def flatten(info: SolveInfo):
        children = tuple(getattr(info, f) for f in _INFO_FIELDS) + (info.trace, info.jac_loss)
        return children, (info.solver, info.gradient, info.to_python)

    def unflatten(aux, children):
        solver, gradient, to_python = aux
        fields = dict(zip(_INFO_FIELDS, children[:-2]))
        return SolveInfo(**fields, trace=children[-2], jac_loss=children[-1], solver=solver, gradient=gradient,
                         to_python=to_python)

    jax.tree_util.register_pytree_node(SolveInfo, flatten, unflatten)


@hookimpl
def implicit_core_backends(register):
    register(JaxBackend)
