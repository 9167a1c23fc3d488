"""The backend contract: what a framework must provide for every solver and estimator to run.

A backend holds only what differs between array libraries: which arrays it owns, its
array-API namespace, its loop primitive, how state trees are flattened, how vector-Jacobian
products are formed and how the custom backward is attached to the framework's autodiff.
Everything else (solvers, gradient estimators, the solve loop) is written once against it.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import abc
import contextlib
import importlib
import importlib.util
import math
import sys

import array_api_compat
import numpy as np


class Backend(abc.ABC):
    """Base class of every backend plugin.

    Subclasses set :attr:`name` and :attr:`requires` and implement :meth:`owns` and
    :meth:`namespace`; frameworks with autodiff also override the VJP methods
    (:meth:`linearise`, :meth:`vjp_at`) and :meth:`attach`. A backend whose library can be
    importable yet unusable (CuPy without a CUDA device) extends :meth:`available`.
    """

    #: The name users pass as ``backend=...``.
    name: str = ""
    #: Whether the loop primitive may be traced (``jit``): then no host-side checks happen
    #: inside the solve loop.
    traced: bool = False
    #: True when VJPs come from the user (``vjp=``) instead of the framework's autodiff.
    explicit_vjp: bool = False

    #: The modules the backend imports when used (``("torch",)``); listing plugins looks
    #: them up with ``importlib.util.find_spec`` and never imports them.
    requires: ClassVar[tuple[str, ...]] = ()
    #: What to install when a required module is missing (shown in the reason).
    install_hint: ClassVar[str] = ""

    # ----------------------------------------------------------------- discovery
    def available(self) -> tuple[bool, str]:
        """``(True, "")`` when usable here, else ``(False, reason)``.

        The default imports :attr:`requires`; backends with more conditions (a device) extend it.
        """
        ok, reason = requirements_found(self)
        if not ok:
            return ok, reason
        for module in self.requires:
            try:
                importlib.import_module(module)
            except Exception as exc:  # installed but broken (a bad build, a missing library)
                hint = f"; {self.install_hint}" if self.install_hint else ""
                return False, f"{module} is not importable ({type(exc).__name__}: {exc}){hint}"
        return True, ""

    @abc.abstractmethod
    def owns(self, x: Any) -> bool:
        """True when ``x`` is an array of this backend's library (never imports the library)."""

    @abc.abstractmethod
    def namespace(self) -> Any:
        """The array-API namespace (``xp``) that solvers compute with."""

    @property
    def xp(self) -> Any:
        return self.namespace()

    # ----------------------------------------------------------------- arrays
    def device(self, x: Any) -> Any:
        return array_api_compat.device(x)

    def stop_gradient(self, x: Any) -> Any:
        return x

    def at_set(self, buffer: Any, index: Any, value: Any) -> Any:
        """``buffer[index] = value``; returns the buffer (a new one on functional backends)."""
        buffer[index] = value
        return buffer

    def at_set_where(self, buffer: Any, axis: int, slot: Any, value: Any, mask: Any) -> Any:
        """``buffer[..., slot, ...] = where(mask, value, buffer[..., slot, ...])`` (``slot`` on
        ``axis``: an int or a 0-d integer array; ``mask`` broadcasts against ``value``).

        Samples outside ``mask`` keep their row (a history frozen with its sample). The default
        writes the masked samples' rows through :meth:`host_view` where the arrays have one
        (a row scatter: 5x faster than a ``where`` broadcast over the rows on NumPy and torch),
        and otherwise reads the row, selects and writes it back with :meth:`at_set`; a backend
        overrides it where its compiler makes that pattern costly (JAX, see there).
        """
        if isinstance(slot, int):
            target, source, rows = self.host_view(buffer), self.host_view(value), self.host_view(mask)
            if (target is not None and target.flags.writeable and source is not None and rows is not None
                    and rows.size == rows.shape[0]):
                row = target[(slice(None),) * axis + (slot,)]  # (a view: written in place)
                if row.shape == source.shape:
                    picked = np.flatnonzero(rows.reshape(-1))
                    row[picked] = source[picked]
                    return buffer
        xp = self.xp
        index = (slice(None),) * axis + (slot, ...)
        # (a slot given as an array: ``take``, since the array API indexes with integers only)
        old = buffer[index] if isinstance(slot, int) else xp.squeeze(xp.take(buffer, xp.reshape(slot, (1,)), axis=axis), axis=axis)
        return self.at_set(buffer, index, xp.where(mask, value, old))

    def split_columns(self, flat: Any, sizes: Sequence[int]) -> list[Any]:
        """``flat[:, a:b]`` for consecutive column counts ``sizes`` (a flat state cut into its
        tensors). The default slices; a framework with a split operation overrides it where
        that differentiates better (torch: one gradient for all the pieces, see there)."""
        parts, start = [], 0
        for size in sizes:
            parts.append(flat[:, start : start + size])
            start += size
        return parts

    def all_on_host(self, mask: Any) -> bool:
        """``True`` if every entry of the boolean ``mask`` is true *and* that is cheap to know.

        Eager CPU backends answer exactly, which lets the solve loop skip per-sample masking
        (``where`` over whole states) when no sample is frozen. Traced backends, and device
        arrays where reading a flag would stall the device queue, answer ``False``: the
        masked path is always correct, only slower.
        """
        return False if self.traced else bool(self.xp.all(mask))

    def host_view(self, x: Any) -> Any:
        """A NumPy view of ``x`` where that costs no transfer and no copy (eager CPU arrays), else ``None``.

        A writeable view shares ``x``'s memory: what is written into it is written into ``x``
        (:meth:`at_set_where` writes history rows that way; a read-only view is only read). An
        array that the framework's autodiff records gets ``None``: through a view it would lose
        its record.

        The solve loop keeps its per-sample bookkeeping (status, step counts, best residuals:
        ``(batch,)`` arrays) in NumPy when the residuals have such a view: a NumPy operation
        on a few hundred numbers costs a microsecond, a framework's eager dispatch several.
        ``None`` (the default: traced, device and unknown arrays) keeps it in the backend's
        own arrays.
        """
        return None

    def from_host(self, a: Any, like: Any) -> Any:
        """The backend array for the NumPy array ``a`` (zero-copy where the library allows),
        placed like ``like``; used only where :meth:`host_view` gave a view."""
        return self.xp.asarray(a, device=self.device(like))

    def to_python(self, x: Any) -> Any:
        """A host-side Python scalar / nested list (for messages and summaries only)."""
        return x.tolist() if hasattr(x, "tolist") else x

    def random_normal(self, like: Any, seed: int) -> Any:
        """Standard normal samples shaped and typed like ``like`` (Hutchinson probes)."""
        import numpy as np

        rng = np.random.default_rng(seed)
        host = rng.standard_normal(tuple(like.shape))
        return self.xp.asarray(host, dtype=like.dtype, device=self.device(like))

    # ----------------------------------------------------------------- trees
    def tree_flatten(self, tree: Any) -> tuple[list[Any], Any]:
        """Leaves of a state/args tree and what is needed to rebuild it.

        The default understands a single array and nested tuples (named tuples included),
        lists and dicts of arrays (keys of any types, in a deterministic order).
        """
        if isinstance(tree, dict):
            keys = sorted(tree, key=lambda k: (type(k).__name__, repr(k)))
            leaves, defs = self.tree_flatten(tuple(tree[k] for k in keys))
            return leaves, (dict, keys, defs)
        if isinstance(tree, (tuple, list)):
            leaves: list[Any] = []
            defs = []
            for item in tree:
                sub, d = self.tree_flatten(item)
                leaves.extend(sub)
                defs.append((len(sub), d))
            return leaves, (type(tree), defs)
        return [tree], None

    def tree_unflatten(self, treedef: Any, leaves: Sequence[Any]) -> Any:
        if treedef is None:
            return leaves[0]
        if treedef[0] is dict:
            _, keys, defs = treedef
            return dict(zip(keys, self.tree_unflatten(defs, leaves)))
        kind, defs = treedef
        out, i = [], 0
        for count, d in defs:
            out.append(self.tree_unflatten(d, leaves[i : i + count]))
            i += count
        if kind is not tuple and kind is not list and issubclass(kind, tuple) and hasattr(kind, "_fields"):
            return kind(*out)  # a named tuple takes its fields as arguments
        return kind(out)

    # ----------------------------------------------------------------- control flow
    def cond(self, pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
        """``true_fn() if pred else false_fn()``; traced backends use their conditional primitive."""
        return true_fn() if bool(pred) else false_fn()

    def switch(self, index: Any, branches: Sequence[Callable[[], Any]]) -> Any:
        """``branches[index]()``; traced backends use their multi-way conditional (one branch runs)."""
        return branches[int(index)]()

    def wrap_function(self, fn: Callable[[Any, Any], Any], z0: Any) -> Callable[[Any, Any], Any]:
        """The user's function as the solve calls it (once per solve, before anything runs).

        A backend may run it in a context the solver's own arithmetic must not see (torch:
        inside the caller's ``autocast``), or raise a typed error in a context it cannot
        solve in (torch: inside a ``torch.func`` transform)."""
        return fn

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Context for the forward solve: frameworks that record graphs switch recording off."""
        return contextlib.nullcontext()

    def while_loop(self, cond: Callable[[Any], Any], body: Callable[[Any], Any], carry: Any) -> Any:
        """Run ``carry = body(carry)`` while ``cond(carry)``; eager backends use Python."""
        while bool(cond(carry)):
            carry = body(carry)
        return carry

    # ----------------------------------------------------------------- autodiff
    @abc.abstractmethod
    def linearise(self, problem: Any, z: Any) -> Callable[[Any], Any]:
        """Return ``v -> J_F(z)^T v`` on flat ``(batch, n)`` arrays, reusing one linearisation."""

    def value_and_linearise(self, problem: Any, z: Any) -> tuple[Any, Callable[[Any], Any]]:
        """``(F(z), v -> J_F(z)^T v)`` from one evaluation where the framework allows it.

        A solver that needs both at the same point (adjoint Broyden: every step) saves an
        evaluation of ``F`` over :meth:`linearise` after ``F``.
        """
        return problem.F(z), self.linearise(problem, z)

    def vjp_at(self, problem: Any, z: Any, v: Any, create_graph: bool = False) -> Any:
        """``J_F(z)^T v`` for a one-off point (adjoint Broyden, Jacobian regularisation).

        With ``create_graph=True`` an autodiff backend keeps the result differentiable with
        respect to the parameters of ``F`` (for penalties added to the loss).
        """
        return self.linearise(problem, z)(v)

    def jacobian_penalty(self, problem: Any, z: Any, seed: int) -> Any:
        """``||e^T J_F(z)||^2 / n`` per sample for a standard normal probe ``e`` (Hutchinson).

        Differentiable with respect to the parameters of ``F`` on autodiff backends. A backend
        that recorded a graph of ``F`` at ``z`` (in :meth:`attach`) may reuse it here.
        """
        xp = self.xp
        jt = self.vjp_at(problem, self.stop_gradient(z), self.random_normal(z, seed), create_graph=True)
        return xp.sum(jt * jt, axis=-1) / problem.layout.n

    def attach(
        self, problem: Any, z_star: Any, backward: Callable[..., Any], with_jacobian: bool = True
    ) -> tuple[Any, Any]:
        """Connect the solution to the framework's autodiff.

        ``backward(g_flat, lin=None) -> u_flat`` maps the incoming cotangent ``dL/dz*`` to the
        vector ``u`` whose VJP through ``F(z*, args)`` gives the parameter gradients; ``lin``
        is an optional ready-made ``v -> J^T v`` at ``z*`` (otherwise :meth:`linearise` builds it).
        ``with_jacobian=False`` says the estimator will not ask for ``J^T v`` (JFB): a backend
        may then skip recording what those products need. Returns the
        user-facing solution (state structure) and an optional ``vjp(g) -> dL/dargs`` callable
        for backends without autodiff (``None`` otherwise).
        """
        from ._errors import PluginError

        raise PluginError(
            f"backend {self.name!r} implements neither attach() nor solve_implicit(): "
            "a backend must connect solutions to its framework's autodiff through one of them"
        )

    def solve_implicit(
        self,
        problem: Any,
        z0: Any,
        forward: Callable[[Any, Any], Any],
        make_backward: Callable[[Any, Any, Any], Callable[..., Any]],
        with_jacobian: bool = True,
        make_tangent: Callable[[Any], Callable[[Any, Any], Any]] | None = None,
    ) -> tuple[Any, Any]:
        """Run the forward solve and connect its solution to the framework's autodiff.

        ``forward(problem, z0) -> SolveResult``; ``make_backward(problem, result, info,
        estimator=None)`` gives the ``backward(g_flat, lin=None) -> u`` of :meth:`attach`
        (``info`` receives the backward solve's report, ``None`` where it cannot, e.g. inside a
        trace; ``estimator`` overrides the user's choice, e.g. exact IFT for higher orders).
        ``make_tangent(problem)`` gives ``tangent(jvp, b) -> v`` solving ``(I - J) v = b`` for
        forward-mode derivatives (``jvp(v) = J v``), for frameworks that have forward mode. The
        default solves under :meth:`forward_context` and then calls :meth:`attach`; a
        functional framework (JAX) runs the solve inside its custom-derivative rule instead.
        Returns ``(solution in the state's structure, SolveInfo)``.
        """
        with self.forward_context():
            result = forward(problem, z0)
        info = result.info
        z_out, info.vjp = self.attach(problem, result.z, make_backward(problem, result, info), with_jacobian)
        return z_out, info

    def report(self, info: Any, on_fail: str, stage: str = "forward") -> None:
        """Warn or raise per ``on_fail`` when samples failed; traced backends defer to run time."""
        from ._info import report

        report(info, on_fail, stage)

    def accepts(self, x: Any) -> bool:
        """Whether an array of another library may appear in ``args`` (JAX takes NumPy arrays)."""
        return False

    def all_finite(self, x: Any) -> bool | None:
        """Whether every entry of ``x`` is finite; ``None`` when it cannot be known here (traced)."""
        if math.prod(x.shape) == 0:
            return True
        view = self.host_view(x)
        if view is not None:  # (NumPy's isfinite-all is one pass: 4x faster than torch's |x|.max())
            return bool(np.isfinite(view).all())
        # (|x|'s largest entry is NaN or Inf exactly when some entry is: two passes without
        # warnings, where torch's isfinite runs several kernels)
        return bool(self.xp.max(self.xp.abs(x)) < float("inf"))

    def __repr__(self) -> str:
        return f"<backend {self.name!r}>"


def requirements_found(backend: Backend) -> tuple[bool, str]:
    """Whether every module in ``backend.requires`` can be found, without importing any.

    ``(True, "")`` or ``(False, reason)``; cheap enough for listing plugins.
    """
    for module in backend.requires:
        if module in sys.modules:
            continue
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            hint = f"; {backend.install_hint}" if backend.install_hint else ""
            return False, f"{module} is not installed{hint}"
    return True, ""
