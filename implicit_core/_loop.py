"""The one solve loop every solver runs in, on every backend.

Per sample: measure the residual after each step, keep the lowest-residual iterate, freeze
samples once they converged, stop those whose values became non-finite or blew up, and
count steps. The loop body uses only ``xp`` and the backend's ``while_loop``/``at_set``, so
it runs eagerly (NumPy, CuPy, PyTorch) and under ``lax.while_loop`` (JAX) unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._errors import ConfigurationError
from ._info import CONVERGED, DIVERGED, MAX_ITER, NON_FINITE, RECHECK_FAILED, RUNNING, SolveInfo
from ._ops import bnorm, host_select_rows, select
from ._plugin_base import Solver, call_plugin, check_solver_state
from ._problem import Problem

STOP_MODES = ("abs", "rel")
_INF = float("inf")
#: Step counters are int32 on every backend: a larger max_iter can never be reached anyway.
MAX_STEPS = 2**31 - 2
#: The largest residual trace a traced (fixed-shape) loop preallocates.
TRACE_LIMIT = 2**30


@dataclass
class SolveResult:
    z: Any  # lowest-residual iterate, flat (batch, n)
    info: SolveInfo
    state: dict[str, Any]  # the solver's final (frozen) state
    solver: Solver
    #: the inverse-Jacobian estimate, when it was taken out of ``state`` early (eager backends)
    inverse: Any = None


def residuals(problem: Problem, state: dict[str, Any]) -> tuple[Any, Any]:
    """Absolute ``||F(z) - z||`` and relative ``||F(z) - z|| / (||F(z)|| + eps)``, per sample,
    of a state holding ``z`` and ``fz = F(z)`` (and the solver's ``g``, see :func:`_residual`)."""
    xp = problem.xp
    absolute = bnorm(xp, _residual(state))
    return absolute, absolute / (bnorm(xp, state["fz"]) + problem.eps)


def _residual(state: dict[str, Any]) -> Any:
    """``F(z) - z``: the solver's own ``g`` when its state hands one over (a pass saved)."""
    g = state.get("g")
    return state["fz"] - state["z"] if g is None else g


def _measured(state: dict[str, Any], dropped: tuple[str, ...]) -> dict[str, Any]:
    """The state without what was only there to be measured: the residual ``g`` it handed over
    and the solver's ``measured_only`` entries are not carried (their memory is freed; a solver
    that needs one next step keeps it under a name of its own)."""
    return {key: value for key, value in state.items() if key not in dropped}


def solve(
    problem: Problem,
    solver: Solver,
    z0: Any,
    *,
    tol: float,
    max_iter: int,
    stop_mode: str = "abs",
    trace: bool = False,
    divergence: float | None = 1e6,
    verify: bool = True,
) -> SolveResult:
    """Run ``solver`` from the flat ``z0`` until every sample stopped or ``max_iter`` steps.

    With ``verify`` (and more than one sample), ``F`` is evaluated once more on the whole
    returned batch: the residuals reported are those of the returned iterate as the batch
    stands at the end, and a sample that met ``tol`` while its batch-mates were still moving
    but fails it now (samples that read each other) gets status ``RECHECK_FAILED``.
    """
    xp, backend = problem.xp, problem.backend
    batch = problem.layout.batch
    max_iter = min(int(max_iter), MAX_STEPS)

    def measure(state: dict[str, Any]) -> tuple[Any, Any, Any]:
        a, r = residuals(problem, state)
        return (a if stop_mode == "abs" else r), a, r

    # The relative residual costs a pass over F(z) per step; with an absolute stopping rule it
    # is only reported, and the re-check below measures it on the returned iterate anyway.
    rechecked = verify and batch > 1
    if stop_mode == "abs" and rechecked:
        def measure_step(state: dict[str, Any]) -> tuple[Any, Any, Any]:
            a = bnorm(xp, _residual(state))
            return a, a, a
    else:
        measure_step = measure

    problem.max_steps = max_iter
    state = check_solver_state(solver, "init", call_plugin(solver, "init", problem, z0), z0)
    res, res_abs, res_rel = measure(state)
    dropped = ("g", *solver.measured_only)
    z = state["z"]
    state = _measured(state, dropped)
    book = _Bookkeeping(backend, res)
    bx = book.xp  # the per-sample bookkeeping's namespace: NumPy for eager CPU arrays, else xp
    res, res_abs, res_rel = book.view(res), book.view(res_abs), book.view(res_rel)
    finite = bx.isfinite(res)
    int_dtype = xp.int32
    running = bx.full(res.shape, RUNNING, dtype=bx.int32, device=book.device)
    status = bx.where(finite, bx.where(res <= tol, CONVERGED, running), NON_FINITE)
    status = bx.astype(status, bx.int32)
    # Blow-up is judged against the first residual (or tol, whichever is larger).
    scale = bx.where(finite, bx.maximum(res, bx.full_like(res, tol)), bx.full_like(res, tol))
    carry: dict[str, Any] = {
        "state": state,
        # One counter type on every backend: a 0-d integer array beside the state (a traced
        # loop needs an array; the same type everywhere spares solvers an eager/traced branch).
        "k": xp.asarray(0, dtype=int_dtype, device=backend.device(z)),
        "status": status,
        "steps": bx.zeros_like(status),
        "best_z": z,
        "best_res": bx.where(finite, res, bx.full_like(res, float("inf"))),
        "best_abs": res_abs,
        "best_rel": res_rel,
    }
    rows: list[Any] = []  # eager backends: the trace grows by one row per step taken
    if trace and backend.traced:  # a fixed-shape loop needs its buffer up front
        size = (max_iter + 1) * batch * 8
        if size > TRACE_LIMIT:
            raise ConfigurationError(
                f"trace=True under {backend.name} preallocates (max_iter + 1) x batch residuals "
                f"({size / 2**20:.0f} MiB for max_iter={max_iter}): lower max_iter, or trace eagerly"
            )
        buffer = xp.full((max_iter + 1, batch), float("nan"), dtype=res.dtype, device=backend.device(res))
        carry["trace"] = backend.at_set(buffer, (0, ...), res_abs)
    elif trace:
        rows.append(res_abs)

    if book.on_host:  # (Python-side step count: no framework operation to decide on the loop)
        carry["taken"] = 0

        def cond(c: dict[str, Any]) -> Any:
            return c["taken"] < max_iter and bool(bx.any(c["status"] == RUNNING))
    else:
        def cond(c: dict[str, Any]) -> Any:
            return (c["k"] < max_iter) & xp.any(c["status"] == RUNNING)

    # With one residual measured per step (res, res_abs and res_rel the same array), only
    # best_res is tracked; best_abs and best_rel are filled from it after the loop.
    single = measure_step is not measure
    initial_abs = res_abs
    limit = None if divergence is None else divergence * scale

    def body(c: dict[str, Any]) -> dict[str, Any]:
        active = c["status"] == RUNNING
        new = call_plugin(solver, "step", problem, c["state"], c["k"], book.array(active))
        new = check_solver_state(solver, "step", new, z0)
        res, res_abs, res_rel = (book.view(r) for r in measure_step(new))
        z = new["z"]
        new = _measured(new, dropped)
        finite = res < _INF  # a norm: False exactly for NaN and Inf, in one kernel
        better = active & (res < c["best_res"])  # (a non-finite residual is never lower)
        # What this step's residual means for a running sample, as one status code.
        code = bx.where(res <= tol, CONVERGED, running)
        if limit is not None:
            code = bx.where(res > limit, DIVERGED, code)
        code = bx.where(finite, code, NON_FINITE)
        out = {
            # A non-finite step is not kept: the sample stays on its last finite state. A
            # stopped sample's result is frozen in best_z; the solver may go on computing its
            # rows (the batch is computed whole anyway), which spares a masked copy of the whole
            # state per step once the first sample has converged. Its histories stay frozen:
            # they are written for active samples only (write_row).
            "state": new if book.all(finite) else book.select(finite, new, c["state"], solver.row_masked),
            "k": c["k"] + 1,
            "status": bx.where(active, code, c["status"]),
            "steps": c["steps"] + bx.astype(active, bx.int32),
            "best_z": z if book.all(better) else book.select(better, z, c["best_z"]),
            "best_res": bx.where(better, res, c["best_res"]),
        }
        if not single:
            out["best_abs"] = bx.where(better, res_abs, c["best_abs"])
            out["best_rel"] = bx.where(better, res_rel, c["best_rel"])
        if book.on_host:
            out["taken"] = c["taken"] + 1
        if trace:
            row = bx.where(active & finite, res_abs, c["best_res"] if single else c["best_abs"])
            if backend.traced:
                out["trace"] = backend.at_set(c["trace"], (c["k"] + 1, ...), row)
            else:
                rows.append(row)
        return out

    if single:
        del carry["best_abs"], carry["best_rel"]
    # Handed over, not kept here: an eager loop frees each step's state (the first F(z)
    # included) once the next replaces it, instead of holding the first through the solve
    # (CPython 3.11 and later: a call takes over its arguments' references).
    del state, z
    handed = [carry]
    del carry
    carry = backend.while_loop(cond, body, handed.pop())
    if single:  # (a sample that never had a finite residual keeps its first one: NaN or Inf)
        carry["best_abs"] = bx.where(carry["best_res"] < _INF, carry["best_res"], initial_abs)
        carry["best_rel"] = carry["best_abs"]
    status = bx.where(carry["status"] == RUNNING, MAX_ITER, carry["status"])
    if rechecked:
        status = _recheck(problem, book, carry, status, tol, stop_mode, rel_known=not single)
    # (back to the backend's arrays for the report)
    status = xp.astype(book.array(status), int_dtype)
    for key in ("steps", "best_abs", "best_rel"):
        carry[key] = book.array(carry[key])
    trace_out = carry.get("trace")
    if trace and not backend.traced:
        trace_out = book.array(bx.stack(rows))
    info = SolveInfo(
        steps=carry["steps"],
        residual=carry["best_abs"],
        rel_residual=carry["best_rel"],
        converged=status == CONVERGED,
        status=status,
        solver=solver.name,
        trace=trace_out,
        to_python=backend.to_python,
    )
    return SolveResult(z=carry["best_z"], info=info, state=carry["state"], solver=solver)


class _Bookkeeping:
    """Where the loop keeps its per-sample bookkeeping (``(batch,)`` status, counts, residuals).

    In NumPy when the residuals have a free NumPy view (:meth:`Backend.host_view`: eager CPU
    arrays): a dozen operations per step on a few hundred numbers then cost microseconds
    instead of a framework's eager dispatch each (a fifth of a fixed-point step's time on
    torch at batch 512, n 256). Elsewhere (traced, device arrays) in the backend's own arrays.
    Masks go back to the backend's arrays (zero-copy) where the solver or the state needs them.
    """

    def __init__(self, backend: Any, like: Any) -> None:
        self.backend, self.like = backend, like
        self.on_host = backend.host_view(like) is not None
        if self.on_host:
            from array_api_compat import numpy as host_xp

            self.xp, self.device = host_xp, None
        else:
            self.xp, self.device = backend.xp, backend.device(like)

    def view(self, x: Any) -> Any:
        """A residual (backend array) in the bookkeeping's arrays."""
        return self.backend.host_view(x) if self.on_host else x

    def array(self, a: Any) -> Any:
        """A bookkeeping array as the backend's."""
        return self.backend.from_host(a, self.like) if self.on_host else a

    def all(self, mask: Any) -> bool:
        """Whether every entry of ``mask`` holds, where that is cheap to know (else ``False``)."""
        return bool(mask.all()) if self.on_host else self.backend.all_on_host(mask)

    def select(self, mask: Any, new: Any, old: Any, skip: tuple[str, ...] = ()) -> Any:
        """Per sample ``new`` where the bookkeeping ``mask`` holds, else ``old`` (arrays or
        dicts of them, see :func:`select`); on the host, rows are copied instead of a ``where``
        broadcast over them (:func:`host_select_rows`: 3x faster on large states)."""
        return select(self.backend.xp, mask, new, old, skip, rows=self._host_rows if self.on_host else None)

    def _host_rows(self, mask: Any, new: Any, old: Any) -> Any:
        a, b = self.backend.host_view(new), self.backend.host_view(old)
        if a is None or b is None or a.shape != b.shape:
            return select(self.backend.xp, self.array(mask), new, old)
        return self.backend.from_host(host_select_rows(mask, a, b), new)


def _recheck(problem: Problem, book: _Bookkeeping, carry: dict[str, Any], status: Any, tol: float, stop_mode: str,
             rel_known: bool = True) -> Any:
    """Re-measure the returned iterates on the whole batch (one evaluation of ``F``).

    For independent samples this reproduces the residuals the loop measured (up to the
    rounding of a batched evaluation, which the slack absorbs). For samples that depend on
    each other it does not: a sample frozen early has moved away from its fixed point since.
    ``status`` and the carry's per-sample arrays are the bookkeeping's (``book``).
    """
    xp, bx = problem.xp, book.xp
    z = carry["best_z"]
    fz = problem.F(z)
    res_abs, fz_norm, z_norm = (book.view(bnorm(xp, a)) for a in (fz - z, fz, z))
    res_rel = res_abs / (fz_norm + problem.eps)
    res = res_abs if stop_mode == "abs" else res_rel
    # Rounding of F(z) - z, in the units of the stopping rule; f itself runs in the state's
    # dtype (float16 states: f rounds to 1e-3, the solver's arithmetic to float32's 1e-7).
    eps = float(xp.finfo(problem.layout.dtype).eps)
    noise = 64 * eps * (fz_norm + z_norm)
    if stop_mode == "rel":
        noise = noise / (fz_norm + problem.eps)
    finite = res < _INF
    failed = (status == CONVERGED) & ~(res <= tol * 1.01 + noise)
    carry["best_abs"] = bx.where(finite, res_abs, carry["best_abs"])
    # (the loop did not track the relative residual when it stopped on the absolute one)
    carry["best_rel"] = bx.where(finite, res_rel, carry["best_rel"]) if rel_known else res_rel
    return bx.where(failed, RECHECK_FAILED, status)
