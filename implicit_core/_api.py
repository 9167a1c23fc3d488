"""The public entry points: ``fixed_point`` and ``root``."""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Any, Callable

import array_api_compat

from ._backend import Backend
from ._errors import (
    BackendMismatchError,
    ConfigurationError,
    ImplicitError,
    DeviceMismatchError,
    DTypeError,
    NonFiniteError,
    ShapeError,
    did_you_mean,
)
from ._gradient_context import BackwardContext, solve_tangent
from ._info import SolveInfo, check_on_fail
from ._loop import STOP_MODES, SolveResult, solve
from ._plugin_base import GradientEstimator, Solver, call_plugin, check_like
from ._problem import FIXED_POINT, ROOT, Layout, Problem
from ._registry import REGISTRY, _instantiate, require_available, solver_names_with_inverse

def linear_solver_for(form: str) -> str:
    """The default solver of the linear systems around a solve (IFT's adjoint, JAX's tangent).

    For a fixed point, ``J`` is contractive and Anderson converges; a root problem's ``F = z - g``
    need not be (``J = I - dg/dz``), and Broyden, which does not need that, is used instead.
    """
    return "broyden" if form == ROOT else "anderson"


#: Options every solve understands, besides those routed to the solver or estimator.
CALL_OPTIONS = ("vjp", "trace", "divergence", "higher_order", "jac_reg", "jac_seed")


def fixed_point(
    f: Callable[[Any, Any], Any],
    z0: Any,
    args: Any = None,
    *,
    solver: str | Solver = "anderson",
    gradient: str | GradientEstimator = "ift",
    tol: float = 1e-4,
    max_iter: int = 50,
    stop_mode: str = "abs",
    on_fail: str = "warn",
    backend: str | None = None,
    batched: bool = True,
    **options: Any,
) -> tuple[Any, SolveInfo]:
    """Solve ``z* = f(z*, args)`` per sample and make ``z*`` differentiable.

    The first axis of ``z0`` (every leaf, when the state is a tuple/pytree) is the batch;
    each sample is an independent system that stops on its own once
    ``||f(z) - z|| <= tol`` (``stop_mode="abs"``) or ``||f(z) - z|| / ||f(z)|| <= tol``
    (``"rel"``). The lowest-residual iterate is returned. Before returning, ``f`` is evaluated
    once more on the whole returned batch and the residual reported is that *true* residual:
    a sample that met ``tol`` only while its batch-mates were still moving (samples that read
    each other) is reported as failed (status 5), never as converged.

    With ``batched=False`` the whole state is one system (one residual, no per-sample
    stopping): ``f`` sees ``z0`` as it is, without a batch axis, and ``info``'s arrays have
    length 1. Use it for unbatched problems and under ``jax.vmap``.

    Gradients follow the implicit function theorem: for a loss ``L(z*)`` with ``g = dL/dz*``,
    ``dL/dargs = u^T df/dargs`` where ``u = g + J^T u`` and ``J = df/dz`` at ``z*``. The
    ``gradient`` estimator chooses how ``u`` is obtained (``ift`` solves for it; ``jfb``,
    ``phantom``, ``shine``, ``broyden_reuse`` approximate it).

    Args:
        f: ``f(z, args) -> z``, same structure, shapes and dtype as ``z0``.
        z0: initial state: an array ``(batch, ...)`` or a tuple/pytree of such arrays.
        args: parameters of ``f``; passed through untouched.
        solver: a registered name or a :class:`Solver` instance (``get_solver(name, **opts)``).
        gradient: a registered name or a :class:`GradientEstimator` instance.
        tol: the stopping tolerance on each sample's residual.
        max_iter: the most solver steps.
        stop_mode: ``"abs"`` (``||f(z) - z|| <= tol``) or ``"rel"`` (relative to ``||f(z)||``).
        on_fail: ``"warn"`` | ``"raise"`` | ``"ignore"`` when some samples do not converge.
        backend: force a backend by name; by default it is inferred from ``z0``.
        batched: ``True``: the first axis is a batch of independent systems; ``False``: one system.
        **options: ``vjp=`` (backends without autodiff: ``vjp(z, args, v) -> (v_z, v_args)``),
            ``trace=True`` (residual history), ``divergence=`` (stop a sample whose residual
            grows by this factor; ``None`` disables), ``higher_order=True`` (torch: record
            what second derivatives need, for ``create_graph=True``; one more evaluation of
            ``f`` with a graph; JAX differentiates to every order without it),
            ``jac_reg=True`` (also set ``info.jac_loss``, the Jacobian penalty of
            :func:`jacobian_regularisation` at ``z*``, with the probe seeded by ``jac_seed=``;
            torch computes it from the graph the solve records anyway: no second evaluation
            of ``f``), and options of the named solver or gradient estimator (e.g. ``m=6`` for
            Anderson).

    Returns:
        ``(z_star, info)``; ``info`` is a :class:`SolveInfo`.
    """
    try:
        return _run(FIXED_POINT, f, z0, args, solver, gradient, tol, max_iter, stop_mode, on_fail, backend, batched, options)
    except ImplicitError as exc:
        raise _at_boundary(exc) from exc.__cause__


def root(
    g: Callable[[Any, Any], Any],
    z0: Any,
    args: Any = None,
    *,
    solver: str | Solver = "broyden",
    gradient: str | GradientEstimator = "ift",
    tol: float = 1e-4,
    max_iter: int = 50,
    stop_mode: str = "abs",
    on_fail: str = "warn",
    backend: str | None = None,
    batched: bool = True,
    **options: Any,
) -> tuple[Any, SolveInfo]:
    """Solve ``g(z*, args) = 0`` per sample; same options and result as :func:`fixed_point`.

    Internally the fixed-point map is ``F(z) = z - g(z)``, so ``dL/dargs = -g_L^T (dg/dz)^-1
    dg/dargs`` comes out of the same estimators; a fixed-point problem ``f`` is the root
    problem ``g(z) = z - f(z)``. With ``g = ∇φ`` of a convex ``φ`` (optimality conditions),
    ``F`` is a gradient-descent step, and ``jfb`` is the Jacobian-free hypergradient
    ``-g_L^T dg/dargs``. The default solver is Broyden's method, which does not need ``F`` to
    be contractive.
    """
    try:
        return _run(ROOT, g, z0, args, solver, gradient, tol, max_iter, stop_mode, on_fail, backend, batched, options)
    except ImplicitError as exc:
        raise _at_boundary(exc) from exc.__cause__


def _at_boundary(exc: ImplicitError) -> ImplicitError:
    """The error without the library's own frames: raised where the user called us.

    What the user did wrong is in the message; the frames of the library in between only bury
    it. A cause (the user's function failing, a plugin's bug) keeps its full traceback.
    """
    return exc.with_traceback(None)


def _run(form, fn, z0, args, solver, gradient, tol, max_iter, stop_mode, on_fail, backend, batched, options):
    if not callable(fn):
        raise ConfigurationError(f"the function to solve must be callable, got {type(fn).__name__}")
    if not isinstance(batched, bool):
        raise ConfigurationError(f"batched must be True or False, got {batched!r}")
    tol, max_iter = _check_stopping(tol, max_iter, stop_mode)
    check_on_fail(on_fail)
    options = dict(options)
    user_vjp = options.pop("vjp", None)
    trace = bool(options.pop("trace", False))
    higher_order = options.pop("higher_order", False)
    if not isinstance(higher_order, bool):
        raise ConfigurationError(f"higher_order must be True or False, got {higher_order!r}")
    jac_reg, jac_seed = options.pop("jac_reg", False), options.pop("jac_seed", 0)
    if not isinstance(jac_reg, bool):
        raise ConfigurationError(f"jac_reg must be True or False, got {jac_reg!r}")
    if isinstance(jac_seed, bool) or not isinstance(jac_seed, numbers.Integral):
        raise ConfigurationError(f"jac_seed must be an integer, got {jac_seed!r}")
    divergence = options.pop("divergence", 1e6)
    if divergence is not None and not (isinstance(divergence, (int, float)) and divergence > 1):
        raise ConfigurationError(f"divergence must be a number > 1 or None, got {divergence!r}")
    if user_vjp is not None and not callable(user_vjp):
        raise ConfigurationError("vjp must be a callable vjp(z, args, v) -> (v_z, v_args)")

    solver_obj, gradient_obj = resolve_plugins(solver, gradient, **options)
    be = _resolve_backend(backend, z0, args)
    if user_vjp is not None and not be.explicit_vjp:
        raise ConfigurationError(
            f"the {be.name!r} backend differentiates with its own autodiff: drop the vjp= option"
        )
    problem = _build_problem(be, fn, z0, args, form, user_vjp, batched)
    problem.higher_order = higher_order
    problem.backward_reads_inverse = gradient_obj.requires_inverse
    problem.jac_reg = jac_reg
    problem.config_key = _config_key(
        form, solver_obj, gradient_obj, tol, max_iter, stop_mode, on_fail, trace, divergence, higher_order,
        problem.layout,
        # An instance the caller made may carry state its options do not show: it is its own key.
        *(id(obj) for spec, obj in ((solver, solver_obj), (gradient, gradient_obj)) if not isinstance(spec, str)),
    )
    # A copy: the solution never shares memory with the caller's z0 (even when z0 already
    # meets tol), and no solver can write into it.
    z0_flat = be.xp.asarray(be.stop_gradient(problem.flatten(z0)), copy=True)

    def forward(p: Problem, z_init: Any) -> SolveResult:
        result = solve(
            p, solver_obj, z_init, tol=tol, max_iter=max_iter,
            stop_mode=stop_mode, trace=trace, divergence=divergence,
        )
        if not gradient_obj.requires_inverse:
            result.state = {}  # histories are dead weight until the backward pass: free them now
        elif not p.backend.traced:
            # The backward reads only the inverse estimate: keep that (the solver trims it to
            # what the solve wrote) and free the rest of the history now.
            result.inverse = call_plugin(solver_obj, "inverse_jacobian", p, result.state)
            result.state = {}
        return result

    def make_backward(
        p: Problem, result: SolveResult, info: SolveInfo | None, estimator: GradientEstimator | None = None
    ) -> Callable[..., Any]:
        chosen = gradient_obj if estimator is None else estimator
        # info.vjp holds this closure: referring to info weakly (and to the result without its
        # info) leaves no reference cycle, so a solve's buffers are freed as soon as the
        # caller drops them, without waiting for the cyclic garbage collector.
        result = SolveResult(z=result.z, info=None, state=result.state, solver=result.solver, inverse=result.inverse)
        info_ref = None if info is None else weakref.ref(info)

        def backward(g_flat: Any, lin: Any = None, differentiable: Any = None) -> Any:
            ctx = BackwardContext(p, result.z, g_flat, result, tol, max_iter, stop_mode, on_fail, _lin=lin,
                                  differentiable=differentiable)
            try:
                return check_like(chosen, "estimate()", call_plugin(chosen, "estimate", ctx), g_flat)
            finally:  # also when the backward solve raised: info says what happened
                target = None if info_ref is None else info_ref()
                if target is not None:
                    target.backward = ctx.backward_info
                    target.extras.update(ctx.extras)

        return backward

    def make_tangent(p: Problem) -> Callable[[Any, Any], Any]:
        def tangent(jvp: Any, b: Any) -> Any:
            # The same solver and rule as IFT's default adjoint solve, to the forward's tol.
            return solve_tangent(p, jvp, b, REGISTRY.get("solver", linear_solver_for(form))(), tol=tol,
                                 max_iter=max_iter, on_fail=on_fail)

        return tangent

    z_out, info = be.solve_implicit(
        problem, z0_flat, forward, make_backward, with_jacobian=gradient_obj.uses_jacobian, make_tangent=make_tangent
    )
    info.gradient = gradient_obj.name
    if jac_reg:
        info.jac_loss = be.jacobian_penalty(problem, problem.flatten(z_out), int(jac_seed))
    be.report(info, on_fail)
    return z_out, info


def _config_key(*parts: Any) -> tuple | None:
    """What makes two solves of the same function and arrays identical, or ``None``.

    Solvers and estimators are described by their class and options; an option without a
    value-based ``repr`` (a callable such as Broyden's ``opa``, an inverse estimate) makes the
    solve uncacheable rather than risk two different solves sharing one compiled program.
    """
    described = []
    for part in parts:
        if isinstance(part, (Solver, GradientEstimator)):
            text = f"{type(part).__module__}.{type(part).__qualname__}{part!r}"
        elif isinstance(part, Layout):
            text = repr((str(part.treedef), part.shapes, part.batch, str(part.dtype), str(part.solve_dtype), part.batched))
        else:
            text = repr(part)
        if " at 0x" in text or "<" in text:
            return None
        described.append(text)
    return tuple(described)


# --------------------------------------------------------------------------- validation
def _check_stopping(tol: Any, max_iter: Any, stop_mode: Any) -> tuple[float, int]:
    """Validated ``(tol, max_iter)`` as Python numbers (NumPy scalars are accepted)."""
    if hasattr(tol, "aval") or hasattr(max_iter, "aval"):  # a JAX tracer: a traced setting
        raise ConfigurationError(
            "tol and max_iter must be Python numbers, not traced values: under jax.jit pass them as "
            "static arguments (static_argnames=...) or close over them"
        )
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol <= 0:
        raise ConfigurationError(f"tol must be a finite number > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ConfigurationError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if stop_mode not in STOP_MODES:
        raise ConfigurationError(
            f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}.{did_you_mean(str(stop_mode), STOP_MODES)}"
        )
    return float(tol), int(max_iter)


def check_stopping_rule(tol: Any = 1e-4, max_iter: Any = 50, stop_mode: str = "abs", on_fail: str = "warn") -> None:
    """Raise :class:`ConfigurationError` for a stopping rule ``fixed_point`` would refuse.

    For layers that take these settings at construction (``DEQ``): validate them there, not at
    the first forward pass.
    """
    _check_stopping(tol, max_iter, stop_mode)
    check_on_fail(on_fail)


def resolve_plugins(
    solver: str | Solver = "anderson", gradient: str | GradientEstimator = "ift", **options: Any
) -> tuple[Solver, GradientEstimator]:
    """Instantiate a solver and a gradient estimator, routing each option to the one that takes it.

    This is what :func:`fixed_point` does with its ``solver``, ``gradient`` and ``**options``;
    call it once to validate a configuration up front (a layer's constructor) and pass the
    returned instances on every call.
    """
    targets = {}
    for kind, spec, base in (("solver", solver, Solver), ("gradient", gradient, GradientEstimator)):
        if isinstance(spec, str):
            targets[kind] = (spec, REGISTRY.get(kind, spec).option_names())
        elif isinstance(spec, base):
            targets[kind] = (spec, [])
        else:
            raise ConfigurationError(
                f"{kind} must be a registered name or a {base.__name__} instance, got {spec!r}"
            )
    routed: dict[str, dict[str, Any]] = {"solver": {}, "gradient": {}}
    for key, value in options.items():
        takers = [kind for kind, (_, names) in targets.items() if key in names]
        if not takers:  # an option's old name, routed to the plugin that renamed it
            takers = [kind for kind, (spec, _) in targets.items()
                      if isinstance(spec, str) and key in REGISTRY.get(kind, spec).deprecated_options]
        if len(takers) == 2:
            raise ConfigurationError(
                f"option {key!r} is accepted by both the solver and the gradient estimator: "
                "configure them explicitly with get_solver(...) / get_gradient(...)"
            )
        if not takers:
            known = list(CALL_OPTIONS) + [n for _, names in targets.values() for n in names]
            instance_note = "".join(
                f" ({kind} {spec!r} is an instance: configure it where you create it.)"
                for kind, (spec, _) in targets.items() if not isinstance(spec, str)
            )
            raise ConfigurationError(
                f"unknown option {key!r}.{did_you_mean(key, known)} Accepted here: "
                f"{', '.join(sorted(set(known)))}.{instance_note}"
            )
        routed[takers[0]][key] = value
    out = []
    for kind in ("solver", "gradient"):
        spec = targets[kind][0]
        out.append(_instantiate(kind, spec, routed[kind]) if isinstance(spec, str) else spec)
    solver_obj, gradient_obj = out
    if gradient_obj.requires_inverse and not solver_obj.provides_inverse:
        raise ConfigurationError(
            f"gradient {gradient_obj.name!r} reuses the forward solver's inverse-Jacobian estimate, "
            f"but solver {solver_obj.name!r} keeps none. Use one of: "
            f"{', '.join(solver_names_with_inverse()) or 'none registered'}."
        )
    return solver_obj, gradient_obj


def _owner(leaf: Any, backends: list[Backend]) -> Backend | None:
    for b in backends:
        try:
            if b.owns(leaf):
                return b
        except Exception:  # a third-party owns() must not break inference
            continue
    return None


def _generic_leaves(tree: Any) -> list[Any]:
    """Leaves of nested tuples/lists/dicts, enough to tell which library the arrays are from."""
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _generic_leaves(value)]
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in _generic_leaves(item)]
    return [tree]


def _flattens_to_own_arrays(backend: Backend, tree: Any) -> bool:
    try:
        leaves, _ = backend.tree_flatten(tree)
        return bool(leaves) and all(backend.owns(leaf) for leaf in leaves)
    except Exception:  # a backend that cannot flatten this object does not own it
        return False


def _describe(x: Any) -> str:
    return f"{type(x).__module__}.{type(x).__name__}"


def _refuse_matrices(what: str, leaves: list[Any]) -> None:
    import numpy as np

    for leaf in leaves:
        if isinstance(leaf, np.matrix):
            raise ConfigurationError(
                f"{what} holds a numpy.matrix, whose * and ** are matrix products and whose rows stay "
                f"2-D: pass np.asarray({what}) (an ndarray) instead"
            )


def _resolve_backend(name: str | None, z0: Any, args: Any) -> Backend:
    backends = REGISTRY.backends()
    z_leaves = _generic_leaves(z0)
    _refuse_matrices("z0", z_leaves)
    _refuse_matrices("args", _generic_leaves(args))
    if isinstance(z0, (list, tuple)) and z_leaves and all(isinstance(x, (int, float)) for x in z_leaves):
        raise BackendMismatchError(
            f"z0 is a Python {type(z0).__name__} of numbers: pass an array, e.g. np.asarray(z0, dtype=float) "
            "(or a torch tensor / JAX array)"
        )
    owners = [(_owner(leaf, backends), leaf) for leaf in z_leaves]
    if name is not None:
        be = REGISTRY.get("backend", name)
    else:
        found = {id(o): o for o, _ in owners if o is not None}
        if not found:  # a framework's own container (a JAX pytree): ask each backend to flatten it
            found = {id(b): b for b in backends if _flattens_to_own_arrays(b, z0)}
        if not found:
            raise BackendMismatchError(
                f"z0 is a {_describe(z_leaves[0])}, which no registered backend handles. "
                f"Backends: {', '.join(b.name for b in backends)}; install the extra for your "
                "framework (e.g. pip install 'implicit-core[torch]') or pass arrays of one of them."
            )
        if len(found) > 1:
            raise BackendMismatchError(
                f"z0 mixes arrays of several backends ({', '.join(sorted(b.name for b in found.values()))}): "
                "convert every leaf of the state to one array library."
            )
        be = next(iter(found.values()))
    require_available(be)
    for leaf in be.tree_flatten(z0)[0]:
        if _owner(leaf, [be]) is not be:  # another backend may own these arrays too (a forced one)
            raise BackendMismatchError(
                f"z0 holds a {_describe(leaf)} but the backend is {be.name!r}: pass {be.name} arrays "
                "or choose the matching backend."
            )
    for leaf in _generic_leaves(args):
        if be.owns(leaf) or be.accepts(leaf) or not array_api_compat.is_array_api_obj(leaf):
            continue
        raise BackendMismatchError(
            f"args holds a {_describe(leaf)} while z0 is on the {be.name!r} backend: "
            "keep the state and the parameters in one array library."
        )
    return be


def _build_problem(
    be: Backend, fn: Callable, z0: Any, args: Any, form: str, user_vjp: Any, batched: bool = True
) -> Problem:
    xp = be.xp
    fn = be.wrap_function(fn, z0)  # first: a backend refuses a context it cannot solve in here
    leaves, treedef = be.tree_flatten(z0)
    if not leaves:
        raise ShapeError("z0 is empty: pass an array (batch, ...) or a tuple/pytree of such arrays")
    for i, leaf in enumerate(leaves):
        if not hasattr(leaf, "shape"):
            raise ShapeError(f"state leaf {i} of z0 is a {type(leaf).__name__}, not an array")
        if batched and len(leaf.shape) < 1:
            raise ShapeError(
                f"state leaf {i} of z0 is a scalar: every leaf needs a leading batch axis "
                "(pass batched=False to solve one system, or reshape it to (1, n))"
            )
    if batched and all(len(leaf.shape) == 1 for leaf in leaves):
        n = int(leaves[0].shape[0])
        raise ShapeError(
            f"z0 has shape ({n},): a 1-D state is ambiguous. Pass batched=False for one system of "
            f"{n} unknowns, or z0[:, None] (shape ({n}, 1)) for {n} independent scalar systems."
        )
    batch = int(leaves[0].shape[0]) if batched else 1
    if batched and any(int(leaf.shape[0]) != batch for leaf in leaves):
        raise ShapeError(
            f"the leaves of z0 disagree on the batch size ({[int(l.shape[0]) for l in leaves]}): "
            "the first axis of every leaf is the batch (pass batched=False for one system)"
        )
    if batch == 0:
        raise ShapeError("z0 has batch size 0: pass at least one sample")
    if not batched and sum(int(math.prod(leaf.shape)) for leaf in leaves) == 0:
        raise ShapeError("z0 has no entries: pass a state with at least one unknown")
    dtype = leaves[0].dtype
    for i, leaf in enumerate(leaves):
        if not xp.isdtype(leaf.dtype, "real floating"):
            raise DTypeError(
                f"state leaf {i} of z0 has dtype {leaf.dtype}: the state must be real floating point "
                "(float16/bfloat16 states are solved in float32 arithmetic); cast it to float32 or float64"
            )
        if leaf.dtype != dtype:
            raise DTypeError(
                f"the leaves of z0 mix dtypes ({dtype} and {leaf.dtype}): cast them to one floating dtype"
            )
    device = be.device(leaves[0])
    arg_leaves, _ = be.tree_flatten(args)
    for what, leaf in [("z0", l) for l in leaves] + [("args", l) for l in arg_leaves if be.owns(l)]:
        if be.device(leaf) != device:
            raise DeviceMismatchError(
                f"{what} has an array on {be.device(leaf)} while z0 starts on {device}: "
                "move every array to one device"
            )
    for i, leaf in enumerate(leaves):
        if be.all_finite(leaf) is False:
            raise NonFiniteError(f"z0 contains NaN or Inf (state leaf {i}): start from finite values (e.g. zeros)")
    for leaf in arg_leaves:
        if be.owns(leaf) and xp.isdtype(leaf.dtype, ("real floating", "complex floating")):
            if be.all_finite(leaf) is False:
                raise NonFiniteError("args contains NaN or Inf: the solve would only propagate them")
    layout = Layout(
        treedef=treedef,
        shapes=[tuple(int(s) for s in leaf.shape[(1 if batched else 0):]) for leaf in leaves],
        sizes=[int(math.prod(leaf.shape[(1 if batched else 0):])) for leaf in leaves],
        batch=batch,
        batched=batched,
        dtype=dtype,
        device=device,
        # Half-precision states (float16, bfloat16): the function runs in the state's dtype,
        # the solver's arithmetic (residuals, Anderson's least squares, Broyden's secants) in
        # float32, where those small systems and differences of nearly equal residuals stay
        # meaningful.
        solve_dtype=xp.float32 if xp.finfo(dtype).bits < 32 else dtype,
    )
    return Problem(backend=be, layout=layout, fn=fn, args=args, form=form, user_vjp=user_vjp)
