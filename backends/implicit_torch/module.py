"""``DEQ``: an implicit layer as a ``torch.nn.Module``."""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_leaves, tree_map

import implicit_core as ic
from implicit_core import ConfigurationError, GradientEstimator, SolveInfo, Solver
from implicit_core.plugin import check_positive_int

#: ``fixed_point`` options that are not solver/estimator options.
_CALL_OPTIONS = ("trace", "divergence", "higher_order", "batched")


class DEQ(torch.nn.Module):
    """A deep equilibrium layer: ``forward(x)`` returns ``z*`` with ``z* = cell(z*, x)``.

    The forward pass solves the fixed point per sample without recording a graph; the
    backward pass applies the chosen gradient estimator (``ift``: ``u = g + J^T u``, then
    ``dL/dθ = u^T ∂cell/∂θ``), so gradients reach ``x`` and every parameter of ``cell``.

    Args:
        cell: ``cell(z, x) -> z``; an ``nn.Module`` is registered as a submodule, so its
            parameters belong to this layer. ``z`` may be a tensor or a tuple of tensors.
        solver: a registered name or a ``Solver`` instance (see ``implicit-core plugins``).
        gradient: a registered name or a ``GradientEstimator`` instance.
        tol: the stopping tolerance on each sample's residual.
        max_iter: the most solver steps.
        stop_mode: ``"abs"`` or ``"rel"`` residuals, as in :func:`implicit_core.fixed_point`.
        on_fail: ``"warn"`` | ``"raise"`` | ``"ignore"`` when some samples do not converge.
        state_shape: per-sample shape of ``z`` (a tuple, or a tuple of tuples for tuple
            states); with it, ``z0`` defaults to zeros. Without it (and without ``init``) the
            default ``z0`` is ``zeros_like(x)``.
        init: ``init(x) -> z0``, a learned or custom initial state (overrides ``state_shape``).
        jac_reg: when ``True``, a training-mode forward also computes ``self.jac_loss``, the
            Hutchinson estimate of ``||∂cell/∂z||_F^2 / n`` at ``z*`` averaged over the batch
            (Bai et al., 2021), differentiable w.r.t. the parameters: add
            ``gamma * deq.jac_loss`` to the loss. It is taken from the graph of the cell at
            ``z*`` that the layer records for its backward anyway (``jac_reg=True`` of
            :func:`implicit_core.fixed_point`): no second evaluation of the cell.
        jac_samples: estimate the penalty on this many samples of the batch, drawn at random
            each call (an unbiased estimate of the same batch mean): its double-backward graph
            then costs that fraction of the batch's, for a noisier estimate. A transformer DEQ
            (32 windows, penalty on 8): one training step's peak memory 16.4 -> 12.1 MB.
        **options: solver/estimator options (``m=5``, ``k=5``, ...), ``trace``, ``divergence``,
            ``higher_order=True`` (second derivatives: ``create_graph=True`` through the layer)
            and ``batched=False`` (the whole state is one system).

    After each call ``self.info`` holds the :class:`implicit_core.SolveInfo` (per-sample steps,
    residuals, which samples failed; ``info.backward`` after ``backward()``). ``info`` and
    ``jac_loss`` belong to the calling thread: a layer shared by threads (a server, data-loader
    workers) gives each thread the diagnostics of its own last call. ``jac_loss`` is released
    once it has been backpropagated, so the layer never keeps a step's graph alive; a copy of the
    layer (``copy.deepcopy``, EMA and best-model copies) starts with no diagnostics.

    Gradients are available in ``.eval()`` as in ``.train()``: the mode changes nothing
    about the solve. Under ``torch.no_grad()`` only the forward solve runs.
    """

    @property
    def info(self) -> SolveInfo | None:
        """The :class:`~implicit_core.SolveInfo` of this thread's last forward pass."""
        return self._diagnostics.get("info")

    @property
    def jac_loss(self) -> torch.Tensor | None:
        """This thread's last Jacobian-regularisation term (``jac_reg=True``, training mode)."""
        return self._diagnostics.get("jac_loss")

    def __init__(
        self,
        cell: Callable[[Any, torch.Tensor], Any],
        *,
        solver: str | Solver = "anderson",
        gradient: str | GradientEstimator = "ift",
        tol: float = 1e-4,
        max_iter: int = 50,
        stop_mode: str = "abs",
        on_fail: str = "warn",
        state_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
        init: Callable[[torch.Tensor], Any] | None = None,
        jac_reg: bool = False,
        jac_samples: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        ic.check_stopping_rule(tol, max_iter, stop_mode, on_fail)  # at construction, not at the first call
        if not callable(cell):
            raise ConfigurationError(f"cell must be callable cell(z, x) -> z, got {type(cell).__name__}")
        if init is not None and not callable(init):
            raise ConfigurationError("init must be a callable init(x) -> z0")
        self.cell = cell
        self.init = init
        self.state_shape = _normalise_shape(state_shape)
        self.call_options = {k: options.pop(k) for k in _CALL_OPTIONS if k in options}
        self.solver, self.gradient = ic.resolve_plugins(solver, gradient, **options)
        self.tol, self.max_iter, self.stop_mode, self.on_fail = tol, max_iter, stop_mode, on_fail
        self.jac_reg = bool(jac_reg)
        if jac_samples is not None:
            jac_samples = check_positive_int("DEQ", "jac_samples", jac_samples)
            if self.call_options.get("batched") is False:
                raise ConfigurationError(
                    "DEQ: jac_samples draws samples from the batch, which batched=False does not have"
                )
        self.jac_samples = jac_samples
        self._diagnostics = _PerThread()

    def _f(self, z: Any, x: torch.Tensor) -> Any:
        return self.cell(z, x)

    def initial_state(self, x: torch.Tensor) -> Any:
        """``z0`` for input ``x`` when ``forward`` is not given one."""
        if self.init is not None:
            return self.init(x)
        if self.state_shape is None:
            return torch.zeros_like(x)
        batch = x.shape[0]
        if isinstance(self.state_shape[0], tuple):
            return tuple(x.new_zeros((batch, *s)) for s in self.state_shape)
        return x.new_zeros((batch, *self.state_shape))

    def forward(self, x: torch.Tensor, z0: Any = None) -> Any:
        guessed = z0 is None and self.init is None and self.state_shape is None
        if z0 is None:
            z0 = self.initial_state(x)
        jac_reg = self.jac_reg and self.training and torch.is_grad_enabled()
        seed = int(torch.randint(0, 2**31 - 1, ())) if jac_reg else 0  # follows torch.manual_seed
        whole = jac_reg and (self.jac_samples is None or self.jac_samples >= _batch_size(z0))
        jac = {"jac_reg": True, "jac_seed": seed} if whole else {}
        try:
            z, info = ic.fixed_point(
                self._f, z0, x, solver=self.solver, gradient=self.gradient, tol=self.tol,
                max_iter=self.max_iter, stop_mode=self.stop_mode, on_fail=self.on_fail, **self.call_options, **jac,
            )
        except (ic.ShapeError, ic.UserFunctionError) as exc:
            if not guessed:
                raise
            raise type(exc)(
                f"{exc} — the layer started from zeros_like(x), of shape {tuple(x.shape)}, because it was "
                "given no state_shape: pass DEQ(..., state_shape=(n,)) with the cell's per-sample state "
                "shape, or init= / z0="
            ).with_traceback(None) from exc.__cause__
        jac_loss = None
        if whole:
            jac_loss = info.jac_loss.mean()
        elif jac_reg:  # a random subset of the batch, with a graph of its own
            pick = torch.randperm(_batch_size(z0), device=_first_leaf(z0).device)[: self.jac_samples]
            subset = functools.partial(tree_map, lambda a: a[pick] if isinstance(a, torch.Tensor) else a)
            jac_loss = ic.jacobian_regularisation(self._f, subset(z), subset(x), seed=seed).mean()
        self._diagnostics.set(info=info, jac_loss=jac_loss)
        return z

    def spectral_radius(self, x: torch.Tensor, z: Any = None, n_iter: int = 30) -> torch.Tensor:
        """Power-iteration estimate of ``ρ(∂cell/∂z)`` per sample at ``z`` (default: ``z*`` for ``x``).

        Values near or above 1 explain slow or failed solves; the forward's ``info`` shows
        the consequence, this shows the cause.
        """
        if z is None:
            last = self._diagnostics.snapshot()
            with torch.no_grad():
                z = self.forward(x)
            self._diagnostics.restore(last)
        return ic.spectral_radius(self._f, z, x, n_iter=n_iter)

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver.name!r}, gradient={self.gradient.name!r}, tol={self.tol}, "
            f"max_iter={self.max_iter}, stop_mode={self.stop_mode!r}, on_fail={self.on_fail!r}"
        )


def _normalise_shape(shape: Any) -> tuple | None:
    if shape is None:
        return None
    if isinstance(shape, int):
        return (shape,)
    try:
        items = tuple(shape)
    except TypeError:
        items = None
    if items and all(isinstance(s, int) and s > 0 for s in items):
        return items
    if items and all(
        isinstance(s, (tuple, list)) and s and all(isinstance(d, int) and d > 0 for d in s) for s in items
    ):
        return tuple(tuple(s) for s in items)
    raise ConfigurationError(
        f"state_shape must be a per-sample shape like (64,) or, for tuple states, ((64,), (8, 8)); got {shape!r}"
    )


class _PerThread:
    """Diagnostics of the last call, one slot per thread; a copy starts empty."""

    def __init__(self) -> None:
        self._slots: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Any:
        return self._slots.get(threading.get_ident(), {}).get(name)

    def set(self, **values: Any) -> None:
        ident = threading.get_ident()
        jac_loss = values.get("jac_loss")
        if jac_loss is not None and jac_loss.requires_grad:
            # Dropped once backpropagated: the module must not keep the step's graph alive.
            jac_loss.register_hook(lambda grad, ident=ident: self._drop(ident, "jac_loss"))
        with self._lock:
            live = {t.ident for t in threading.enumerate()}
            self._slots = {k: v for k, v in self._slots.items() if k in live}  # finished threads
            self._slots[ident] = values

    def _drop(self, ident: int, name: str) -> None:
        with self._lock:
            self._slots.get(ident, {}).pop(name, None)

    def snapshot(self) -> dict[str, Any]:
        return dict(self._slots.get(threading.get_ident(), {}))

    def restore(self, values: dict[str, Any]) -> None:
        with self._lock:
            self._slots[threading.get_ident()] = values

    def __deepcopy__(self, memo: dict) -> "_PerThread":
        return _PerThread()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _first_leaf(z: Any) -> torch.Tensor:
    return tree_leaves(z)[0]


def _batch_size(z: Any) -> int:
    return int(_first_leaf(z).shape[0])
