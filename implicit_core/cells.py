"""Ready-made cells with hand-written vector-Jacobian products.

The backends without autodiff (NumPy, CuPy) need ``vjp=`` next to the map; these cells ship
both, written once against the array API namespace of their inputs, so the same code runs
on NumPy and CuPy (and on any array library ``array_api_compat`` knows).
"""

from __future__ import annotations

from typing import Any

import array_api_compat


def tanh_cell(z: Any, args: tuple[Any, Any]) -> Any:
    """``f(z; W, c) = tanh(z Wᵀ + c)`` for a batch ``z`` of shape ``(batch, n)``.

    ``W`` is ``(n, n)``; ``c`` is the input injection, ``(batch, n)`` or ``(n,)`` (typically
    ``x Uᵀ + b``). ``f`` is a contraction when ``||W||₂ < 1``, since ``|tanh'| <= 1``.
    """
    W, c = args
    xp = array_api_compat.array_namespace(z, W)
    return xp.tanh(z @ W.T + c)


def tanh_cell_vjp(z: Any, args: tuple[Any, Any], v: Any) -> tuple[Any, tuple[Any, Any]]:
    """``(vᵀ ∂f/∂z, (vᵀ ∂f/∂W, vᵀ ∂f/∂c))`` for :func:`tanh_cell`.

    With ``s = v ⊙ (1 - f²)``: ``vᵀ∂f/∂z = s W``, ``vᵀ∂f/∂W = sᵀ z``, ``vᵀ∂f/∂c = s``
    (summed over the batch when ``c`` is shared, ``(n,)``).
    """
    W, c = args
    xp = array_api_compat.array_namespace(z, W)
    s = v * (1 - xp.tanh(z @ W.T + c) ** 2)
    dc = s if c.ndim == z.ndim else xp.sum(s, axis=0)
    return s @ W, (s.T @ z, dc)
