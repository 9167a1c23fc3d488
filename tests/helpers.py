"""A shared problem set, written with the array-API namespace so every backend runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import implicit_core as ic
from implicit_core.cells import tanh_cell, tanh_cell_vjp
from implicit_core.testing import tanh_problem

#: Every registered backend (built in or installed as a plugin): the whole suite runs on each
#: one that is usable here; the others are skipped with the reason. Listing does not import them.
BACKENDS = [p.name for p in ic.plugins() if p.kind == "backend"]
#: Backends whose gradients come from the user's VJP (``info.vjp``) rather than autodiff.
EXPLICIT_VJP = {name for name in BACKENDS if ic.get_backend(name).explicit_vjp}
SOLVERS = ["fixed_point", "anderson", "broyden"]
GRADIENTS = ["ift", "jfb", "phantom", "shine", "broyden_reuse"]


def backend_or_skip(name: str):
    import pytest

    be = ic.get_backend(name)
    ok, reason = be.available()
    if not ok:
        pytest.skip(f"backend {name} unavailable: {reason}")
    return be


@dataclass
class Case:
    """A batched problem ``z = f(z, args)``; ``vjp`` is its hand-written VJP where needed."""

    f: Callable
    vjp: Callable | None
    args: Any
    z0: Any
    be: Any

    def __post_init__(self):
        if self.be.name not in EXPLICIT_VJP:
            self.vjp = None
            self.args = tuple(prepare_arg(self.be, a) for a in self.args)

    def to_host(self, x):
        return np.asarray(self.be.to_python(x))

    def grad(self, z, info, w):
        """``dL/dargs`` for ``L = sum(w * z)`` (summed over leaves of a tuple state), the way a user of this backend gets it."""
        return gradient_of(self.be, z, info, w, self.args)


def prepare_arg(be, a):
    """Parameters that autodiff should track."""
    if be.name == "torch":
        return a.detach().clone().requires_grad_(True)
    return a


def gradient_of(be, z, info, w, args):
    if info.vjp is not None:  # explicit-VJP backends, and JAX (which re-runs the solve under jax.vjp)
        return info.vjp(w)
    if be.name == "torch":  # gradients through the framework's own autograd
        import torch

        pairs = zip(z, w) if isinstance(z, tuple) else [(z, w)]
        return torch.autograd.grad(sum((zi * wi).sum() for zi, wi in pairs), args)
    raise AssertionError(f"no gradient rule for backend {be.name}")


def tanh_case(be, *, batch=5, n=8, norm=0.8, dtype="float64", seed=0, input_scale=1.0) -> Case:
    """The shared tanh problem (:func:`implicit_core.testing.tanh_problem`) on backend ``be``."""
    p = tanh_problem(batch=batch, n=n, norm=norm, seed=seed, input_scale=input_scale)
    W, c = (be.xp.asarray(a.astype(dtype)) for a in p.args)
    return Case(tanh_cell, tanh_cell_vjp, (W, c), be.xp.zeros((batch, n), dtype=W.dtype), be)


def linear_case(be, *, batch=4, n=6, norm=0.7, seed=0) -> Case:
    """``f(z) = z A^T + b``: ``z* = (I - A)^-1 b`` and every gradient is closed-form."""
    xp = be.xp
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    A *= norm / np.linalg.norm(A, 2)
    b = rng.standard_normal((batch, n))
    A, b = xp.asarray(A), xp.asarray(b)

    def f(z, args):
        A, b = args
        return z @ A.T + b

    def vjp(z, args, v):
        A, b = args
        return v @ A, (v.T @ z, v)

    return Case(f, vjp, (A, b), xp.zeros((batch, n), dtype=A.dtype), be)


def tuple_case(be, *, batch=3, seed=0) -> Case:
    """A two-resolution state ``(a (batch, 4), b (batch, 2, 3))`` coupled through tanh."""
    xp = be.xp
    rng = np.random.default_rng(seed)
    n = 4 + 6
    W = rng.standard_normal((n, n))
    W *= 0.7 / np.linalg.norm(W, 2)
    c = rng.standard_normal((batch, n))
    W, c = xp.asarray(W), xp.asarray(c)

    def pack(z):
        a, b = z
        return xp.concat([a, xp.reshape(b, (a.shape[0], 6))], axis=1)

    def unpack(flat):
        return flat[:, :4], xp.reshape(flat[:, 4:], (flat.shape[0], 2, 3))

    def f(z, args):
        W, c = args
        return unpack(xp.tanh(pack(z) @ W.T + c))

    def vjp(z, args, v):
        W, c = args
        zf = pack(z)
        y = xp.tanh(zf @ W.T + c)
        s = pack(v) * (1 - y * y)
        return unpack(s @ W), (s.T @ zf, s)

    z0 = (xp.zeros((batch, 4), dtype=W.dtype), xp.zeros((batch, 2, 3), dtype=W.dtype))
    return Case(f, vjp, (W, c), z0, be)
