"""Broyden's method on ``g(z) = F(z) - z`` with a low-rank inverse-Jacobian estimate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from implicit_core import Solver
from implicit_core.plugin import ConfigurationError
from implicit_core.plugin import LowRankInverse
from implicit_core.plugin import bdot, bnorm, safe_divide
from implicit_core.plugin import check_choice, check_positive_int, check_range, history_columns, with_history, write_row
from implicit_core.plugin import history_block_widths

from . import broyden_steps

UPDATES = ("auto", "good", "adjoint")
#: Rank-one columns an eager solve allocates up front (the others in chunks when it needs them).
FIRST_SLOTS = 8
#: The state's history: ``U``, ``V`` (the first columns; under a trace all ``m``, as tuples of
#: blocks, see ``history_block_widths``) and, eagerly, ``rest``: the chunks allocated since, each
#: ``(U, V, rows)`` (``None`` under a trace).
HISTORY = ("U", "V", "rest")
#: The good update is kept as its steps when the state has at least this many numbers a sample
#: per column (``m + 1``): the form's two ``(batch, m + 1, m + 1)`` matrices cost what its steps
#: save below ~2, and from 4 it holds at most 3/4 of what ``U`` and ``V`` would.
STEPS_FROM = 4


@dataclass(eq=False)
class Broyden(Solver):
    """Quasi-Newton root finding with ``H ≈ (dg/dz)^-1 = (J - I)^-1`` kept as ``s I + U^T V``.

    Step ``dz = -alpha H g(z)``. ``H`` starts at ``-I`` (right for contractive ``F``, where
    ``dg/dz ≈ -I``); after the first step its diagonal part becomes ``s = dzᵀdg / dgᵀdg``, the
    least-squares fit of ``s dg ≈ dz`` (sign included), so a root problem written with either
    sign convention (``g = x - f(x)`` or ``f(x) - x``), or a badly scaled one, gets an initial
    inverse of the right sign and size (``scale_initial=False`` keeps ``-I``). A step that
    multiplies the residual by more than ``max_growth`` is not taken: the sample stays where it
    was, and ``H`` still learns the secant pair the trial step measured.

    The update of ``H`` is a rank-one term ``u v^T``:

    * ``update="good"`` (Broyden's "good" inverse update), with ``dg = g(z + dz) - g(z)``:
      ``u = (dz - H dg) / (dz^T H dg)``, ``v = H^T dz``, so that ``H_+ dg = dz``. Its terms are
      kept as the steps themselves (:mod:`.broyden_steps`: ``H = (I + S M S^T) s I``, one
      state-sized vector a step and half the passes over the history; after ``m`` updates
      the estimate restarts from ``s I``) when the state has at least ``4 (m + 1)`` numbers a
      sample, else as ``u``, ``v`` like the others.
    * ``update="adjoint"`` (adjoint Broyden, type C, as in SHINE): with ``s = g(z_+)`` and
      ``y = J_g(z_+)^T s`` (one extra VJP per step), ``u = H s``,
      ``v = (s - H^T y) / (s^T H^T y)``, so that ``H_+^T y = s``: the transpose, which SHINE
      uses in the backward pass, is exact along the directions the solve explored. Its terms
      (``u``, ``v``: two vectors a step) go into slot ``k mod m`` of ``(batch, m, n)`` buffers,
      as do OPA's and those of a solve continuing from an ``initial_inverse``.
    * ``update="auto"`` (the default): ``"adjoint"`` when the backward pass reads the inverse
      estimate (``gradient="shine"`` or ``"broyden_reuse"``: ``problem.backward_reads_inverse``),
      ``"good"`` otherwise. On a trained digits DEQ (Jacobian spectral radius up to 0.85) the
      adjoint update lifts SHINE's cosine to the exact gradient from 0.75 to 0.98 for a few
      percent more forward time; the good update's ``H^T`` is exact only along forward
      directions, which the backward does not query.

    Outer-problem awareness (``opa=callable``, SHINE's OPA): every ``opa_freq`` steps an extra
    adjoint update along ``e = H dL/dz`` (``opa(z)`` returns ``dL/dz`` in the state's
    structure), which makes ``H^T`` accurate in the direction the backward pass will query.

    Samples whose update denominator is tiny or not finite skip that update. The estimate is
    exposed through :meth:`inverse_jacobian` for ``shine`` and ``broyden_reuse``.

    Args:
        m: number of rank-one terms kept (the good update: then a restart; the others: older
            ones are overwritten).
        step_size: ``alpha`` in ``(0, 1]``.
        update: ``"auto"``, ``"good"`` or ``"adjoint"``.
        opa: callable ``z -> dL/dz`` enabling OPA updates; opa_freq: their period.
        initial_inverse: a :class:`LowRankInverse` to start from instead of ``-I``.
        scale_initial: rescale the initial ``-I`` from the first secant pair.
        max_growth: reject steps that grow ``||g||`` by more than this factor (``None``: never).
    """

    name = "broyden"
    provides_inverse = True
    row_masked = HISTORY + broyden_steps.HISTORY

    m: int = 30
    step_size: float = 1.0
    update: str = "auto"
    opa: Callable[[Any], Any] | None = None
    opa_freq: int = 5
    initial_inverse: LowRankInverse | None = None
    scale_initial: bool = True
    max_growth: float | None = 4.0

    def __post_init__(self) -> None:
        self.m = check_positive_int("broyden", "m", self.m)
        self.step_size = check_range("broyden", "step_size", self.step_size, 0.0, 1.0, low_open=True)
        self.update = check_choice("broyden", "update", self.update, UPDATES)
        if self.opa is not None and not callable(self.opa):
            raise ConfigurationError("broyden: opa must be a callable z -> dL/dz, or None")
        self.opa_freq = check_positive_int("broyden", "opa_freq", self.opa_freq)
        if self.initial_inverse is not None and not isinstance(self.initial_inverse, LowRankInverse):
            raise ConfigurationError("broyden: initial_inverse must be a LowRankInverse")
        if not isinstance(self.scale_initial, bool):
            raise ConfigurationError(f"broyden: scale_initial must be True or False, got {self.scale_initial!r}")
        if self.max_growth is not None:
            self.max_growth = check_range("broyden", "max_growth", self.max_growth, 1.0, float("inf"), low_open=True)

    # ----------------------------------------------------------------- helpers
    def _slots(self, problem) -> int:
        """Rank-one slots of this solve (``m``, or fewer for a short solve); at least one, for
        a loop body traced whatever the budget."""
        return max(1, min(self.m, problem.max_steps * (2 if self.opa is not None else 1)))

    def _update(self, problem) -> str:
        """The rule this solve uses (``"auto"`` resolved against what the backward reads)."""
        if self.update != "auto":
            return self.update
        # Internal backward systems (flat_fn) have no VJP of their own: always "good" there.
        return "adjoint" if problem.backward_reads_inverse and problem.flat_fn is None else "good"

    def _keeps_steps(self, problem) -> bool:
        """Whether this solve keeps the good update as its steps (:mod:`.broyden_steps`: one
        vector a step). The adjoint update and OPA write terms that are not steps, and an
        initial inverse is not ``s I``: those keep the rank-one terms ``U``, ``V``."""
        return self._update(problem) == "good" and self.opa is None and self.initial_inverse is None

    def _opa_fires(self, k: Any) -> Any:
        return (k > 0) & (k % self.opa_freq == 0)

    def _current(self, problem, state, written) -> LowRankInverse:
        """``H`` before this step's update, over the columns written so far (under a trace: all
        ``m`` blocks, zeros where unwritten; products that should cost what was written go
        through :meth:`_with_history`, whose branches return arrays)."""
        if problem.backend.traced:
            return self._inverse(state, problem.xp, state["U"], state["V"], ())
        return self._with_history(problem, state, written, lambda *parts: self._inverse(state, problem.xp, *parts))

    def _with_history(self, problem, state, written, fn):
        """``fn(U, V, rest)`` over the rank-one columns written so far.

        Eagerly the history is the first ``FIRST_SLOTS`` columns, for every sample, then chunks
        allocated as a solve first needs them, each for the samples running at that point only
        (``rest``: ``(U, V, rows)`` per chunk, ``rows`` ``None`` when every sample was running),
        of 8, 16, 32, ... columns up to ``m`` (the columns allocated are never more than twice
        those written, or 8). A short solve then holds a few columns rather than ``m``, and a
        batch whose slowest samples run long holds the later columns for those only, with no
        copy. Under a trace ``U`` and ``V`` hold all ``m`` columns (fixed shapes) in blocks of
        8, 8, 16, ... columns, of which :func:`with_history` reads the first few.
        """
        if problem.backend.traced:
            return with_history(problem, (state["U"], state["V"]), written, lambda U, V: fn(U, V, ()))
        first = int(state["U"].shape[1])
        count = int(written)
        U, V = (history_columns(problem, state[key], min(count, first)) for key in ("U", "V"))
        rest, start = [], first
        for U_chunk, V_chunk, rows in state["rest"]:
            if count <= start:
                break
            columns = count - start
            rest.append((history_columns(problem, U_chunk, columns), history_columns(problem, V_chunk, columns), rows))
            start += int(U_chunk.shape[1])
        return fn(U, V, tuple(rest))

    def _inverse(self, state, xp, U, V, rest, scale=None) -> LowRankInverse:
        scale = state["scale"] if scale is None else scale
        if isinstance(U, tuple):  # blocks (traced): each continues the estimate of those before
            H = LowRankInverse(U[0], V[0], xp, scale, self.initial_inverse)
            for U_block, V_block in zip(U[1:], V[1:]):
                H = LowRankInverse(U_block, V_block, xp, base=H)
            return H
        H = LowRankInverse(U, V, xp, scale, self.initial_inverse)
        for U_chunk, V_chunk, rows in rest:  # (each continues the estimate of those before)
            H = LowRankInverse(U_chunk, V_chunk, xp, base=H, rows=rows)
        return H

    def _write(self, problem, state, index, u, v, active):
        xp, be = problem.xp, problem.backend
        m = self._slots(problem)
        slot = index % m
        if be.traced:
            state["U"] = write_row(problem, state["U"], slot, u, active)
            state["V"] = write_row(problem, state["V"], slot, v, active)
            return
        slot = int(slot)
        chunk, start = None, int(state["U"].shape[1])
        if slot >= start:  # in a later chunk: the one holding the slot, allocated when first reached
            chunk = 0
            for U_chunk, _, _ in state["rest"]:
                if slot < start + int(U_chunk.shape[1]):
                    break
                start, chunk = start + int(U_chunk.shape[1]), chunk + 1
            if chunk == len(state["rest"]):  # (slots are written in order: this is the next chunk)
                # as many columns as are held already (up to m): the columns held double
                self._allocate_chunk(problem, state, active, min(start, m - start), u)
            rows = state["rest"][chunk][2]
            if rows is not None:  # the chunk holds the samples then running only
                u, v, active = (xp.take(a, rows[0], axis=0) for a in (u, v, active))
            slot -= start
        buffers = [state["U"], state["V"]] if chunk is None else list(state["rest"][chunk][:2])
        # A column's first write fills every row, zeros where stopped (one host read of each
        # flag for both buffers).
        first_write = bool(index < m)
        everyone = be.all_on_host(active)
        for i, value in enumerate((u, v)):
            if first_write:
                row = value if everyone else xp.where(active[:, None], value, 0.0)
                buffers[i] = be.at_set(buffers[i], (slice(None), slot, ...), row)
            else:
                buffers[i] = write_row(problem, buffers[i], slot, value, None if everyone else active)
        if chunk is None:
            state["U"], state["V"] = buffers
        else:
            rest = list(state["rest"])
            rest[chunk] = (*buffers, rest[chunk][2])
            state["rest"] = tuple(rest)

    def _allocate_chunk(self, problem, state, active, columns: int, like) -> None:
        """The solve outgrew the columns allocated so far: ``columns`` more, for the samples still
        running (a stopped sample writes no more terms; in a DEQ batch most stop early)."""
        xp, be = problem.xp, problem.backend
        batch, n = like.shape
        device = be.device(like)
        rows = None
        if not be.all_on_host(active):
            running = xp.nonzero(active)[0]
            position = xp.cumulative_sum(xp.astype(active, running.dtype)) - 1  # of each running sample
            rows = (running, xp.where(active, position, int(running.shape[0])))
            batch = int(running.shape[0])
        U = xp.empty((batch, columns, n), dtype=like.dtype, device=device)
        V = xp.empty_like(U)
        state["rest"] = (*state["rest"], (U, V, rows))

    def _adjoint_terms(self, problem, H: LowRankInverse, z: Any, s: Any, Hs: Any = None, y: Any = None) -> tuple[Any, Any]:
        """Rank-one terms making ``H_+^T J_g(z)^T s = s`` (``Hs``: ``H s``, ``y``: ``J_g(z)^T s``, if known)."""
        xp = problem.xp
        if problem.flat_fn is not None:
            raise ConfigurationError(
                "broyden: the adjoint update needs VJPs of the function, which internal backward "
                "systems do not provide; use update='good' for the backward solver"
            )
        if y is None:
            y = problem.backend.vjp_at(problem, z, s) - s  # J_g^T s with g = F - I
        b = H.rmatvec(y)
        den = bdot(xp, b, s)
        coefficient, ok = safe_divide(xp, xp.ones_like(den), den, problem.eps)
        # (s - b) / (b^T s), exactly zero where skipped; two vectors at a time, not three
        v = xp.where(ok[:, None], s - b, 0.0)
        del b
        v = v * coefficient[:, None]
        u = H.matvec(s) if Hs is None else Hs
        # (where every update is taken, u is H s itself: no masked copy)
        return (u if problem.backend.all_on_host(ok) else xp.where(ok[:, None], u, 0.0)), v

    # ----------------------------------------------------------------- solver
    def init(self, problem, z0) -> dict[str, Any]:
        if self._keeps_steps(problem) and int(z0.shape[1]) >= STEPS_FROM * broyden_steps.columns(self, problem):
            return broyden_steps.init(self, problem, z0, FIRST_SLOTS)
        xp, be = problem.xp, problem.backend
        batch, n = z0.shape
        # No more rank-one slots than the solve can write (one per step, two with OPA).
        m = self._slots(problem)
        if be.traced:  # fixed shapes: all m slots, zeros (the products may read unwritten ones)
            widths = history_block_widths(problem, (batch, m, n))
            U = tuple(xp.zeros((batch, w, n), dtype=z0.dtype, device=be.device(z0)) for w in widths)
            V = tuple(xp.zeros_like(block) for block in U)
        else:
            # Eagerly, only the columns written so far are ever read (history_columns), and a
            # column's first write fills every row (zeros for stopped samples): the buffers
            # start uninitialised, the first FIRST_SLOTS columns only (see _with_history).
            U = xp.empty((batch, min(m, FIRST_SLOTS), n), dtype=z0.dtype, device=be.device(z0))
            V = xp.empty_like(U)
        fz = problem.F(z0)
        # rank-one terms written so far, per sample (for slicing the estimate handed to SHINE)
        count = xp.zeros((batch,), dtype=xp.int32, device=be.device(z0))
        # (with an initial inverse, that estimate takes the place of s I: the scale is unused)
        scale = xp.full((batch,), -1.0, dtype=z0.dtype, device=be.device(z0))
        # gz = g(z), carried to the next step; handed to the loop as "g" too (which it drops
        # once measured), so the residual is computed once per step.
        gz = fz - z0
        state = {"z": z0, "fz": fz, "gz": gz, "g": gz, "count": count, "scale": scale, "U": U, "V": V}
        state["rest"] = None if be.traced else ()  # (chunks allocated when a solve outgrows U and V)
        state["Hg"] = self._current(problem, state, 0).matvec(gz)
        return state

    def step(self, problem, state, k, active) -> dict[str, Any]:
        if "S" in state:
            return broyden_steps.step(self, problem, state, k, active)
        xp, be = problem.xp, problem.backend
        state = dict(state)
        z, fz = state["z"], state["fz"]
        written = k  # rank-one terms written before this step: one per step, plus OPA's
        if self.opa is not None:
            fires = self._opa_fires(k)
            written = k + xp.where(k > 0, (k - 1) // self.opa_freq, 0)

            def opa_update():
                H = self._current(problem, state, written)
                e = H.matvec(problem.flatten(self.opa(problem.unflatten(z))))
                prev = -H.matvec(fz - z)  # the coming quasi-Newton step sets the scale
                e = e * (bnorm(xp, prev) / (bnorm(xp, e) + problem.eps))[:, None]
                u, v = self._adjoint_terms(problem, H, z, e)
                updated = dict(state)  # a traced branch must not write into the enclosing state
                self._write(problem, updated, written, u, v, active)
                return tuple(updated[key] for key in HISTORY)

            kept = tuple(state[key] for key in HISTORY)
            state.update(zip(HISTORY, be.cond(fires, opa_update, lambda: kept)))
            written = written + xp.astype(fires, written.dtype)
        # H g(z) is carried from the previous step (updated for its rank-one term below);
        # after an OPA update it is recomputed.
        g = state["gz"]
        if self.opa is None:
            Hgz = state["Hg"]
        else:
            Hgz = self._with_history(problem, state, written, lambda *h: self._inverse(state, xp, *h).matvec(g))
        # the step dz = -alpha H g(z), never formed on its own (see the good update below)
        z_new = z - (Hgz if self.step_size == 1.0 else self.step_size * Hgz)
        adjoint, y = self._update(problem) == "adjoint", None
        if adjoint and problem.flat_fn is None:  # F and its VJP at z_new from one evaluation
            fz_new, JT = be.value_and_linearise(problem, z_new)
            y = JT(fz_new - z_new) - (fz_new - z_new)  # J_gᵀ g(z_new), with g = F - I
        else:
            fz_new = problem.F(z_new)
        g_new = fz_new - z_new

        def rank_one(*history):
            """This step's rank-one term, from the written columns of the history."""
            H = self._inverse(state, xp, *history)
            Hg_new = H.matvec(g_new)
            scale, Hg = state["scale"], Hgz
            if self.scale_initial and self.initial_inverse is None:
                # Before the first update H = s I exactly: refit s to the first secant pair (at
                # the first step only, through the backend's conditional).
                def refit():
                    dg = g_new - g
                    gamma, ok = safe_divide(xp, -self.step_size * bdot(xp, Hgz, dg), bdot(xp, dg, dg), problem.eps)
                    delta = xp.where(ok, gamma - scale, 0.0)
                    # H' = H + delta I
                    return scale + delta, Hg + delta[:, None] * g, Hg_new + delta[:, None] * g_new

                scale, Hg, Hg_new = be.cond(k == 0, refit, lambda: (scale, Hg, Hg_new))
                H = self._inverse(state, xp, *history, scale=scale)
            if not adjoint:
                # With dz = -alpha Hgz and H dg = Hg_new - Hg (linearity: no pass over the
                # buffers), the good update's term u v^T is kept as u' v'^T with u' = -alpha u =
                # alpha (Hg_new + alpha Hgz - Hg) / (dz^T H dg) and v' = H^T Hgz = -H^T dz / alpha:
                # no vector for dz, H dg or the quotient (three fewer per step, two at its peak).
                alpha = self.step_size
                den = alpha * (bdot(xp, Hgz, Hg) - bdot(xp, Hgz, Hg_new))  # dz^T H dg
                coefficient, ok = safe_divide(xp, xp.full_like(den, alpha), den, problem.eps)
                # (without a refit Hg is Hgz, and at alpha = 1 the correction alpha Hgz - Hg vanishes;
                # after one, Hg = Hgz + delta g and the correction is a vector of its own)
                direction = Hg_new if alpha == 1.0 and Hg is Hgz else Hg_new + (alpha * Hgz - Hg)
                # exactly zero where skipped: a sample whose step went non-finite keeps a finite H
                u = xp.where(ok[:, None], direction * coefficient[:, None], 0.0)
                del direction  # (after a refit, a vector of its own: not held while v is formed)
                v = H.rmatvec(Hgz)  # finite (z is); where u is zero the term vanishes
            else:
                u, v = self._adjoint_terms(problem, H, z_new, g_new, Hs=Hg_new, y=y)
            return scale, Hg, Hg_new, u, v

        state["scale"], Hgz, Hg_new, u, v = self._with_history(problem, state, written, rank_one)
        self._write(problem, state, written, u, v, active)
        # (H + u v^T) g_new, without another pass over the buffers
        Hg_next = Hg_new + u * bdot(xp, v, g_new)[:, None]
        if self.max_growth is not None:
            # A step that blows the residual up is not taken; H keeps what it learnt from it.
            # (A non-finite one is taken: the loop stops that sample and reports it.)
            norm_new = bnorm(xp, g_new)
            grown = (norm_new > self.max_growth * bnorm(xp, g)) & (norm_new < float("inf"))
            if not be.all_on_host(~grown):  # (eager CPU: skip three passes when no step grew)
                z_new = xp.where(grown[:, None], z, z_new)
                fz_new = xp.where(grown[:, None], fz, fz_new)
                g_new = xp.where(grown[:, None], g, g_new)
                Hg_next = xp.where(grown[:, None], Hgz + u * bdot(xp, v, g)[:, None], Hg_next)
        state.update(z=z_new, fz=fz_new, gz=g_new, g=g_new, Hg=Hg_next, count=state["count"] * 0 + (written + 1))
        return state

    def next_iterate(self, state: dict[str, Any]) -> Any:
        """The quasi-Newton step from ``state``, ``z - alpha H g(z)``, without evaluating ``F`` there.

        ``H g(z)`` is carried in the state, so this costs one pass over ``z``: a solve whose
        last step need not be measured (Broyden reuse's fixed budget) saves that evaluation.
        """
        if "step" in state:
            return state["z"] + state["step"]
        return state["z"] - self.step_size * state["Hg"]

    def inverse_jacobian(self, problem, state) -> LowRankInverse:
        if "S" in state:
            return broyden_steps.inverse(problem, state)
        # The columns some sample wrote, as views (a trimmed copy would add to the forward's
        # peak; the buffers already follow the steps taken, see _with_history).
        count = state["count"] if problem.backend.traced else int(problem.xp.max(state["count"]))
        return self._current(problem, state, count)
