"""Base classes for solver and gradient-estimator plugins.

A solver is a small object with ``init`` / ``step`` over a dict of per-sample arrays of fixed
shapes, so that the one generic loop in :mod:`implicit_core._loop` runs it eagerly or under a
tracing compiler alike.

Options are declared, not guessed: a plugin class is a :func:`dataclasses.dataclass` whose
fields are its options (validated in ``__post_init__``), as optimistix's solvers are equinox
modules. :meth:`option_names` lists the fields, so unknown keys are rejected with the list of
known ones, and an estimator without options simply has no fields. A renamed option stays
accepted for one release through :attr:`deprecated_options`.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import math
import numbers
import warnings

import array_api_compat
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from ._errors import ConfigurationError, ImplicitError, PluginError

if TYPE_CHECKING:  # pragma: no cover
    from ._gradient_context import BackwardContext
    from ._linear import InverseJacobian
    from ._problem import Problem


class _Configurable:
    name: ClassVar[str] = ""
    #: Renamed options still accepted (with a ``DeprecationWarning``): ``{old: new}``.
    deprecated_options: ClassVar[dict[str, str]] = {}

    @classmethod
    def option_names(cls) -> list[str]:
        """The declared options: the dataclass fields set through the constructor."""
        if not dataclasses.is_dataclass(cls):
            warnings.warn(
                f"{cls.__qualname__}: declare the options of a plugin as dataclass fields "
                "(@dataclasses.dataclass); reading them off __init__ is deprecated",
                DeprecationWarning, stacklevel=3,
            )
        return cls._option_names()

    @classmethod
    def _option_names(cls) -> list[str]:
        if dataclasses.is_dataclass(cls):
            return [f.name for f in dataclasses.fields(cls) if f.init]
        # A plain class (written before options were declared): its __init__ keywords.
        params = inspect.signature(cls.__init__).parameters
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p for p, spec in params.items() if p != "self" and spec.kind in keyword]

    @classmethod
    def upgrade_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with deprecated names replaced by the current ones (warning once each)."""
        out = dict(options)
        for old, new in cls.deprecated_options.items():
            if old in out:
                if new in out:
                    raise ConfigurationError(f"{cls.name}: pass {new!r} only ({old!r} is its old name)")
                warnings.warn(f"{cls.name}: option {old!r} is now called {new!r}; the old name will be removed",
                              DeprecationWarning, stacklevel=4)
                out[new] = out.pop(old)
        return out

    def options(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._option_names() if hasattr(self, key)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


class Solver(_Configurable, abc.ABC):
    """A fixed-point / root solver over flat ``(batch, n)`` states.

    The state is a dict of arrays whose first axis is the batch; it must contain ``"z"``
    (the current iterate) and ``"fz"`` (``F(z)``, so that each step costs one evaluation).
    The core loop measures residuals, freezes converged samples' results, keeps the best
    iterate and decides when to stop, identically for every solver.
    """

    #: True when :meth:`inverse_jacobian` returns a usable estimate (SHINE, Broyden reuse).
    provides_inverse: ClassVar[bool] = False
    #: State entries the solver writes only through :func:`write_row` (an optimisation hint,
    #: not needed for correctness): when a step makes a sample non-finite, the loop masks its
    #: rows back everywhere else. On functional backends (JAX), where that mask cannot be
    #: skipped at run time, naming the histories here saves a ``where`` over them per step.
    row_masked: ClassVar[tuple[str, ...]] = ()
    #: State entries the loop measures a step on and then drops instead of carrying them to
    #: the next step (their memory freed): ``("z", "fz")`` for a solver whose step reads neither
    #: (Anderson: its histories hold what it needs). ``g`` is always dropped. The loop keeps
    #: each sample's best ``z`` itself.
    measured_only: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def init(self, problem: "Problem", z0: Any) -> dict[str, Any]:
        """Initial state from ``z0`` (evaluates ``F(z0)`` once).

        The state is a dict holding at least the iterate ``z`` and ``fz = F(z)``, flat
        ``(batch, n)``. A solver that computes the residual ``g = fz - z`` for itself may hand
        it over as ``g`` (exactly ``fz - z``, for the ``z`` and ``fz`` beside it): the loop
        then measures convergence on it instead of computing it again, and drops it from the
        state it carries (keep it under another name if the next step needs it).
        """

    @abc.abstractmethod
    def step(self, problem: "Problem", state: dict[str, Any], k: Any, active: Any) -> dict[str, Any]:
        """One iteration.

        ``k`` is the number of steps taken so far (0-based, the same for every sample): a 0-d
        ``int32`` array of the problem's namespace on every backend, traced under ``jit``. Use
        it in array arithmetic (``k % m``, ``slots < k + 1``, as an index for
        :func:`write_row`), never in Python control flow (``if k == 0``: use
        ``problem.backend.cond``); cast it before mixing it with the state
        (``xp.astype(k, z.dtype)``), or NumPy promotes a ``float32`` state to ``float64``.
        ``active`` is the ``(batch,)`` mask of samples still iterating.

        Histories (buffers with a slot per step) are written with :func:`write_row`, which
        changes only the rows of active samples, so an inverse estimate read after the solve
        is the one each sample had when it stopped; :func:`with_history` runs products over
        the slots written so far (on every backend, under ``jit`` too). A stopped sample's
        other rows may go on changing: the loop keeps its result, and masks back only a step
        that made a sample non-finite.
        """

    def inverse_jacobian(self, problem: "Problem", state: dict[str, Any]) -> "InverseJacobian":
        """Estimate of ``(dg/dz)^-1`` with ``g = F - I``; only for ``provides_inverse`` solvers."""
        raise ConfigurationError(
            f"solver {self.name!r} keeps no inverse-Jacobian estimate; "
            "use a quasi-Newton solver such as 'broyden'"
        )


class GradientEstimator(_Configurable, abc.ABC):
    """Turns ``g = dL/dz*`` into ``u``; parameter gradients are then ``u^T dF/dargs``.

    The exact answer solves ``u = g + J^T u`` with ``J = dF/dz`` at ``z*``.
    """

    #: True when the estimator reads the forward solver's inverse-Jacobian estimate
    #: (``ctx.inverse()``). Otherwise the forward solver's state (e.g. Broyden's buffers) is
    #: released right after the forward solve instead of being kept until the backward pass.
    requires_inverse: ClassVar[bool] = False

    @property
    def uses_jacobian(self) -> bool:
        """Whether :meth:`estimate` calls ``ctx.JT`` (VJPs at ``z*``).

        Autodiff backends record ``F(z*)`` differentiably in ``z`` only when it does, so an
        estimator that never asks (JFB) pays for no ``z``-gradient in the backward pass.
        ``ctx.JT`` still works if it is called anyway: it then re-linearises.
        """
        return True

    @abc.abstractmethod
    def estimate(self, ctx: "BackwardContext") -> Any:
        """Return ``u`` as a flat ``(batch, n)`` array."""


def check_positive_int(owner: str, key: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int`` (NumPy integers accepted), or a :class:`ConfigurationError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigurationError(f"{owner}: {key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_range(owner: str, key: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a ``float`` in ``(low, high]`` / ``[low, high]``, or a :class:`ConfigurationError`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigurationError(f"{owner}: {key} must be a number in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def check_choice(owner: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        from ._errors import did_you_mean

        raise ConfigurationError(f"{owner}: {key} must be one of {choices}, got {value!r}.{did_you_mean(str(value), choices)}")
    return value


def write_row(problem: "Problem", buffer: Any, slot: Any, value: Any, active: Any, axis: int = 1) -> Any:
    """``buffer[:, slot] = value`` (``slot`` on ``axis``) for active samples only, in place where
    the backend allows; ``slot`` is an int or a 0-d integer array (e.g. ``k % m``).

    ``active`` is the ``(batch,)`` mask of the samples to write, or ``None`` for all of them (a
    solver writing several histories per step can ask ``problem.backend.all_on_host(active)``
    once instead of once per write). ``buffer`` may be a history kept in blocks (a tuple, see
    :func:`history_block_widths`): ``slot`` then counts across the blocks, and the block
    holding it is written.
    """
    xp = problem.xp
    if not isinstance(slot, int):
        # A slot readable for free (an eager CPU array) indexes as an int: a basic index
        # writes a view in one operation, where an array index takes the advanced-indexing path.
        host = problem.backend.host_view(slot)
        if host is not None:
            slot = int(host)
    if active is None and not isinstance(slot, int) and isinstance(buffer, tuple):
        active = xp.ones((value.shape[0],), dtype=xp.bool, device=problem.backend.device(value))
    if isinstance(buffer, tuple):
        blocks, start = [], 0
        for block in buffer:
            width = int(block.shape[axis])
            if isinstance(slot, int):
                inside = start <= slot < start + width
                blocks.append(write_row(problem, block, slot - start, value, active, axis) if inside else block)
            else:  # (a traced slot: every block writes one row, unchanged outside the one holding it)
                inside = (slot >= start) & (slot < start + width)
                local = xp.clip(slot - start, 0, width - 1)
                blocks.append(write_row(problem, block, local, value, active & inside, axis))
            start += width
        return tuple(blocks)
    index = (slice(None),) * axis + (slot, ...)
    if active is None or problem.backend.all_on_host(active):
        return problem.backend.at_set(buffer, index, value)
    mask = xp.reshape(active, (active.shape[0],) + (1,) * (value.ndim - 1))
    return problem.backend.at_set_where(buffer, axis, slot, value, mask)


def call_plugin(plugin: Any, method: str, *args: Any) -> Any:
    """``plugin.method(*args)``; a bug in the plugin becomes a :class:`PluginError` naming it.

    The library's own typed errors (the user's function failing, bad shapes) pass through
    unchanged: only what the plugin's code raised by itself is attributed to the plugin.
    """
    try:
        return getattr(plugin, method)(*args)
    except ImplicitError:
        raise
    except Exception as exc:
        if isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__:
            raise  # the machine ran out of memory: nobody's bug, reported as what it is
        raise PluginError(
            f"{_describe(plugin)} raised {type(exc).__name__} in {method}(): {exc}. "
            "This is a bug in that plugin; other solvers and estimators are unaffected."
        ) from exc


def check_solver_state(solver: Any, method: str, state: Any, like: Any) -> Any:
    """A solver's state must be a dict with ``z`` and ``fz`` (and, optionally, ``g``) shaped and
    typed like the iterate."""
    if not isinstance(state, dict) or "z" not in state or "fz" not in state:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise PluginError(f"{_describe(solver)}: {method}() must return a dict with 'z' and 'fz', got {got}")
    for key in ("z", "fz", "g"):
        if key in state:
            check_like(solver, f"{method}()[{key!r}]", state[key], like)
    return state


def check_like(plugin: Any, what: str, value: Any, like: Any) -> Any:
    """``value`` must be an array of ``like``'s library, shape, dtype and device."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and type(value) is not type(like):
        try:
            same_library = array_api_compat.array_namespace(value) is array_api_compat.array_namespace(like)
        except TypeError:
            same_library = False
        if not same_library:
            raise PluginError(
                f"{_describe(plugin)}: {what} is a {type(value).__module__}.{type(value).__name__}, but the "
                f"solve runs on {type(like).__module__}.{type(like).__name__} arrays: compute with the "
                "problem's namespace (problem.xp)"
            )
    if shape is None or tuple(shape) != tuple(like.shape) or dtype != like.dtype:
        found = f"shape {tuple(shape)} and dtype {dtype}" if shape is not None else f"a {type(value).__name__}"
        raise PluginError(
            f"{_describe(plugin)}: {what} has {found}; expected shape {tuple(like.shape)} and dtype "
            f"{like.dtype} (flat (batch, n), the solve's dtype)"
        )
    try:  # placement is known for eager arrays (a traced one may not say)
        device, other = like.device, value.device
        moved = device is not None and not callable(device) and other != device
    except Exception:
        moved = False
    if moved:
        raise PluginError(
            f"{_describe(plugin)}: {what} is on device {value.device}, but the solve runs on {device}: "
            "allocate with device=problem.backend.device(z)"
        )
    return value


def _describe(plugin: Any) -> str:
    kind = "solver" if isinstance(plugin, Solver) else "gradient estimator"
    return f"{kind} {getattr(plugin, 'name', '?')!r} ({type(plugin).__module__}.{type(plugin).__qualname__})"


def history_columns(problem: "Problem", buffer: Any, count: Any, copy: bool = False) -> Any:
    """The slots ``[:, :count]`` of a ``(batch, m, ...)`` history that have been written.

    Where shapes may vary (eager backends) the buffer is sliced, so products with it cost
    what was written rather than all ``m`` slots; under a trace (fixed shapes) the whole
    buffer is returned, whose unwritten slots must therefore be zeros. ``count`` is an int or
    an integer array (its largest entry is used); ``copy=True`` copies a slice so that the
    full buffer can be freed (for an estimate kept until the backward pass).
    """
    if problem.backend.traced:
        return buffer
    xp = problem.xp
    if not isinstance(count, int):
        count = int(xp.max(count)) if getattr(count, "ndim", 0) else int(count)
    m = int(buffer.shape[1])
    if count >= m:
        return buffer
    part = buffer[:, : max(count, 0), ...]
    return xp.asarray(part, copy=True) if copy else part


#: Histories with fewer entries than this are read whole under a trace (see with_history).
_SMALL_HISTORY = 2**16


def _history_sizes(m: int) -> list[int]:
    """``8, 16, 32, ..., m``: the column counts a traced history is read in."""
    return sorted({min(2**i, m) for i in range(3, max(m - 1, 1).bit_length() + 1)} | {m})


def history_block_widths(problem: "Problem", shape: Sequence[int]) -> tuple[int, ...]:
    """The widths of the blocks a ``(batch, m, ...)`` history of this ``shape`` is best kept in.

    Under a trace: ``8, 8, 16, 32, ...`` (the last one cut at ``m``), so that the first
    ``8, 16, 32, ..., m`` columns are whole blocks, which :func:`with_history` reads without
    slicing (XLA copies a slice of the middle axis before a product: that copy, per step, cost
    more than the product). One block of ``m`` eagerly (slices are views there) and for a
    history of fewer than 65536 entries (read whole). Keep the blocks as a tuple of
    ``(batch, width, ...)`` arrays; :func:`write_row` and :func:`with_history` take it.
    """
    m = int(shape[1])
    if not problem.backend.traced or math.prod(shape) < _SMALL_HISTORY:
        return (m,)
    sizes = _history_sizes(m)
    return tuple(b - a for a, b in zip([0, *sizes[:-1]], sizes))


def with_history(problem: "Problem", buffers: Sequence[Any], count: Any, fn: Callable[..., Any]) -> Any:
    """``fn(*slices)`` on the slots ``[:, :count]`` of ``(batch, m, ...)`` histories written so far.

    Products with the histories then cost what was written, not all ``m`` slots. Eagerly the
    slices are exact (:func:`history_columns`); under a trace, where shapes are fixed, ``fn``
    is traced once per size in ``8, 16, 32, ..., m`` and the smallest size holding ``count``
    slots runs (``Backend.switch``): a solve pays at most twice what it uses, or 8 slots
    (smaller sizes would cost more compile time than they save); a history of fewer than
    65536 entries is read whole, which costs less than the choice. The unwritten slots inside
    that size must be zeros. ``count`` is an int or a 0-d integer array (the same for every
    sample); ``fn`` returns arrays whose shapes do not depend on the size.

    Histories kept in blocks (tuples, :func:`history_block_widths`) are read the same way
    without slicing: ``fn`` then receives, for each history, the tuple of its first blocks.
    """
    backend = problem.backend
    blocked = isinstance(buffers[0], tuple)
    if blocked:
        if len(buffers[0]) == 1 or not backend.traced:
            return fn(*buffers)
        widths = [int(block.shape[1]) for block in buffers[0]]
        sizes = [sum(widths[: i + 1]) for i in range(len(widths))]
    else:
        if not backend.traced:
            return fn(*(history_columns(problem, b, count) for b in buffers))
        m = int(buffers[0].shape[1])
        if math.prod(buffers[0].shape) < _SMALL_HISTORY:
            return fn(*buffers)  # a pass over a small history costs less than choosing its size
        sizes = _history_sizes(m)
    xp = problem.xp
    # the index of the smallest size >= count: how many sizes are smaller than count
    index = sum(xp.astype(count > s, xp.int32) for s in sizes[:-1]) if len(sizes) > 1 else 0

    def branch(i: int) -> Callable[[], Any]:
        if blocked:
            return lambda: fn(*(b[: i + 1] for b in buffers))
        return lambda: fn(*(b[:, : sizes[i], ...] for b in buffers))

    return backend.switch(index, [branch(i) for i in range(len(sizes))])
