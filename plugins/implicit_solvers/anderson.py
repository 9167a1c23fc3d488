"""Anderson acceleration (type II) with a bordered least-squares system per sample."""

from __future__ import annotations

from typing import Any

from implicit_core import Solver
from implicit_core._ops import finite_rows
from implicit_core._plugin_base import check_positive_int, check_range, write_row


class Anderson(Solver):
    """Anderson acceleration, type II.

    With the last ``m`` iterates ``X`` and their images ``F(X)``, residuals ``G = F(X) - X``,
    each sample solves ``min_alpha ||alpha^T G||^2 + lam_k ||alpha||^2`` s.t. ``sum(alpha) = 1``
    through the bordered system ``[[0, 1^T], [1, G G^T + lam_k I]] [nu; alpha] = [1; 0]``, then
    ``z <- beta alpha^T F(X) + (1 - beta) alpha^T X``. ``lam_k = lam * max diag(G G^T)`` scales
    the regularisation with the residuals, so it neither vanishes far from the solution nor
    swamps the system close to it. A sample whose system is not finite takes a plain damped
    step instead, so a singular least-squares problem never crashes the solve.

    Args:
        m: history length. lam: relative Tikhonov regularisation. beta: mixing in ``(0, 1]``.
    """

    name = "anderson"

    def __init__(self, m: int = 5, lam: float = 1e-4, beta: float = 1.0):
        self.m = check_positive_int("anderson", "m", m)
        self.lam = check_range("anderson", "lam", lam, 0.0, 1.0)
        self.beta = check_range("anderson", "beta", beta, 0.0, 1.0, low_open=True)

    def init(self, problem, z0) -> dict[str, Any]:
        xp, be = problem.xp, problem.backend
        fz = problem.F(z0)
        batch, n = z0.shape
        X = xp.zeros((batch, self.m, n), dtype=z0.dtype, device=be.device(z0))
        Fx = xp.zeros_like(X)
        X = be.at_set(X, (slice(None), 0), z0)
        Fx = be.at_set(Fx, (slice(None), 0), fz)
        return {"z": z0, "fz": fz, "X": X, "F": Fx}

    def step(self, problem, state, k, active) -> dict[str, Any]:
        xp, be = problem.xp, problem.backend
        X, Fx = state["X"], state["F"]
        batch, m = X.shape[0], self.m
        dtype, device = X.dtype, be.device(X)
        G = Fx - X
        slots = xp.arange(m, device=device)
        valid = slots < (k + 1)  # history slots filled so far, (m,)
        pair = valid[:, None] & valid[None, :]
        GG = xp.where(pair, xp.matmul(G, xp.matrix_transpose(G)), 0.0)
        diag = xp.linalg.diagonal(GG)
        reg = self.lam * xp.max(diag, axis=-1) + xp.finfo(dtype).tiny ** 0.5
        eye = xp.eye(m, dtype=dtype, device=device)
        # Unused slots get an identity row/column, which pins their weight to zero.
        A = GG + eye * xp.where(valid, reg[:, None], 1.0)[:, None, :]
        border = xp.astype(valid, dtype)
        top = xp.concat([xp.zeros((1,), dtype=dtype, device=device), border])[None, None, :]
        top = xp.broadcast_to(top, (batch, 1, m + 1))
        left = xp.broadcast_to(border[None, :, None], (batch, m, 1))
        H = xp.concat([top, xp.concat([left, A], axis=2)], axis=1)
        ok = finite_rows(xp, H)
        # Samples with a non-finite system solve a harmless identity-bordered one instead.
        safe_H = xp.concat([top, xp.concat([left, xp.broadcast_to(eye, (batch, m, m))], axis=2)], axis=1)
        H = xp.where(ok[:, None, None], H, safe_H)
        first = xp.astype(xp.arange(m + 1, device=device) == 0, dtype)
        rhs = xp.broadcast_to(first[None, :, None], (batch, m + 1, 1))
        alpha = xp.linalg.solve(H, rhs)[:, 1:, 0]
        newest = xp.astype(slots == (k % m), dtype)[None, :]
        good = ok & finite_rows(xp, alpha)
        alpha = xp.where(good[:, None], alpha, newest)  # fall back to a plain step
        mix_F = xp.matmul(alpha[:, None, :], Fx)[:, 0, :]
        if self.beta == 1.0:
            z = mix_F
        else:
            z = self.beta * mix_F + (1.0 - self.beta) * xp.matmul(alpha[:, None, :], X)[:, 0, :]
        fz = problem.F(z)
        slot = (k + 1) % m
        X = write_row(problem, X, slot, z, active)
        Fx = write_row(problem, Fx, slot, fz, active)
        return {"z": z, "fz": fz, "X": X, "F": Fx}
