"""Adam over a dict of arrays, functional, for any array namespace (NumPy, CuPy, JAX)."""

from __future__ import annotations

from typing import Any, NamedTuple


class AdamState(NamedTuple):
    step: Any
    m: dict[str, Any]
    v: dict[str, Any]


class Adam:
    """``m ← β₁m + (1-β₁)g``, ``v ← β₂v + (1-β₂)g²``, ``θ ← θ - lr·m̂/(√v̂ + ε)`` with bias correction.

    Kingma & Ba, *Adam: A Method for Stochastic Optimization*, 2015. Pure arithmetic on the
    arrays, so the update is jit-able on JAX and in-place-free on NumPy/CuPy.
    """

    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps

    def init(self, params: dict[str, Any]) -> AdamState:
        return AdamState(0, {k: p * 0 for k, p in params.items()}, {k: p * 0 for k, p in params.items()})

    def update(self, params: dict[str, Any], grads: dict[str, Any], state: AdamState) -> tuple[dict[str, Any], AdamState]:
        step = state.step + 1
        m = {k: self.b1 * state.m[k] + (1 - self.b1) * g for k, g in grads.items()}
        v = {k: self.b2 * state.v[k] + (1 - self.b2) * g * g for k, g in grads.items()}
        scale = self.lr * (1 - self.b2**step) ** 0.5 / (1 - self.b1**step)
        new = {k: p - scale * m[k] / (v[k] ** 0.5 + self.eps) for k, p in params.items()}
        return new, AdamState(step, m, v)
