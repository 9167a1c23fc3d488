"""Failing samples are stopped, reported and isolated: the rest of the batch is unaffected.

One batch carries every kind of failure at once, on every backend and with every solver:
NaN and Inf appearing mid-solve, an expanding map without a fixed point (z + 1 + z²), and a
map without a fixed point whose residual never changes (a pure
translation: its residual never changes, so Anderson's Gram matrix is singular and Broyden's
secant denominators are zero).
"""

import warnings

import numpy as np
import pytest

import implicit_core as ic
from helpers import SOLVERS, tanh_case

HEALTHY, NAN, INF, EXPANDING, TRANSLATION = range(5)
KINDS = [HEALTHY, NAN, INF, EXPANDING, TRANSLATION, HEALTHY]
#: Failures injected per solve (one per failing sample).
INJECTED = sum(k != HEALTHY for k in KINDS)


def mixed_batch(be):
    """``f`` on a batch of 6 whose sample i behaves as ``KINDS[i]``; a healthy reference case."""
    xp = be.xp
    case = tanh_case(be, batch=len(KINDS), n=4)
    rows = {kind: xp.asarray(np.array([[k == kind] for k in KINDS])) for kind in set(KINDS)}

    def f(z, args):
        healthy = case.f(z, args)
        moved = xp.abs(z[:, :1]) > 0  # false at z0 = 0: the poison appears after the first step
        out = xp.where(rows[NAN] & moved, float("nan"), healthy)
        out = xp.where(rows[INF] & moved, float("inf"), out)
        out = xp.where(rows[EXPANDING], z + 1.0 + z * z, out)  # no real fixed point, residual grows
        return xp.where(rows[TRANSLATION], z + 1.0, out)

    return case, f


def host(be, x):
    return np.asarray(be.to_python(x))


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_failure_kind_is_isolated_per_sample(be, solver):
    case, f = mixed_batch(be)
    z, info = ic.fixed_point(f, case.z0, case.args, solver=solver, tol=1e-10, max_iter=60, on_fail="ignore")
    status = host(be, info.status)
    assert list(status[[0, 5]]) == [1, 1]
    assert list(status[[1, 2]]) == [3, 3]  # non-finite values
    assert status[3] in (2, 3, 4)  # failed, whichever way the solver met the expanding map
    if solver == "fixed_point":
        assert status[3] == 4  # diverged: stopped early, long before max_iter
        assert host(be, info.steps)[3] < 20
    assert status[4] == 2  # no fixed point: max_iter, without NaN from singular updates
    assert info.failed == [1, 2, 3, 4]
    assert info.reasons()[1] == info.reasons()[2] == "non-finite values"
    assert np.isfinite(host(be, z)).all()  # every sample returns its last finite (best) iterate

    # The healthy samples get exactly what they get when solved alone.
    alone, _ = ic.fixed_point(case.f, case.z0, case.args, solver=solver, tol=1e-10, max_iter=60)
    np.testing.assert_allclose(host(be, z)[[0, 5]], host(be, alone)[[0, 5]], atol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_on_fail_modes_name_the_failed_samples(be, solver):
    case, f = mixed_batch(be)
    with pytest.warns(ic.ConvergenceWarning, match=r"did not converge for 4 sample\(s\).*non-finite values: samples \[1, 2\]"):
        ic.fixed_point(f, case.z0, case.args, solver=solver, tol=1e-10, max_iter=60, on_fail="warn")
    with pytest.raises(ic.ConvergenceError) as err:
        ic.fixed_point(f, case.z0, case.args, solver=solver, tol=1e-10, max_iter=60, on_fail="raise")
    assert err.value.info.failed == [1, 2, 3, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ic.fixed_point(f, case.z0, case.args, solver=solver, tol=1e-10, max_iter=60, on_fail="ignore")


def test_gradients_of_healthy_samples_survive_failing_batch_mates(be):
    """A loss on the healthy samples gets the same gradients as without the failing batch-mates."""
    case, f = mixed_batch(be)
    xp = be.xp
    healthy = [i for i, k in enumerate(KINDS) if k == HEALTHY]
    w = xp.asarray(np.array([[k == HEALTHY] for k in KINDS], dtype=np.float64)) * xp.ones_like(case.z0)
    ift = ic.get_gradient("ift", tol=1e-12, max_iter=100)
    z, info = ic.fixed_point(f, case.z0, case.args, solver="broyden", gradient=ift, tol=1e-10, max_iter=60,
                             on_fail="ignore", vjp=case.vjp)  # vjp: the healthy rows' derivative (NumPy/CuPy)
    z_ok, info_ok = ic.fixed_point(case.f, case.z0, case.args, solver="broyden", gradient=ift, tol=1e-10,
                                   max_iter=60, vjp=case.vjp)
    (dW, dc), (dW_ok, dc_ok) = case.grad(z, info, w), case.grad(z_ok, info_ok, w)
    np.testing.assert_allclose(host(be, dW), host(be, dW_ok), atol=1e-8)
    np.testing.assert_allclose(host(be, dc)[healthy], host(be, dc_ok)[healthy], atol=1e-8)
    assert np.isfinite(host(be, dc)).all()


@pytest.mark.parametrize("update", ["good", "good-steps", "adjoint"])
def test_an_inverse_estimate_stays_finite_where_a_sample_failed(be, update, monkeypatch):
    """A step that turns a sample non-finite writes a zero rank-one term for it, not NaN: SHINE
    reading the estimate gives the healthy samples what they get alone, and finite values.
    (``good-steps``: the good update kept as its steps, the form of larger states.)"""
    import implicit_solvers.broyden as broyden

    if update == "good-steps":
        monkeypatch.setattr(broyden, "STEPS_FROM", 0)
        update = "good"
    case, f = mixed_batch(be)
    xp = be.xp
    w = xp.asarray(np.array([[k == HEALTHY] for k in KINDS], dtype=np.float64)) * xp.ones_like(case.z0)
    solver = ic.get_solver("broyden", update=update)
    if update == "adjoint" and be.explicit_vjp:
        pytest.skip("the adjoint update needs the framework's VJPs")
    z, info = ic.fixed_point(f, case.z0, case.args, solver=solver, gradient="shine", tol=1e-10, max_iter=60,
                             on_fail="ignore", vjp=case.vjp)
    z_ok, info_ok = ic.fixed_point(case.f, case.z0, case.args, solver=solver, gradient="shine", tol=1e-10,
                                   max_iter=60, vjp=case.vjp)
    (dW, dc), (dW_ok, dc_ok) = case.grad(z, info, w), case.grad(z_ok, info_ok, w)
    # (SHINE would replace a non-finite estimate by g: none may be needed)
    assert not host(be, info.extras["fallback"]).any()
    assert np.isfinite(host(be, dW)).all() and np.isfinite(host(be, dc)).all()
    np.testing.assert_allclose(host(be, dW), host(be, dW_ok), atol=1e-8)
