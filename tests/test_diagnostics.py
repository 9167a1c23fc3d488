"""Jacobian regularisation and spectral radius, against closed forms on a linear map."""

import numpy as np
import pytest

import implicit_core as ic
from helpers import linear_case, tanh_case


def host(be, x):
    return np.asarray(be.to_python(x))


def test_spectral_radius_of_a_linear_map(be):
    xp = be.xp
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    eig = np.array([0.9, 0.5, -0.3, 0.2, 0.1, 0.05])
    A = (Q * eig) @ Q.T  # symmetric, spectral radius 0.9
    case = linear_case(be)
    args = (xp.asarray(A), case.args[1])
    rho = ic.spectral_radius(case.f, case.z0, args, vjp=case.vjp, n_iter=200)
    np.testing.assert_allclose(host(be, rho), 0.9, rtol=1e-6)


def test_hutchinson_is_unbiased_for_the_frobenius_norm(be):
    case = linear_case(be, n=6, batch=4)
    A = host(be, case.args[0])
    estimates = [host(be, ic.jacobian_regularisation(case.f, case.z0, case.args, vjp=case.vjp, seed=s)).mean()
                 for s in range(400)]
    exact = np.sum(A * A) / A.shape[0]
    assert abs(np.mean(estimates) - exact) < 0.05 * exact


def test_diagnostics_need_the_vjp_on_numpy():
    be = ic.get_backend("numpy")
    case = tanh_case(be)
    with pytest.raises(ic.ConfigurationError, match="vjp"):
        ic.spectral_radius(case.f, case.z0, case.args)
    with pytest.raises(ic.ConfigurationError, match="n_iter"):
        ic.spectral_radius(case.f, case.z0, case.args, vjp=case.vjp, n_iter=0)


def test_the_solve_reports_the_jacobian_penalty_at_its_solution(be):
    case = tanh_case(be, batch=4, n=6)
    z, info = ic.fixed_point(case.f, case.z0, case.args, vjp=case.vjp, tol=1e-10, jac_reg=True, jac_seed=3)
    separate = ic.jacobian_regularisation(case.f, z, case.args, vjp=case.vjp, seed=3)
    np.testing.assert_allclose(host(be, info.jac_loss), host(be, separate), rtol=1e-12)
    _, plain = ic.fixed_point(case.f, case.z0, case.args, vjp=case.vjp, tol=1e-10)
    assert plain.jac_loss is None


@pytest.mark.parametrize("bad", [dict(jac_reg=1), dict(jac_reg=True, jac_seed=1.5), dict(jac_reg=True, jac_seed=True)])
def test_jacobian_penalty_options_are_checked(bad):
    case = tanh_case(ic.get_backend("numpy"))
    with pytest.raises(ic.ConfigurationError, match="jac_"):
        ic.fixed_point(case.f, case.z0, case.args, vjp=case.vjp, **bad)
