"""Broyden's good update kept as its steps: one state-sized vector a step.

The good inverse update ``H_{k+1} = H_k + (dz_k - H_k dg_k) dz_kᵀ H_k / (dz_kᵀ H_k dg_k)`` is
the product form ``H_{k+1} = (I + w_k dz_kᵀ) H_k``. Because each step is
``dz_{k+1} = -alpha H_{k+1} r_{k+1}``, ``w_k`` is a combination of the two steps it sits
between, ``w_k = a_k dz_k + b_k dz_{k+1}`` (Kelley, *Iterative Methods for Linear and
Nonlinear Equations*, 1995, §7.3, which stores the steps alone). So with the steps as the
columns of ``S`` (per sample, ``(batch, K, n)``):

    H_k = (I + S M Sᵀ) H_0,      H_0 = s I

with ``M`` a small ``(K, K)`` matrix per sample, updated by
``M += (a_k e_k + b_k e_{k+1}) (e_k + Mᵀ Sᵀ dz_k)ᵀ``. A step reads the history twice
(``Sᵀ [H_0 g, dz_k]`` in one pass, then ``S t``) where the two-vector form (``U``, ``V``)
reads twice as many columns twice over; the memory is one vector a step, not two.

With ``r`` the residual at the base point, ``q = H_k g(z + dz_k)`` and ``rho`` such that
``H_k r = -rho dz_k`` (``1 / alpha``, or the refit's ratio at the first step), the update's
``w = ((1 - rho) dz_k - q) / D`` with ``D = dz_kᵀ q + rho |dz_k|²``, and:

* step taken: ``dz_{k+1} = -alpha (q + w dz_kᵀ q)``, so ``a = (1 - rho) / (rho |dz_k|²)``;
* step refused (``max_growth``; the base point stays): ``dz_{k+1} = -alpha (H_k r + w dz_kᵀ H_k r)``,
  so ``a = -1 / |dz_k|²``;

and ``b = 1 / (alpha rho |dz_k|²)`` in both. A sample whose ``D`` (or ``|dz_k|²``) is tiny or
not finite skips the update (``a = b = 0``). When all ``K`` columns are written the estimate
restarts from ``H_0`` (the refit scale kept), Kelley's limited-memory rule: dropping the
oldest factor alone would need ``M`` rebuilt from every factor's coefficients.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from implicit_core.plugin import LowRankInverse
from implicit_core.plugin import bdot, bnorm, safe_divide
from implicit_core.plugin import history_block_widths, with_history, write_row

#: The state's history in this form: the steps ``S`` (a tuple of ``(batch, width, n)`` blocks),
#: the coefficients ``M`` and the steps' Gram matrix (``(batch, A, A)``, ``A`` the columns allocated).
HISTORY = ("S", "M", "gram", "rows")


def columns(solver, problem) -> int:
    """Columns of this solve: ``m`` factors need ``m + 1`` steps (fewer for a short solve)."""
    return max(2, min(solver.m, problem.max_steps) + 1)


def init(solver, problem, z0: Any, first_slots: int) -> dict[str, Any]:
    xp, be = problem.xp, problem.backend
    batch, n = z0.shape
    K = columns(solver, problem)
    device = be.device(z0)
    if be.traced:  # fixed shapes: every column, zeros (the products may read unwritten ones)
        S = tuple(xp.zeros((batch, w, n), dtype=z0.dtype, device=device)
                  for w in history_block_widths(problem, (batch, K, n)))
        allocated = K
    else:  # the first columns; later blocks when a solve reaches them (see _grow)
        allocated = min(K, first_slots)
        S = (xp.empty((batch, allocated, n), dtype=z0.dtype, device=device),)
    fz = problem.F(z0)
    gz = fz - z0
    scale = xp.full((batch,), -1.0, dtype=z0.dtype, device=device)
    step = solver.step_size * gz  # -alpha H_0 g with H_0 = -I
    state = {"z": z0, "fz": fz, "gz": gz, "g": gz, "scale": scale, "step": step,
             "M": xp.zeros((batch, allocated, allocated), dtype=z0.dtype, device=device),
             # the steps' Gram matrix, sᵢᵀ sⱼ (its new column each step from the step's products)
             "gram": xp.zeros((batch, allocated, allocated), dtype=z0.dtype, device=device),
             "count": xp.ones((batch,), dtype=xp.int32, device=device)}
    state["S"] = _write_column(problem, S, None, 0, step, None, first=True)
    if not be.traced:
        state["rows"] = (None,)  # per block: None (every sample) or (running, slots)
    if solver.max_growth is not None:  # (the residual's norm, for the growth test: once per step)
        state["r_norm"] = bnorm(xp, gz)
    state["gram"] = be.at_set(state["gram"], (slice(None), 0, 0), bdot(xp, step, step))
    return state


def step(solver, problem, state: dict[str, Any], k: Any, active: Any) -> dict[str, Any]:
    xp, be = problem.xp, problem.backend
    alpha, eps = solver.step_size, problem.eps
    state = dict(state)
    K = columns(solver, problem)
    i = k % K  # this step's column
    z, r, dz = state["z"], state["gz"], state["step"]
    z_new = z + dz
    fz_new = problem.F(z_new)
    g_new = fz_new - z_new
    scale = state["scale"]
    if solver.scale_initial:
        # Before the first update H = s I exactly: refit s to the first secant pair, s = dzᵀdg /
        # dgᵀdg; H_0 r = -dz / alpha becomes (s' / s) of it.
        def refit():
            dg = g_new - r
            fitted, ok = safe_divide(xp, bdot(xp, dz, dg), bdot(xp, dg, dg), eps)
            fitted = xp.where(ok, fitted, scale)
            return fitted, fitted / (alpha * scale)

        scale, rho = be.cond(k == 0, refit, lambda: (scale, xp.full_like(scale, 1.0 / alpha)))
    else:
        rho = xp.full_like(scale, 1.0 / alpha)
    grown, r_norm = None, None
    if solver.max_growth is not None:
        # A step that blows the residual up is not taken; H keeps what it learnt from it.
        # (A non-finite one is taken: the loop stops that sample and reports it.)
        r_norm = bnorm(xp, g_new)
        grown = (r_norm > solver.max_growth * state["r_norm"]) & (r_norm < float("inf"))
        if be.all_on_host(~grown):
            grown = None
        else:
            r_norm = xp.where(grown, state["r_norm"], r_norm)
    r_next = g_new if grown is None else xp.where(grown[:, None], r, g_new)
    S, M, gram, rows = state["S"], state["M"], state["gram"], state.get("rows")
    if not be.traced:
        S, rows, M, gram = _grow(problem, S, rows, (M, gram), int(i) + 2, K, active)

    def update():
        # q = H_k g_new = s p with p = g_new + S M Sᵀ g_new: the scale stays out of the vectors
        a0, t, p = _products(problem, S, rows, M, i, g_new)
        small = (a0, t, M, gram, scale, rho, active) + (() if grown is None else (grown,))
        host = [be.host_view(x) for x in small] if not be.traced else [None]
        if all(x is not None and x.flags.writeable for x in host):
            # The per-sample arithmetic (~40 operations on (batch,) and (batch, A, A) arrays) in
            # NumPy on the arrays' own memory, M updated in place: a few microseconds each there,
            # 10-15 in an eager framework's dispatch.
            from array_api_compat import numpy as host_xp

            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # (handled per sample)
                beta, gamma, _, column = _coefficients(host_xp, *host[:7], host[7] if grown is not None else None,
                                                       int(i), alpha, eps)
            steady = not gamma.any()
            beta, gamma, column = (be.from_host(np.ascontiguousarray(x), a0) for x in (beta, gamma, column))
            M_new = M
        else:
            beta, gamma, M_new, column = _coefficients(xp, a0, t, M, gram, scale, rho, active, grown, i, alpha, eps,
                                                       be.device(M))
            steady = be.all_on_host(gamma == 0.0)
        # dz_{k+1} = beta q + gamma dz, gamma zero wherever the step was taken at alpha = 1
        # after the first step: one product instead of three where the host sees it
        new_step = beta[:, None] * p if steady else beta[:, None] * p + gamma[:, None] * dz
        return new_step, M_new, column

    def restart():
        # The columns are full: start again from H_0 (its scale kept), from the base point.
        new_step = -alpha * scale[:, None] * r_next
        return new_step, xp.where(active[:, None, None], 0.0, M), xp.zeros_like(gram[:, 0, :])

    new_step, M, column = be.cond(i == K - 1, restart, update)
    norm2 = bnorm(xp, new_step) ** 2  # (a norm: no temporary)
    written = active & (norm2 < float("inf"))
    j = (i + 1) % K
    S = _write_column(problem, S, rows, j, new_step, written, first=not be.traced and int(k) + 1 < K)
    column = column * (1.0 - _unit(problem, gram, j)) + norm2[:, None] * _unit(problem, gram, j)
    gram = write_row(problem, write_row(problem, gram, j, column, written), j, column, written, axis=2)
    if grown is None:
        state.update(z=z_new, fz=fz_new)
    else:
        state.update(z=xp.where(grown[:, None], z, z_new), fz=xp.where(grown[:, None], state["fz"], fz_new))
    # (the residual reported is that of the point kept: g_new where taken)
    if r_norm is not None:
        state["r_norm"] = r_norm
    if rows is not None:
        state["rows"] = rows
    state.update(gz=r_next, g=r_next, scale=scale, step=new_step, S=S, M=M, gram=gram,
                 count=xp.minimum(state["count"] * 0 + (k + 2), K))
    return state


def _coefficients(sx, a0, t, M, gram, scale, rho, active, grown, i, alpha: float, eps: float, device: Any = None):
    """The step's per-sample numbers, in the namespace ``sx`` (NumPy on host views, or the
    backend's): ``beta``, ``gamma`` (``dz_{k+1} = beta p + gamma dz``), ``M`` updated and the
    Gram matrix's next column (``Sᵀ dz_{k+1}``, the diagonal entry aside). On NumPy ``M`` is
    updated in place."""
    G = _take(sx, gram, i, axis=1)  # s_jᵀ dz for every column j
    # dzᵀ q = s (dzᵀ g_new + dzᵀ S t) and |dz|², from the products and the Gram matrix
    c, norm2 = scale * (_take(sx, a0, i, axis=1) + sx.sum(G * t, axis=1)), _take(sx, G, i, axis=1)
    scaled, ok_norm = safe_divide(sx, sx.ones_like(c), rho * norm2, eps)  # 1 / (rho |dz|²)
    inverse_D, ok = safe_divide(sx, sx.ones_like(c), c + rho * norm2, eps)
    ok = ok & ok_norm & active
    # the module docstring's two cases, and no update where not ok
    beta = sx.where(ok, -alpha * rho * norm2 * inverse_D, -alpha)
    gamma = sx.where(ok, -alpha * (1.0 - rho) * c * inverse_D, 0.0)
    a = sx.where(ok, (1.0 - rho) * scaled, 0.0)
    if grown is not None:
        refused_gamma = sx.where(ok, alpha * rho * (1.0 + (1.0 - rho) * norm2 * inverse_D), alpha * rho)
        beta = sx.where(grown, sx.where(ok, beta, 0.0), beta)
        gamma = sx.where(grown, refused_gamma, gamma)
        a = sx.where(grown & ok, -rho * scaled, a)
    b = sx.where(ok, scaled / alpha, 0.0)
    beta = beta * scale
    # M += (a e_i + b e_{i+1}) (e_i + Mᵀ G)ᵀ: rows i and i + 1 (zero where not ok: a stopped
    # sample keeps its rows, and row i + 1 of a running one is still zero in this cycle)
    right = sx.matmul(G[:, None, :], M)[:, 0, :]
    slots = sx.arange(int(M.shape[1]), device=device)
    right = sx.where(ok[:, None], right + sx.astype(slots == i, M.dtype), 0.0)
    M = _add_row(sx, M, slots, i, a[:, None] * right)
    M = _add_row(sx, M, slots, i + 1, b[:, None] * right)
    # Sᵀ dz_{k+1} = beta (Sᵀ g_new + Sᵀ S t) + gamma Sᵀ dz, from this step's products: no pass
    # over the history for it
    column = beta[:, None] * (a0 + sx.matmul(gram, t[:, :, None])[:, :, 0]) + gamma[:, None] * G
    return beta, gamma, M, column


def _take(sx, a: Any, i: Any, axis: int) -> Any:
    """``a[:, i]`` (``axis=1``) for an int or a 0-d integer array ``i``."""
    if isinstance(i, int):
        return a[:, i, ...]
    return sx.squeeze(sx.take(a, sx.reshape(i, (1,)), axis=axis), axis=axis)


def _add_row(sx, M: Any, slots: Any, i: Any, delta: Any) -> Any:
    """``M[:, i, :] += delta`` (in place on NumPy, for an int ``i``)."""
    if isinstance(i, int) and isinstance(M, np.ndarray):
        M[:, i, :] += delta
        return M
    return M + sx.astype(slots == i, M.dtype)[None, :, None] * delta[:, None, :]


def _products(problem, S: tuple, rows: Any, M: Any, i: Any, y: Any) -> tuple[Any, Any, Any]:
    """``a0 = Sᵀ y``, ``t = M a0`` and ``y + S t`` over the columns ``0..i`` (the history read
    twice), ``a0`` and ``t`` padded to the columns allocated."""
    xp, be = problem.xp, problem.backend
    A = int(M.shape[1])

    def fn(*blocks):
        # Row-vector products (batch, 1, n) @ (batch, n, w): torch's CPU kernels for two
        # right-hand sides at once, or a matrix @ column vector, are slower than two of these.
        a0 = xp.concat([_for_rows(xp, part, lambda x, b=block: xp.matmul(x[:, None, :], xp.matrix_transpose(b)), y)
                        for block, part in blocks], axis=2)
        width = int(a0.shape[2])
        t = xp.matmul(a0, xp.matrix_transpose(M[:, :width, :width]))  # (batch, 1, w)
        q, start = y, 0
        for block, part in blocks:
            end = start + int(block.shape[1])
            q = q + _for_rows(xp, part, lambda x, b=block: xp.matmul(x, b)[:, 0, :], t[:, :, start:end])
            start = end
        a0, t = a0[:, 0, :], t[:, 0, :]
        if width < A:
            pad = xp.zeros((a0.shape[0], A - width), dtype=a0.dtype, device=be.device(a0))
            a0, t = xp.concat([a0, pad], axis=1), xp.concat([t, pad], axis=1)
        return a0, t, q

    if be.traced:
        return with_history(problem, (S,), i + 1, lambda blocks: fn(*((block, None) for block in blocks)))
    return fn(*_written(problem, S, rows, int(i) + 1))


def _for_rows(xp, part: Any, product, x: Any) -> Any:
    """``product(x)`` for a block of every sample (``part`` None), or, for a block of some
    samples (``part = (running, slots)``), on their rows and back in the whole batch, zeros for
    the others."""
    if part is None:
        return product(x)
    return _to_batch(xp, part, product(xp.take(x, part[0], axis=0)))


def _to_batch(xp, part: Any, out: Any) -> Any:
    """Rows of some samples (``part = (running, slots)``) back in the whole batch, zeros for the others."""
    if part is None:
        return out
    return xp.take(xp.concat([out, xp.zeros_like(out[:1, ...])], axis=0), part[1], axis=0)


def _unit(problem, like: Any, i: Any) -> Any:
    """``e_i`` of length ``like.shape[-1]``, in ``like``'s dtype."""
    xp = problem.xp
    slots = xp.arange(int(like.shape[-1]), device=problem.backend.device(like))
    return xp.astype(slots == i, like.dtype)


def _written(problem, S: tuple, rows: tuple, count: int) -> list:
    """The eager blocks cut to the first ``count`` columns, each with its rows (``None``: all)."""
    blocks, start = [], 0
    for block, part in zip(S, rows):
        if start >= count:
            break
        width = int(block.shape[1])
        blocks.append((block if start + width <= count else block[:, : count - start, :], part))
        start += width
    return blocks


def _grow(problem, S: tuple, rows: tuple, small: tuple, needed: int, K: int, active: Any) -> tuple:
    """Eagerly: allocate the next block of columns (as many as are held, up to ``K``) when the
    step about to be written needs one, for the samples still running only (a stopped sample
    writes no more steps; in a DEQ batch most stop early), and pad the ``(batch, A, A)``
    matrices to match."""
    xp, be = problem.xp, problem.backend
    allocated = sum(int(block.shape[1]) for block in S)
    needed = min(needed, K)
    if needed <= allocated:
        return (S, rows, *small)
    batch, _, n = S[0].shape
    width = min(allocated, K - allocated)
    part, height = None, batch
    if not be.all_on_host(active):
        running = xp.nonzero(active)[0]
        position = xp.cumulative_sum(xp.astype(active, running.dtype)) - 1  # of each running sample
        part = (running, xp.where(active, position, int(running.shape[0])))
        height = int(running.shape[0])
    S = (*S, xp.empty((height, width, n), dtype=S[0].dtype, device=be.device(S[0])))
    size, padded = allocated + width, []
    for matrix in small:
        bigger = xp.zeros((batch, size, size), dtype=matrix.dtype, device=be.device(matrix))
        padded.append(be.at_set(bigger, (slice(None), slice(0, allocated), slice(0, allocated)), matrix))
    return (S, (*rows, part), *padded)


def _write_column(problem, S: tuple, rows: Any, column: Any, value: Any, active: Any, first: bool) -> tuple:
    """Column ``column`` of the steps; its first write fills every row (zeros where not written),
    so that no uninitialised memory is ever read."""
    xp, be = problem.xp, problem.backend
    if rows is not None and any(part is not None for part in rows):
        # Eager, with blocks of some samples: the block holding the column, on its rows.
        column, start = int(column), 0
        blocks = list(S)
        for b, (block, part) in enumerate(zip(S, rows)):
            width = int(block.shape[1])
            if start <= column < start + width:
                mask = active if part is None or active is None else xp.take(active, part[0], axis=0)
                rows_value = value if part is None else xp.take(value, part[0], axis=0)
                blocks[b] = _write_column(problem, (block,), None, column - start, rows_value, mask, first)[0]
                break
            start += width
        return tuple(blocks)
    if first:
        everyone = active is None or be.all_on_host(active)
        row = value if everyone else xp.where(active[:, None], value, 0.0)
        return write_row(problem, S, column, row, None)
    return write_row(problem, S, column, value, None if be.all_on_host(active) else active)


def inverse(problem, state: dict[str, Any]) -> LowRankInverse:
    """The estimate ``H = s I + S (s M) Sᵀ`` as a :class:`LowRankInverse` with a core (the
    written columns, concatenated: one copy, made only when a backward pass reads ``H``)."""
    xp, be = problem.xp, problem.backend
    S, M = state["S"], state["M"]
    if not be.traced:
        count = int(xp.max(state["count"]))
        # (a block of some samples goes back into the whole batch, zeros for the others)
        S = [_to_batch(xp, part, block) for block, part in _written(problem, S, state["rows"], count)]
        M = M[:, :count, :count]
    S = S[0] if len(S) == 1 else xp.concat(list(S), axis=1)
    return LowRankInverse(S, S, xp, state["scale"], core=state["scale"][:, None, None] * M)
