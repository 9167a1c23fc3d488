"""What a solve means: batch semantics, the residual it reports, aliasing, counters, info."""

import warnings

import numpy as np
import pytest

import implicit_core as ic
from helpers import SOLVERS, gradient_of, prepare_arg


def host(be, x):
    return np.asarray(be.to_python(x))


def coupled_linear(be, n=12, seed=0):
    """``f(z) = A z + b`` on one unbatched vector: every entry reads every other."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    A *= 0.8 / np.linalg.norm(A, 2)
    b = rng.standard_normal(n)
    xp = be.xp
    A, b = prepare_arg(be, xp.asarray(A)), prepare_arg(be, xp.asarray(b))

    def f(z, args):
        A, b = args
        return A @ z + b

    def vjp(z, args, v):
        A, b = args
        return A.T @ v, (v[:, None] * z[None, :], v)

    return f, (vjp if be.explicit_vjp else None), (A, b)


@pytest.mark.parametrize("solver", SOLVERS)
def test_unbatched_state_is_one_system(be, solver):
    f, vjp, (A, b) = coupled_linear(be)
    z0 = be.xp.zeros((12,), dtype=be.xp.float64)
    z, info = ic.fixed_point(f, z0, (A, b), solver=solver, tol=1e-11, max_iter=300, batched=False, vjp=vjp,
                             gradient=ic.get_gradient("ift", tol=1e-12, max_iter=300))
    A_h, b_h = host(be, A), host(be, b)
    z_exact = np.linalg.solve(np.eye(12) - A_h, b_h)
    assert tuple(z.shape) == (12,)
    np.testing.assert_allclose(host(be, z), z_exact, atol=1e-9)
    assert host(be, info.steps).shape == (1,) and host(be, info.converged).all()
    assert host(be, info.residual)[0] <= 1e-11
    # gradients of L = w·z* against the closed form u = (I - A)^-T w, dL/db = u, dL/dA = u z*ᵀ
    w = np.random.default_rng(1).standard_normal(12)
    gA, gb = gradient_of(be, z, info, be.xp.asarray(w), (A, b))
    u = np.linalg.solve(np.eye(12) - A_h.T, w)
    np.testing.assert_allclose(host(be, gb), u, atol=1e-8)
    np.testing.assert_allclose(host(be, gA), np.outer(u, z_exact), atol=1e-8)


def test_a_one_dimensional_batched_state_is_refused(be):
    f, vjp, args = coupled_linear(be)
    with pytest.raises(ic.ShapeError, match=r"1-D state is ambiguous. Pass batched=False .* z0\[:, None\]"):
        ic.fixed_point(f, be.xp.zeros((12,), dtype=be.xp.float64), args, vjp=vjp)


def test_an_unbatched_scalar_state(be):
    """A 0-d state (one unknown) with batched=False: x = cos(x)."""
    xp = be.xp
    z, info = ic.fixed_point(lambda z, a: xp.cos(z), xp.asarray(0.0, dtype=xp.float64), None, tol=1e-12,
                             batched=False, max_iter=100, gradient="jfb",
                             vjp=(lambda z, a, v: (-xp.sin(z) * v, None)) if be.explicit_vjp else None)
    assert tuple(z.shape) == ()
    np.testing.assert_allclose(float(host(be, z)), 0.7390851332151607, atol=1e-10)


def batch_coupled(be):
    """Samples that read each other (a batch sum, as batch statistics do), contracting at
    different rates: the fast ones meet tol early, then their batch-mates move them again."""
    xp = be.xp
    s = xp.asarray(np.array([[0.0], [0.3], [0.7], [0.8]]))
    c = xp.asarray(np.ones((4, 1)))

    def f(z, args):
        return s * z + args + 0.02 * xp.sum(z, axis=0, keepdims=True)

    def vjp(z, args, v):
        return s * v + 0.02 * xp.sum(v, axis=0, keepdims=True), v

    return f, (vjp if be.explicit_vjp else None), c


def test_coupled_samples_are_never_reported_converged(be):
    f, vjp, c = batch_coupled(be)
    z0 = be.xp.zeros((4, 1), dtype=be.xp.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z, info = ic.fixed_point(f, z0, c, solver="fixed_point", tol=1e-6, max_iter=500, vjp=vjp)
    true = np.abs(host(be, f(z, c) - z))[:, 0]
    status = host(be, info.status)
    assert (status == 5).any(), status  # met tol while iterating, not on the returned batch
    assert not (host(be, info.converged) & (true > 1e-6)).any()
    np.testing.assert_allclose(host(be, info.residual), true, rtol=1e-12, atol=0)  # the true residual
    assert info.reasons()[int(np.flatnonzero(status == 5)[0])].startswith("residual above tol when re-measured")
    message = " ".join(str(w.message) for w in caught if issubclass(w.category, ic.ConvergenceWarning))
    assert "depend on each other" in message and "batched=False" in message
    # One system: no sample is frozen while the others move.
    z, info = ic.fixed_point(f, z0, c, solver="fixed_point", tol=1e-6, max_iter=500, vjp=vjp, batched=False)
    assert host(be, info.converged).all()
    assert np.abs(host(be, f(z, c) - z)).max() <= 1e-6


@pytest.mark.parametrize("solver", SOLVERS)
def test_reported_residual_is_the_true_one_for_independent_samples(be, solver):
    from helpers import tanh_case

    case = tanh_case(be, batch=6, n=8, norm=0.9)
    z, info = ic.fixed_point(case.f, case.z0, case.args, solver=solver, tol=1e-9, max_iter=200, vjp=case.vjp)
    true = np.linalg.norm(host(be, case.f(z, case.args) - z), axis=1)
    assert host(be, info.converged).all() and (host(be, info.status) == 1).all()
    np.testing.assert_allclose(host(be, info.residual), true, rtol=1e-9, atol=1e-15)


def test_the_solution_never_aliases_z0(be):
    """z0 already meets tol: the result must still be a new array (in-place edits stay local)."""
    xp = be.xp
    z0 = xp.ones((3, 4), dtype=xp.float64)
    z, info = ic.fixed_point(lambda z, a: z * 1.0, z0, None, tol=1e-6, gradient="jfb",
                             vjp=(lambda z, a, v: (v, None)) if be.explicit_vjp else None)
    assert host(be, info.steps).max() == 0
    if be.name == "jax":  # immutable arrays: nothing can be written through an alias
        return
    with be.forward_context():
        z[0, 0] = 42.0
    assert float(host(be, z0)[0, 0]) == 1.0


def test_max_iter_beyond_int32_runs_like_any_other(be):
    from helpers import tanh_case

    case = tanh_case(be)
    z, info = ic.fixed_point(case.f, case.z0, case.args, tol=1e-8, max_iter=2**31 + 5, vjp=case.vjp)
    steps = host(be, info.steps)
    assert host(be, info.converged).all() and 0 < steps.max() < 100


def test_solveinfo_methods_accept_leading_axes():
    """A SolveInfo whose arrays carry extra leading axes (as through jax.vmap)."""
    conv = np.array([[True, False], [True, True], [False, True]])
    status = np.where(conv, 1, 2)
    info = ic.SolveInfo(steps=np.full((3, 2), 7), residual=np.full((3, 2), 1e-3), rel_residual=np.ones((3, 2)),
                        converged=conv, status=status, solver="anderson")
    assert info.failed == [(0, 1), (2, 0)]
    assert info.reasons() == {(0, 1): "max_iter reached", (2, 0): "max_iter reached"}
    assert info.summary().startswith("anderson: 4/6 converged, steps max 7")
