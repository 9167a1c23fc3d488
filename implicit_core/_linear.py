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
    """``H = s I + U^T V`` per sample, with ``U, V`` of shape ``(batch, m, n)`` (rows = vectors).

    ``H x = s x + U^T (V x)`` and ``H^T x = s x + V^T (U x)``; both cost two thin products.
    ``scale`` (``s``) is ``-1`` (the classic ``H0 = -I``) or a per-sample ``(batch,)`` array.
    """

    U: Any
    V: Any
    xp: Any
    scale: Any = -1.0

    def _apply(self, left: Any, right: Any, x: Any) -> Any:
        xp = self.xp
        # Row-vector products, (batch, 1, n) @ (batch, n, m): torch runs a batched
        # matrix @ column-vector on CPU several times slower than this form.
        coeff = xp.matmul(x[:, None, :], xp.matrix_transpose(right))  # (batch, 1, m)
        base = -x if isinstance(self.scale, float) and self.scale == -1.0 else self.scale_rows(x)
        return base + xp.matmul(coeff, left)[:, 0, :]

    def scale_rows(self, x: Any) -> Any:
        """``s x`` (the initial-inverse part of ``H``) for ``(batch, n)`` rows ``x``."""
        return self.scale * x if isinstance(self.scale, float) else self.scale[:, None] * x

    def matvec(self, x: Any) -> Any:
        return self._apply(self.U, self.V, x)

    def rmatvec(self, x: Any) -> Any:
        return self._apply(self.V, self.U, x)

    @property
    def T(self) -> "LowRankInverse":
        """The transpose ``H^T = -I + V^T U``, itself low-rank of the same form."""
        return LowRankInverse(self.V, self.U, self.xp, self.scale)

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])
