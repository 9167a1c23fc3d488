"""Anderson acceleration (type II) with an incrementally updated Gram matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from implicit_core import Solver
from implicit_core.plugin import bdot, finite_rows, solve_small
from implicit_core.plugin import check_positive_int, check_range, write_row


#: From this many samples on, the small systems solved in NumPy are eliminated in place
#: rather than factorised one by one by LAPACK (measured crossover, m = 5).
HOST_ELIMINATION_BATCH = 256


@dataclass(eq=False)
class Anderson(Solver):
    """Anderson acceleration, type II.

    With the last ``m`` images ``F(X)`` and residuals ``G = F(X) - X``, each sample solves
    ``min_alpha alpha^T (G G^T + lam_k I) alpha`` subject to ``sum(alpha) = 1``, whose solution
    is ``alpha = y / sum(y)`` with ``(G G^T + lam_k I) y = 1``, then moves to
    ``z <- beta alpha^T F(X) + (1 - beta) alpha^T X = alpha^T F(X) - (1 - beta) alpha^T G``.
    ``lam_k = lam * ||g_k||^2`` (the newest residual) scales the regularisation with the
    residuals, so it neither vanishes far from the solution nor swamps the system close to it;
    scaled by the largest residual in the history instead, it would be set by the oldest ones
    and stall a long history (m = 31: 34–60 steps where this takes 15–19).

    The Gram matrix ``G G^T`` is kept in the state and updated by one row and column per step
    (one ``(m, n)`` product instead of ``(m, m, n)``). Slots not filled yet get an identity
    row/column and a zero right-hand side, which pins their weight to zero while the shapes
    stay fixed (traced backends). A sample whose system is not finite takes a plain step, so a
    singular least-squares problem never crashes the solve.

    Args:
        m: history length. lam: relative Tikhonov regularisation. beta: mixing in ``(0, 1]``.
    """

    name = "anderson"
    row_masked = ("F", "G", "GG")
    # (a step reads only the histories: z and F(z), the newest rows of X and F, are measured
    # and not carried; in IFT's adjoint solve that is two vectors fewer at its peak)
    measured_only = ("z", "fz")

    m: int = 5
    lam: float = 1e-4
    beta: float = 1.0

    def __post_init__(self) -> None:
        self.m = check_positive_int("anderson", "m", self.m)
        self.lam = check_range("anderson", "lam", self.lam, 0.0, 1.0)
        self.beta = check_range("anderson", "beta", self.beta, 0.0, 1.0, low_open=True)

    def _weights(self, xp: Any, GG: Any, k: Any, device: Any, unrolled: bool) -> Any:
        """The mixing weights ``alpha`` (batch, m) from the Gram matrix of the ``k + 1`` filled slots."""
        m, dtype = GG.shape[-1], GG.dtype
        slots = xp.arange(m, device=device)
        valid = slots < (k + 1)  # history slots filled so far, (m,)
        filled = xp.astype(valid, dtype)
        current = xp.astype(slots == (k % m), dtype)  # the newest slot, one-hot (m,)
        eye = xp.eye(m, dtype=dtype, device=device)
        diag = xp.linalg.diagonal(GG)
        # A floor of 10 eps keeps an exactly rank-deficient history (lam = 0) solvable.
        finfo = xp.finfo(dtype)
        newest = xp.sum(diag * current[None, :], axis=-1)
        reg = max(self.lam, 10 * float(finfo.eps)) * newest + float(finfo.smallest_normal) ** 0.5
        # GG is zero outside the filled block; unfilled slots get 1 on the diagonal.
        shift = xp.where(valid[None, :], reg[:, None], 1.0)
        A = GG + eye[None, ...] * shift[:, None, :]
        # (a non-finite history row makes its diagonal entry non-finite: checking it suffices)
        ok = finite_rows(xp, diag) & (xp.abs(reg) < float("inf"))
        A = xp.where(ok[:, None, None], A, eye)
        # (A is symmetric positive definite: elimination needs no pivoting)
        ones = xp.broadcast_to(filled[None, :, None], (A.shape[0], m, 1))
        y = solve_small(xp, A, ones, unrolled=unrolled)[..., 0]
        alpha = y / xp.sum(y, axis=-1, keepdims=True)
        good = ok & finite_rows(xp, alpha)
        return xp.where(good[:, None], alpha, current[None, :])  # fall back to a plain step

    def init(self, problem, z0) -> dict[str, Any]:
        xp, be = problem.xp, problem.backend
        fz = problem.F(z0)
        g = fz - z0
        batch, n = z0.shape
        device = be.device(z0)
        m = min(self.m, problem.max_steps + 1)  # no slot that the solve cannot fill
        Fx = be.at_set(xp.zeros((batch, m, n), dtype=z0.dtype, device=device), (slice(None), 0, ...), fz)
        G = be.at_set(xp.zeros((batch, m, n), dtype=z0.dtype, device=device), (slice(None), 0, ...), g)
        GG = xp.zeros((batch, m, m), dtype=z0.dtype, device=device)
        GG = be.at_set(GG, (slice(None), 0, 0), bdot(xp, g, g))
        return {"z": z0, "fz": fz, "g": g, "F": Fx, "G": G, "GG": GG}

    def step(self, problem, state, k, active) -> dict[str, Any]:
        xp, be = problem.xp, problem.backend
        Fx, G, GG = state["F"], state["G"], state["GG"]
        m = GG.shape[-1]
        host_GG, host_k = be.host_view(GG), be.host_view(k)
        if host_GG is not None and host_k is not None:
            # The (batch, m, m) system in NumPy on the arrays' own memory: ~25 operations on a
            # few kilobytes, a few microseconds each there against 10-15 in an eager framework's
            # dispatch (torch's small system inside the loop: 500 -> 360 µs a step at batch 512).
            from array_api_compat import numpy as host_xp

            k = int(host_k)
            # (elimination in place costs a fixed ~45 µs and LAPACK ~0.3 µs a system: from about
            # 256 systems on, elimination is the cheaper)
            unrolled = int(host_GG.shape[0]) >= HOST_ELIMINATION_BATCH
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # (handled per sample)
                alpha = self._weights(host_xp, host_GG, k, None, unrolled=unrolled)
            # (row-major, as the framework's products expect: a strided operand sends torch's
            # bmm down a per-sample path)
            alpha = be.from_host(np.ascontiguousarray(alpha), GG)
        else:  # (under a trace, elimination unrolled in fused array operations)
            alpha = self._weights(xp, GG, k, be.device(GG), unrolled=be.traced)
        z = xp.matmul(alpha[:, None, :], Fx)[:, 0, :]
        if self.beta != 1.0:
            z = z - (1.0 - self.beta) * xp.matmul(alpha[:, None, :], G)[:, 0, :]
        fz = problem.F(z)
        g = fz - z
        slot = (k + 1) % m
        writing = None if be.all_on_host(active) else active  # (one host read for the four writes)
        Fx = write_row(problem, Fx, slot, fz, writing)
        G = write_row(problem, G, slot, g, writing)
        # <G_j, g> for every slot, the new one included (row-vector form: see LowRankInverse)
        row = xp.matmul(g[:, None, :], xp.matrix_transpose(G))[:, 0, :]
        GG = write_row(problem, GG, slot, row, writing, axis=1)
        GG = write_row(problem, GG, slot, row, writing, axis=2)
        return {"z": z, "fz": fz, "g": g, "F": Fx, "G": G, "GG": GG}
