"""Low-rank inverse-Jacobian estimates shared by quasi-Newton solvers and the estimators
that reuse them (SHINE, Broyden reuse)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class InverseJacobian(Protocol):
    """What ``Solver.inverse_jacobian(problem, state)`` returns.

    It approximates ``H ≈ (dg/dz)^-1`` at the solution, with ``g(z) = F(z) - z``, per sample,
    acting on flat ``(batch, n)`` arrays. Any quasi-Newton solver, built in or third party,
    that returns such an object works with ``shine`` and ``broyden_reuse``.
    """

    def matvec(self, x: Any) -> Any: ...

    def rmatvec(self, x: Any) -> Any: ...


@dataclass(frozen=True)
class LowRankInverse:
    """``H = H0 + U^T V`` per sample, with ``U, V`` of shape ``(batch, m, n)`` (rows = vectors).

    With a ``core`` ``C`` (``(batch, m, m)``), ``H = H0 + U^T C V``: a compact representation
    whose rows are shared (Broyden's good update kept as its steps: ``U = V = S``).

    ``H0`` is ``s I`` (``scale`` ``s``: ``-1``, the classic ``H0 = -I``, or a per-sample
    ``(batch,)`` array) or, when ``base`` is given, another estimate: a solve that continues
    from an earlier one (Broyden reuse) adds its rank-one terms without copying the earlier
    buffers. ``H x = H0 x + U^T (V x)``, ``H^T x = H0^T x + V^T (U x)``: thin products only.
    """

    U: Any
    V: Any
    xp: Any
    scale: Any = -1.0
    base: "LowRankInverse | None" = None
    #: When the terms belong to some samples only (a continuation written while the others had
    #: stopped): ``(rows, slots)``, ``U, V`` of shape ``(len(rows), m, n)`` for the samples
    #: ``rows``, and ``slots[i]`` the row of sample ``i`` in them, or ``len(rows)`` (no terms).
    rows: Any = None
    core: Any = None

    def _apply(self, left: Any, right: Any, x: Any, transpose: bool) -> Any:
        xp = self.xp
        if self.base is not None:
            initial = self.base.rmatvec(x) if transpose else self.base.matvec(x)
        else:
            initial = -x if isinstance(self.scale, float) and self.scale == -1.0 else self.scale_rows(x)
        if self.rows is not None:
            rows, slots = self.rows
            x = xp.take(x, rows, axis=0)
        # Row-vector products, (batch, 1, n) @ (batch, n, m): torch runs a batched
        # matrix @ column-vector on CPU several times slower than this form.
        coeff = xp.matmul(x[:, None, :], xp.matrix_transpose(right))  # (batch, 1, m)
        if self.core is not None:  # (C V x)^T = (V x)^T C^T; transposed: (U x)^T C
            coeff = xp.matmul(coeff, self.core if transpose else xp.matrix_transpose(self.core))
        terms = xp.matmul(coeff, left)[:, 0, :]
        if self.rows is not None:  # back to the whole batch: zeros for the other samples
            terms = xp.take(xp.concat([terms, xp.zeros_like(terms[:1, ...])], axis=0), slots, axis=0)
        return initial + terms

    def scale_rows(self, x: Any) -> Any:
        """``s x`` (the initial-inverse part of ``H``) for ``(batch, n)`` rows ``x``."""
        return self.scale * x if isinstance(self.scale, float) else self.scale[:, None] * x

    def matvec(self, x: Any) -> Any:
        return self._apply(self.U, self.V, x, transpose=False)

    def rmatvec(self, x: Any) -> Any:
        return self._apply(self.V, self.U, x, transpose=True)

    @property
    def T(self) -> "LowRankInverse":
        """The transpose ``H^T = H0^T + V^T U``, itself low-rank of the same form."""
        return LowRankInverse(self.V, self.U, self.xp, self.scale, None if self.base is None else self.base.T, self.rows,
                              None if self.core is None else self.xp.matrix_transpose(self.core))

    @property
    def rank(self) -> int:
        return int(self.U.shape[1]) + (0 if self.base is None else self.base.rank)
