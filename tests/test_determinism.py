"""Same inputs, same results, bit for bit, on CPU for every backend."""

import numpy as np
import pytest

import implicit_core as ic
from helpers import tanh_case

PAIRS = [("fixed_point", "ift"), ("anderson", "ift"), ("broyden", "ift"), ("anderson", "phantom"),
         ("broyden", "jfb"), ("broyden", "shine"), ("broyden", "broyden_reuse")]


def run(be, solver, gradient):
    case = tanh_case(be, batch=6, n=10, norm=0.9, seed=3)
    w = be.xp.asarray(np.random.default_rng(1).standard_normal((6, 10)))
    z, info = ic.fixed_point(case.f, case.z0, case.args, solver=solver, gradient=gradient, tol=1e-9, max_iter=80,
                             vjp=case.vjp)
    grads = case.grad(z, info, w)
    return [np.asarray(be.to_python(x)) for x in (z, info.steps, info.residual, *grads)]


@pytest.mark.parametrize("solver, gradient", PAIRS, ids=[f"{s}-{g}" for s, g in PAIRS])
def test_repeated_solves_are_bit_identical(be, solver, gradient):
    if be.name == "cupy":
        pytest.skip("GPU reductions may be scheduled differently between runs")
    first, second = run(be, solver, gradient), run(be, solver, gradient)
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and np.array_equal(a, b)
