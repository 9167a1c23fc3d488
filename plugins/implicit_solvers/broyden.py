"""Broyden's method on ``g(z) = F(z) - z`` with a low-rank inverse-Jacobian estimate."""

from __future__ import annotations

from typing import Any, Callable

from implicit_core import Solver
from implicit_core._errors import ConfigurationError
from implicit_core._linear import LowRankInverse
from implicit_core._ops import bdot, bnorm, safe_divide
from implicit_core._plugin_base import check_choice, check_positive_int, check_range, write_row

UPDATES = ("good", "adjoint")


class Broyden(Solver):
    """Quasi-Newton root finding with ``H ≈ (dg/dz)^-1 = (J - I)^-1`` kept as ``-I + U^T V``.

    Step ``dz = -alpha H g(z)``. The update of ``H`` is a rank-one term ``u v^T``
    written into slot ``k mod m`` of the ``(batch, m, n)`` buffers:

    * ``update="good"`` (Broyden's "good" inverse update), with ``dg = g(z + dz) - g(z)``:
      ``u = (dz - H dg) / (dz^T H dg)``, ``v = H^T dz``, so that ``H_+ dg = dz``.
    * ``update="adjoint"`` (adjoint Broyden, type C, as in SHINE): with ``s = g(z_+)`` and
      ``y = J_g(z_+)^T s`` (one extra VJP per step), ``u = H s``,
      ``v = (s - H^T y) / (s^T H^T y)``, so that ``H_+^T y = s``: the transpose, which SHINE
      uses in the backward pass, is exact along the directions the solve explored.

    Outer-problem awareness (``opa=callable``, SHINE's OPA): every ``opa_freq`` steps an extra
    adjoint update along ``e = H dL/dz`` (``opa(z)`` returns ``dL/dz`` in the state's
    structure), which makes ``H^T`` accurate in the direction the backward pass will query.

    Samples whose update denominator is tiny or not finite skip that update. The estimate is
    exposed through :meth:`inverse_jacobian` for ``shine`` and ``broyden_reuse``.

    Args:
        m: number of rank-one terms kept (older ones are overwritten).
        step_size: ``alpha`` in ``(0, 1]``.
        update: ``"good"`` or ``"adjoint"``.
        opa: callable ``z -> dL/dz`` enabling OPA updates; opa_freq: their period.
        initial_inverse: a :class:`LowRankInverse` to start from instead of ``-I``.
    """

    name = "broyden"
    provides_inverse = True
    row_masked = ("U", "V")

    def __init__(
        self,
        m: int = 30,
        step_size: float = 1.0,
        update: str = "good",
        opa: Callable[[Any], Any] | None = None,
        opa_freq: int = 5,
        initial_inverse: LowRankInverse | None = None,
    ):
        self.m = check_positive_int("broyden", "m", m)
        self.step_size = check_range("broyden", "step_size", step_size, 0.0, 1.0, low_open=True)
        self.update = check_choice("broyden", "update", update, UPDATES)
        if opa is not None and not callable(opa):
            raise ConfigurationError("broyden: opa must be a callable z -> dL/dz, or None")
        self.opa = opa
        self.opa_freq = check_positive_int("broyden", "opa_freq", opa_freq)
        if initial_inverse is not None and not isinstance(initial_inverse, LowRankInverse):
            raise ConfigurationError("broyden: initial_inverse must be a LowRankInverse")
        self.initial_inverse = initial_inverse

    # ----------------------------------------------------------------- helpers
    def _offset(self) -> int:
        return 0 if self.initial_inverse is None else self.initial_inverse.rank

    def _opa_fires(self, k: Any) -> Any:
        return (k > 0) & (k % self.opa_freq == 0)

    def _current(self, problem, state, written) -> LowRankInverse:
        """``H`` before this step's update; eager backends skip the columns not yet written."""
        U, V = state["U"], state["V"]
        if not problem.backend.traced:
            cols = self._offset() + min(int(written), self.m)
            U, V = U[:, :cols], V[:, :cols]
        return LowRankInverse(U, V, problem.xp)

    def _write(self, problem, state, index, u, v, active):
        slot = self._offset() + index % self.m
        state["U"] = write_row(problem, state["U"], slot, u, active)
        state["V"] = write_row(problem, state["V"], slot, v, active)

    def _adjoint_terms(self, problem, H: LowRankInverse, z: Any, s: Any, Hs: Any = None) -> tuple[Any, Any]:
        """Rank-one terms making ``H_+^T J_g(z)^T s = s`` (``Hs``: ``H s`` if already known)."""
        xp = problem.xp
        if problem.flat_fn is not None:
            raise ConfigurationError(
                "broyden: the adjoint update needs VJPs of the function, which internal backward "
                "systems do not provide; use update='good' for the backward solver"
            )
        y = problem.backend.vjp_at(problem, z, s) - s  # J_g^T s with g = F - I
        b = H.rmatvec(y)
        v, ok = safe_divide(xp, s - b, bdot(xp, b, s), problem.eps)
        u = xp.where(ok[:, None], H.matvec(s) if Hs is None else Hs, 0.0)
        return u, v

    # ----------------------------------------------------------------- solver
    def init(self, problem, z0) -> dict[str, Any]:
        xp, be = problem.xp, problem.backend
        batch, n = z0.shape
        shape = (batch, self.m, n)
        # Zeros, not uninitialised memory: a sample that stops early never writes its later
        # columns, and the inverse estimate handed to SHINE reads every column.
        U = xp.zeros(shape, dtype=z0.dtype, device=be.device(z0))
        V = xp.zeros(shape, dtype=z0.dtype, device=be.device(z0))
        if self.initial_inverse is not None:
            U = xp.concat([self.initial_inverse.U, U], axis=1)
            V = xp.concat([self.initial_inverse.V, V], axis=1)
        fz = problem.F(z0)
        # rank-one terms written so far, per sample (for slicing the estimate handed to SHINE)
        count = xp.zeros((batch,), dtype=xp.int32, device=be.device(z0))
        state = {"z": z0, "fz": fz, "U": U, "V": V, "count": count}
        state["Hg"] = self._current(problem, state, 0).matvec(fz - z0)
        return state

    def step(self, problem, state, k, active) -> dict[str, Any]:
        xp, be = problem.xp, problem.backend
        state = dict(state)
        z, fz = state["z"], state["fz"]
        written = k  # rank-one terms written before this step: one per step, plus OPA's
        if self.opa is not None:
            fires = self._opa_fires(k)
            written = k + ((k - 1) // self.opa_freq) * (k > 0)  # k: a Python int or a traced array

            def opa_update():
                H = self._current(problem, state, written)
                e = H.matvec(problem.flatten(self.opa(problem.unflatten(z))))
                prev = -H.matvec(fz - z)  # the coming quasi-Newton step sets the scale
                e = e * (bnorm(xp, prev) / (bnorm(xp, e) + problem.eps))[:, None]
                u, v = self._adjoint_terms(problem, H, z, e)
                updated = dict(state)  # a traced branch must not write into the enclosing state
                self._write(problem, updated, written, u, v, active)
                return updated["U"], updated["V"]

            state["U"], state["V"] = be.cond(fires, opa_update, lambda: (state["U"], state["V"]))
            written = written + fires
        H = self._current(problem, state, written)
        # H g(z) is carried from the previous step (updated for its rank-one term below);
        # after an OPA update it is recomputed.
        Hgz = state["Hg"] if self.opa is None else H.matvec(fz - z)
        dz = -self.step_size * Hgz
        z_new = z + dz
        fz_new = problem.F(z_new)
        g_new = fz_new - z_new
        Hg_new = H.matvec(g_new)
        if self.update == "good":
            Hdg = Hg_new - Hgz  # linearity saves a pass over the buffers
            u, ok = safe_divide(xp, dz - Hdg, bdot(xp, dz, Hdg), problem.eps)
            v = xp.where(ok[:, None], H.rmatvec(dz), 0.0)
        else:
            u, v = self._adjoint_terms(problem, H, z_new, g_new, Hs=Hg_new)
        self._write(problem, state, written, u, v, active)
        # (H + u v^T) g_new, without another pass over the buffers
        state.update(z=z_new, fz=fz_new, Hg=Hg_new + u * bdot(xp, v, g_new)[:, None],
                     count=state["count"] * 0 + (written + 1))
        return state

    def inverse_jacobian(self, problem, state) -> LowRankInverse:
        U, V = state["U"], state["V"]
        if not problem.backend.traced:  # only the columns some sample wrote
            cols = self._offset() + min(int(problem.xp.max(state["count"])), self.m)
            U, V = U[:, :cols], V[:, :cols]
        return LowRankInverse(U, V, problem.xp)
