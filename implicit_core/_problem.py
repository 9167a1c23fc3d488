"""A batched implicit problem bound to one backend, on flat ``(batch, n)`` arrays.

Users write ``f(z, args)`` on their own state structure (an array, a tuple of arrays of
different shapes, a pytree on JAX); solvers see only the fixed-point map ``F`` on a
``(batch, n)`` matrix. The root form ``g(z, args) = 0`` is solved as ``F(z) = z + g(z)``, so
the gradient estimators need one formula: ``u = g + J_F^T u`` and ``dL/dargs = u^T dF/dargs``.

An unbatched problem (``batched=False``) is one system of all the state's unknowns: its flat
form is a batch of one, ``(1, n)``, and the user's function sees the state without a batch axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ._backend import Backend
from ._errors import BackendMismatchError, DeviceMismatchError, DTypeError, ImplicitError, ShapeError, UserFunctionError

FIXED_POINT = "fixed_point"
ROOT = "root"


@dataclass
class Layout:
    """How a state tree maps to and from a ``(batch, n)`` matrix."""

    treedef: Any
    shapes: list[tuple[int, ...]]  # per leaf, batch axis excluded (the whole shape when unbatched)
    sizes: list[int]
    batch: int
    dtype: Any  # the state's dtype, which the user's function sees
    device: Any
    solve_dtype: Any = None  # the solver's arithmetic: float32 for 16-bit states, else dtype
    batched: bool = True  # False: the whole state is one system, flattened to (1, n)

    def __post_init__(self) -> None:
        if self.solve_dtype is None:
            self.solve_dtype = self.dtype

    @property
    def n(self) -> int:
        return sum(self.sizes)

    def leaf_shape(self, i: int) -> tuple[int, ...]:
        """The shape of state leaf ``i`` as the user's function sees it."""
        return (self.batch, *self.shapes[i]) if self.batched else tuple(self.shapes[i])


@dataclass
class Problem:
    """``F(z) = z`` on flat arrays: the object every solver and estimator works on.

    Attributes:
        backend: the backend that owns the arrays.
        fn: the user's function on the state structure (``f`` or ``g``).
        args: the user's parameters, passed through untouched.
        form: ``"fixed_point"`` (``z = f(z, args)``) or ``"root"`` (``g(z, args) = 0``).
        layout: state structure <-> ``(batch, n)``.
        user_vjp: for backends without autodiff, ``vjp(z, args, v) -> (v_z, v_args)`` of ``fn``.
        flat_fn: set instead of ``fn`` for internal problems already on flat arrays
            (the backward linear systems).
    """

    backend: Backend
    layout: Layout
    fn: Callable[..., Any] | None = None
    args: Any = None
    form: str = FIXED_POINT
    user_vjp: Callable[..., Any] | None = None
    flat_fn: Callable[[Any], Any] | None = None
    #: Autodiff backends record what second derivatives of ``z*`` need (``higher_order=True``).
    higher_order: bool = False
    #: The most steps the running solve may take (set by the loop before ``Solver.init``):
    #: solvers size their histories by what can actually be used.
    max_steps: int = 2**31 - 2
    #: A hashable description of everything about the solve besides the function and the
    #: arrays (solver, estimator, stopping rule, ...), for backends that cache compiled solves;
    #: ``None`` when some option has no value-based description (a callable, an object).
    config_key: Any = None
    #: The backward pass will read ``Solver.inverse_jacobian``'s transpose (SHINE, Broyden
    #: reuse): a solver that can make its estimate exact along the backward's directions
    #: (Broyden's adjoint update) does so by default.
    backward_reads_inverse: bool = False
    #: The caller asked for the Jacobian penalty at ``z*`` (``jac_reg=True``): a backend that
    #: records a graph of ``F`` at ``z*`` keeps it differentiable in ``z`` for that.
    jac_reg: bool = False
    #: A backend's own record of this solve (torch: the graph of ``F`` it recorded at ``z*``,
    #: which :meth:`Backend.jacobian_penalty` reuses).
    recorded: dict[str, Any] = field(default_factory=dict, repr=False)
    _checked: bool = field(default=False, repr=False)

    @property
    def xp(self) -> Any:
        return self.backend.xp

    @property
    def eps(self) -> float:
        """Guard for relative residuals and divisions, scaled to the dtype."""
        xp = self.xp
        return float(xp.finfo(self.layout.solve_dtype).eps) ** 2 * 1e4 if self.layout.dtype is not None else 1e-12

    # ----------------------------------------------------------------- structure
    def flatten(self, tree: Any) -> Any:
        """State structure -> ``(batch, n)`` in the solver's dtype."""
        leaves, _ = self.backend.tree_flatten(tree)
        xp, lay = self.xp, self.layout
        if len(leaves) == 1:
            flat = xp.reshape(leaves[0], (lay.batch, -1))
        else:
            flat = xp.concat([xp.reshape(leaf, (lay.batch, -1)) for leaf in leaves], axis=1)
        return flat if flat.dtype == lay.solve_dtype else xp.astype(flat, lay.solve_dtype)

    def unflatten(self, flat: Any) -> Any:
        """``(batch, n)`` -> state structure in the state's dtype."""
        xp, lay = self.xp, self.layout
        if flat.dtype != lay.dtype:
            flat = xp.astype(flat, lay.dtype)
        parts = [flat] if len(lay.sizes) == 1 else self.backend.split_columns(flat, lay.sizes)
        batch = (flat.shape[0],) if lay.batched else ()
        leaves = [xp.reshape(part, batch + shape) for part, shape in zip(parts, lay.shapes)]
        return self.backend.tree_unflatten(lay.treedef, leaves)

    # ----------------------------------------------------------------- the map
    def call_user(self, z_tree: Any) -> Any:
        """The user's function on the state structure, with its output checked once."""
        if self._checked:
            try:
                return self.fn(z_tree, self.args)
            except ImplicitError:
                raise
            except Exception as exc:  # so that a plugin is never blamed for the user's function
                raise self.user_error(exc) from exc
        what = "f(z0)" if self.form == FIXED_POINT else "g(z0)"
        try:
            out = self.fn(z_tree, self.args)
        except Exception as exc:
            shapes = [tuple(leaf.shape) for leaf in self.backend.tree_flatten(z_tree)[0]]
            raise UserFunctionError(
                f"{what} raised {type(exc).__name__}: {exc}. The state z0 has shape(s) {shapes} "
                "(batch first): check that it matches what the function expects."
            ) from exc
        self.check_output(out, what=what)
        self._checked = True
        return out

    def user_error(self, exc: Exception) -> UserFunctionError:
        """The typed error for an exception the user's function raised inside the solve."""
        kind = "f" if self.form == FIXED_POINT else "g"
        return UserFunctionError(f"{kind}(z, args) raised {type(exc).__name__} during the solve: {exc}")

    def F(self, z: Any) -> Any:
        """The fixed-point map on flat arrays: ``f(z)``, or ``z - g(z)`` for root problems.

        ``z - g`` (not ``z + g``) because root problems mostly come from optimality conditions,
        ``g = ∇φ`` with a positive-definite Jacobian: then fixed-point iteration is gradient
        descent, Broyden's initial inverse estimate (``-I`` for ``F(z) - z = -g``) means
        ``∂g/∂z ≈ I``, and JFB becomes the Jacobian-free hypergradient ``-gᵀ ∂g/∂args``.
        A fixed-point problem ``f`` is the root problem ``g(z) = z - f(z)`` (optimistix's
        convention too).
        """
        if self.flat_fn is not None:
            return self.flat_fn(z)
        out = self.flatten(self.call_user(self.unflatten(z)))
        return z - out if self.form == ROOT else out

    def check_output(self, out: Any, what: str, advice: str = "a fixed-point map must map the state onto itself") -> None:
        be, lay = self.backend, self.layout
        leaves, treedef = be.tree_flatten(out)
        if len(leaves) != len(lay.shapes) or treedef != lay.treedef:
            def shown(tree: Any, n: int) -> str:
                if tree is None:
                    return "None"
                return f"{type(tree).__name__} of {n} array(s)" if isinstance(tree, (tuple, list, dict)) else "single array"

            state = self.unflatten(be.xp.zeros((lay.batch, lay.n), dtype=lay.solve_dtype)) if len(lay.shapes) else None
            raise ShapeError(
                f"{what} is a {shown(out, len(leaves))}, but the state z0 is a {shown(state, len(lay.shapes))}: "
                f"it must have the same structure (container types included) as z0; {advice}."
            )
        for i, (leaf, shape) in enumerate(zip(leaves, lay.shapes)):
            if not be.owns(leaf):
                raise BackendMismatchError(
                    f"{what} gave a {type(leaf).__module__}.{type(leaf).__name__} for state leaf {i}, "
                    f"but the solve runs on the {be.name!r} backend: return {be.name} arrays."
                )
            expect = lay.leaf_shape(i)
            if tuple(leaf.shape) != expect:
                raise ShapeError(
                    f"{what} has shape {tuple(leaf.shape)} for state leaf {i}, expected {expect} "
                    f"(the shape of z0): {advice}."
                )
            if leaf.dtype != lay.dtype:
                raise DTypeError(
                    f"{what} has dtype {leaf.dtype} for state leaf {i}, but z0 has {lay.dtype}: "
                    f"cast z0 or the function's output so that both use one floating dtype."
                )
            if be.device(leaf) != lay.device:
                raise DeviceMismatchError(
                    f"{what} has an array on device {be.device(leaf)} for state leaf {i}, "
                    f"but z0 is on {lay.device}: move the function's parameters to z0's device."
                )

    # ----------------------------------------------------------------- helpers
    @classmethod
    def on_flat(cls, backend: Backend, like: Any, flat_fn: Callable[[Any], Any]) -> "Problem":
        """An internal problem already on ``(batch, n)`` arrays (e.g. ``u = g + J^T u``)."""
        layout = Layout(
            treedef=None,
            shapes=[tuple(like.shape[1:])],
            sizes=[int(like.shape[1])],
            batch=int(like.shape[0]),
            dtype=like.dtype,
            device=backend.device(like),
        )
        return cls(backend=backend, layout=layout, flat_fn=flat_fn, _checked=True)
