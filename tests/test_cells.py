"""The shipped cells' hand-written VJPs equal finite differences (float64)."""

import numpy as np
import pytest

from implicit_core.cells import tanh_cell, tanh_cell_vjp


def finite_difference_vjp(fn, x, v, eps=1e-6):
    """``vᵀ ∂fn/∂x`` entry by entry, by central differences."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = eps
        grad[i] = np.sum(v * (fn(x + step) - fn(x - step))) / (2 * eps)
    return grad


@pytest.mark.parametrize("shared_injection", [False, True])
def test_tanh_cell_vjp_matches_finite_differences(shared_injection):
    rng = np.random.default_rng(0)
    batch, n = 3, 5
    z, W, v = rng.standard_normal((batch, n)), rng.standard_normal((n, n)), rng.standard_normal((batch, n))
    c = rng.standard_normal(n if shared_injection else (batch, n))
    vz, (vW, vc) = tanh_cell_vjp(z, (W, c), v)
    np.testing.assert_allclose(vz, finite_difference_vjp(lambda a: tanh_cell(a, (W, c)), z, v), atol=1e-8)
    np.testing.assert_allclose(vW, finite_difference_vjp(lambda a: tanh_cell(z, (a, c)), W, v), atol=1e-8)
    np.testing.assert_allclose(vc, finite_difference_vjp(lambda a: tanh_cell(z, (W, a)), c, v), atol=1e-8)
