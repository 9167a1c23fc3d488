"""Every gradient estimator, checked against what it promises."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit_core as ic
from helpers import GRADIENTS, SOLVERS, linear_case, tanh_case


def host(be, x):
    return np.asarray(be.to_python(x))


def loss_weights(be, shape, seed=1):
    return be.xp.asarray(np.random.default_rng(seed).standard_normal(shape))


def solve_grad(case, w, *, solver="anderson", gradient="ift", tol=1e-12, max_iter=300, **kw):
    z, info = ic.fixed_point(case.f, case.z0, case.args, solver=solver, gradient=gradient, tol=tol,
                             max_iter=max_iter, vjp=case.vjp, **kw)
    return z, info, case.grad(z, info, w)


def finite_difference(case, w, which, h=1e-6):
    """Central differences of L = sum(w * z*) with respect to args[which]."""
    be = case.be
    base = [host(be, a).copy() for a in case.args]
    dtype = case.z0.dtype
    grad = np.zeros_like(base[which])
    wh = host(be, w)
    for idx in np.ndindex(*base[which].shape):
        vals = []
        for sign in (1, -1):
            args = [a.copy() for a in base]
            args[which][idx] += sign * h
            z, _ = ic.fixed_point(case.f, case.z0, tuple(be.xp.asarray(a, dtype=dtype) for a in args),
                                  solver="anderson", tol=1e-14, max_iter=500)
            vals.append(np.sum(wh * host(be, z)))
        grad[idx] = (vals[0] - vals[1]) / (2 * h)
    return grad


@pytest.mark.parametrize("backward_solver", SOLVERS)
def test_ift_matches_finite_differences(be, backward_solver):
    if be.name == "jax":  # one solve (and one compilation) per entry: directional checks instead
        pytest.skip("JAX: jax.test_util.check_grads in tests/backends/test_jax.py")
    case = tanh_case(be, batch=3, n=5, norm=0.8)
    w = loss_weights(be, (3, 5))
    gradient = ic.get_gradient("ift", solver=backward_solver, tol=1e-13, max_iter=500)
    _, info, (gW, gc) = solve_grad(case, w, gradient=gradient, tol=1e-13)
    for which, got in ((0, gW), (1, gc)):
        fd = finite_difference(case, w, which)
        rel = np.linalg.norm(host(be, got) - fd) / np.linalg.norm(fd)
        assert rel < 1e-6, (backward_solver, which, rel)
    assert host(be, info.backward.converged).all()


def linear_exact(case, w):
    A, b = (host(case.be, a) for a in case.args)
    n = A.shape[0]
    z = np.linalg.solve(np.eye(n) - A, b.T).T
    u = np.linalg.solve(np.eye(n) - A.T, host(case.be, w).T).T
    return z, u, u.T @ z


def test_linear_ift_is_exact(be):
    case = linear_case(be)
    w = loss_weights(be, (4, 6))
    _, u_exact, gA_exact = linear_exact(case, w)
    _, _, (gA, gb) = solve_grad(case, w, gradient=ic.get_gradient("ift", tol=1e-13))
    np.testing.assert_allclose(host(be, gb), u_exact, atol=1e-8)
    np.testing.assert_allclose(host(be, gA), gA_exact, atol=1e-8)


@pytest.mark.parametrize("gradient", ["shine", "broyden_reuse"])
def test_linear_shine_and_reuse_exact_after_full_rank_adjoint_broyden(be, gradient):
    """Adjoint Broyden makes H^T exact on the explored space; on a linear map that is all of it."""
    case = linear_case(be)
    w = loss_weights(be, (4, 6))
    _, u_exact, gA_exact = linear_exact(case, w)
    solver = ic.get_solver("broyden", update="adjoint", m=20)
    est = ic.get_gradient("shine", fallback=None) if gradient == "shine" else gradient
    _, info, (gA, gb) = solve_grad(case, w, solver=solver, gradient=est, tol=1e-12, max_iter=50)
    np.testing.assert_allclose(host(be, gb), u_exact, atol=1e-6)
    np.testing.assert_allclose(host(be, gA), gA_exact, atol=1e-6)


def test_linear_jfb_is_g_times_df_dargs(be):
    case = linear_case(be)
    w = loss_weights(be, (4, 6))
    z, _, (gA, gb) = solve_grad(case, w, gradient="jfb")
    np.testing.assert_array_equal(host(be, gb), host(be, w))
    # Exact at the solver's z*; autodiff backends return F(z*), which differs by the residual.
    np.testing.assert_allclose(host(be, gA), host(be, w).T @ host(be, z), rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [1, 2, 4, 9])
def test_linear_phantom_is_geng_et_al_formula(be, k):
    """``u = lam Σ_{t<k} (lam Aᵀ + (1 - lam) I)ᵗ g`` (TorchDEQ's ``grad=k, tau=lam``)."""
    case = linear_case(be)
    w = loss_weights(be, (4, 6))
    A, g = host(be, case.args[0]), host(be, w)
    n = A.shape[0]
    for lam in (1.0, 0.6):
        M = lam * A + (1 - lam) * np.eye(n)  # rows: u @ M = (lam Aᵀ + (1 - lam) I) u
        expected = lam * sum(g @ np.linalg.matrix_power(M, t) for t in range(k))
        _, _, (_, gb) = solve_grad(case, w, gradient=ic.get_gradient("phantom", k=k, damping=lam))
        np.testing.assert_allclose(host(be, gb), expected, atol=1e-12)
    if k == 1:  # k = 1, lam = 1 is JFB
        _, _, (_, gb_jfb) = solve_grad(case, w, gradient="jfb")
        np.testing.assert_allclose(host(be, gb), host(be, gb_jfb) * 0.6, atol=1e-12)


def cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_shine_refine_converges_to_ift(be):
    case = tanh_case(be, batch=4, n=12, norm=0.9)
    w = loss_weights(be, (4, 12))
    _, _, (gW_ift, _) = solve_grad(case, w, solver="broyden", gradient=ic.get_gradient("ift", tol=1e-13))
    errors = []
    for refine in (0, 2, 8, 30):
        _, _, (gW, _) = solve_grad(case, w, solver="broyden", gradient=ic.get_gradient("shine", refine=refine), tol=1e-10)
        errors.append(np.linalg.norm(host(be, gW) - host(be, gW_ift)))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 * errors[0]


def test_shine_fallback_only_for_the_poor_samples(be):
    """A forward run of one step leaves H = -I + (one rank-one term); a sample whose estimate
    is implausibly long is replaced by g, the others keep SHINE's value."""
    case = tanh_case(be, batch=6, n=8, norm=0.9)
    w = loss_weights(be, (6, 8))
    _, info, _ = solve_grad(case, w, solver="broyden", gradient=ic.get_gradient("shine", fallback=1.0), tol=1e-10)
    fallback = host(be, info.extras["fallback"])
    # Recompute what SHINE did by hand and check the per-sample rule.
    z, info2 = ic.fixed_point(case.f, case.z0, case.args, solver="broyden", gradient=ic.get_gradient("shine", fallback=None), tol=1e-10, vjp=case.vjp)
    u_raw = host(be, case.grad(z, info2, w)[1])  # d/dc of f is diag(s): recover u from v_c = u * (1 - y^2)
    assert not host(be, info2.extras["fallback"]).any()
    z3, info3 = ic.fixed_point(case.f, case.z0, case.args, solver="broyden", gradient=ic.get_gradient("shine", fallback=1.0), tol=1e-10, vjp=case.vjp)
    gc_fb = host(be, case.grad(z3, info3, w)[1])
    fb = host(be, info3.extras["fallback"])
    assert fb.any() and not fb.all(), "construct a mix of fallen-back and kept samples"
    np.testing.assert_array_equal(fb, fallback)
    np.testing.assert_allclose(gc_fb[~fb], u_raw[~fb], rtol=0, atol=1e-15)
    # the same forward iterates as SHINE's (whose default Broyden update is the adjoint one)
    adjoint = ic.get_solver("broyden", update="adjoint")
    z_jfb, info_jfb = ic.fixed_point(case.f, case.z0, case.args, solver=adjoint, gradient="jfb", tol=1e-10, vjp=case.vjp)
    gc_jfb = host(be, case.grad(z_jfb, info_jfb, w)[1])
    np.testing.assert_allclose(gc_fb[fb], gc_jfb[fb], rtol=0, atol=1e-15)


def test_broyden_reuse_steps_refine_towards_ift(be):
    case = tanh_case(be, batch=4, n=10, norm=0.9)
    w = loss_weights(be, (4, 10))
    _, _, (gW_ift, _) = solve_grad(case, w, solver="broyden", gradient=ic.get_gradient("ift", tol=1e-13))
    err = {}
    for steps in (0, 15):
        _, _, (gW, _) = solve_grad(case, w, solver="broyden", gradient=ic.get_gradient("broyden_reuse", steps=steps), tol=1e-10)
        err[steps] = np.linalg.norm(host(be, gW) - host(be, gW_ift))
    assert err[15] < 1e-2 * err[0]


@pytest.mark.parametrize("gradient", ["jfb", "phantom", "shine", "broyden_reuse"])
def test_approximate_gradients_point_the_right_way(be, gradient):
    """Cosine to the exact gradient on a contractive cell (documented thresholds)."""
    case = tanh_case(be, batch=8, n=16, norm=0.7)
    w = loss_weights(be, (8, 16))
    _, _, (gW_ift, gc_ift) = solve_grad(case, w, solver="broyden", gradient=ic.get_gradient("ift", tol=1e-12), tol=1e-10)
    _, _, (gW, gc) = solve_grad(case, w, solver="broyden", gradient=gradient, tol=1e-10)
    assert cosine(host(be, gW), host(be, gW_ift)) > 0.8
    assert cosine(host(be, gc), host(be, gc_ift)) > 0.8


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 10), batch=st.integers(1, 4), norm=st.floats(0.1, 0.9))
def test_property_jfb_is_a_descent_direction(seed, n, batch, norm):
    """Fung et al.: for contractive f, <JFB, exact> > 0 (the JFB step lowers the loss)."""
    be = ic.get_backend("numpy")
    case = tanh_case(be, batch=batch, n=n, norm=norm, seed=seed)
    w = np.random.default_rng(seed + 1).standard_normal((batch, n))
    _, _, exact = solve_grad(case, w, gradient=ic.get_gradient("ift", tol=1e-12))
    _, _, approx = solve_grad(case, w, gradient="jfb")
    flat = lambda g: np.concatenate([np.ravel(x) for x in g])  # noqa: E731
    assert flat(exact) @ flat(approx) > 0


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_every_estimator_runs_with_broyden_and_reports(be, gradient):
    case = tanh_case(be)
    w = loss_weights(be, (5, 8))
    _, info, (gW, gc) = solve_grad(case, w, solver="broyden", gradient=gradient, tol=1e-8)
    assert np.isfinite(host(be, gW)).all() and np.isfinite(host(be, gc)).all()
    assert info.gradient == gradient


@pytest.mark.parametrize("gradient", ["shine", "broyden_reuse"])
@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_inverse_reusing_estimators_need_a_quasi_newton_solver(be, gradient, solver):
    case = tanh_case(be)
    with pytest.raises(ic.ConfigurationError, match="broyden"):
        ic.fixed_point(case.f, case.z0, case.args, solver=solver, gradient=gradient, vjp=case.vjp)


def test_backward_non_convergence_is_reported(be):
    case = tanh_case(be, norm=0.95)
    w = loss_weights(be, (5, 8))
    z, info = ic.fixed_point(case.f, case.z0, case.args, tol=1e-10, max_iter=200, vjp=case.vjp,
                             gradient=ic.get_gradient("ift", solver="fixed_point", max_iter=2), on_fail="raise")
    with pytest.raises(ic.ConvergenceError, match="backward"):
        case.grad(z, info, w)
    assert not host(be, info.backward.converged).any()


@pytest.mark.parametrize("gradient", ["ift", "shine", "broyden_reuse"])
def test_root_form_gradients_equal_fixed_point_form(be, gradient):
    """g(z) = z - f(z) with its own VJP gives the same dL/dargs as the fixed-point form."""
    case = tanh_case(be, batch=3, n=6)
    w = loss_weights(be, (3, 6))
    g = lambda z, a: z - case.f(z, a)  # noqa: E731

    def g_vjp(z, a, v):
        vz, va = case.vjp(z, a, v)
        return v - vz, tuple(-x for x in va)

    g_vjp = g_vjp if case.vjp is not None else None
    ift = ic.get_gradient("ift", tol=1e-13, max_iter=300) if gradient == "ift" else gradient
    solver = ic.get_solver("broyden", update="adjoint")
    z_fp, info_fp = ic.fixed_point(case.f, case.z0, case.args, solver=solver, gradient=ift, tol=1e-12, max_iter=100, vjp=case.vjp)
    z_root, info_root = ic.root(g, case.z0, case.args, solver=solver, gradient=ift, tol=1e-12, max_iter=100, vjp=g_vjp)
    for a, b in zip(case.grad(z_fp, info_fp, w), case.grad(z_root, info_root, w)):
        np.testing.assert_allclose(host(be, b), host(be, a), atol=1e-9)


def test_rel_stop_mode_uses_the_relative_residual(be):
    case = tanh_case(be)
    _, info = ic.fixed_point(case.f, case.z0, case.args, tol=1e-6, stop_mode="rel", max_iter=100)
    rel, absolute = host(be, info.rel_residual), host(be, info.residual)
    assert (rel <= 1e-6).all() and host(be, info.converged).all()
    assert not np.allclose(rel, absolute)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_broyden_reuse_costs_one_vjp_per_step(steps):
    """Its last step is taken unmeasured: ``steps`` VJPs, plus the one that maps ``u`` to ``dL/dθ``."""
    be = ic.get_backend("numpy")
    case = tanh_case(be, batch=4, n=10, norm=0.9)
    calls = []

    def vjp(z, args, v):
        calls.append(1)
        return case.vjp(z, args, v)

    z, info = ic.fixed_point(case.f, case.z0, case.args, solver="broyden", tol=1e-10, vjp=vjp,
                             gradient=ic.get_gradient("broyden_reuse", steps=steps))
    forward_calls = len(calls)
    info.vjp(loss_weights(be, (4, 10)))
    assert len(calls) - forward_calls == steps + 1
    assert int(np.max(info.backward.steps)) == steps - 1


def test_broyden_reuse_falls_back_to_jfb_where_the_forward_estimate_is_no_inverse(be):
    """A sample whose continuation starts with an adjoint residual above twice that of ``u = 0``
    gets ``u = g``; the others keep the quasi-Newton step (here exact: their estimate is exact).
    With ``fallback=None`` the garbage sample keeps its step."""
    from implicit_gradients.broyden_reuse import BroydenReuse

    case = linear_case(be, batch=4, n=6, norm=0.7)
    A = host(be, case.args[0])
    H = np.linalg.inv(A - np.eye(6))  # (dg/dz)^-1 with g = F - I: the exact inverse
    # H = -I + U^T V with U = I; sample 0's V is garbage
    V = np.broadcast_to(H + np.eye(6), (4, 6, 6)).copy()
    V[0] += 5.0 * np.random.default_rng(3).standard_normal((6, 6))
    U = np.broadcast_to(np.eye(6), (4, 6, 6)).copy()
    rigged = ic.plugin.LowRankInverse(be.xp.asarray(U), be.xp.asarray(V), be.xp)
    seen = []

    class Rigged(BroydenReuse):
        name = "rigged_broyden_reuse"

        def estimate(self, ctx):
            ctx.inverse = lambda: rigged
            u = super().estimate(ctx)
            seen.append((host(be, ctx.g), host(be, u), host(be, -rigged.rmatvec(ctx.g))))
            return u

    w = loss_weights(be, (4, 6))
    for fallback in (2.0, None):
        z, info = ic.fixed_point(case.f, case.z0, case.args, solver="broyden", gradient=Rigged(fallback=fallback),
                                 tol=1e-10, vjp=case.vjp)
        case.grad(z, info, w)
        g, u, u0 = seen[-1]
        exact = np.linalg.solve((np.eye(6) - A).T, g.T).T  # u = g + u A (rows: the VJP is v A)
        residual = lambda x: np.linalg.norm(g + x @ A - x, axis=-1)  # noqa: E731
        assert residual(u0)[0] > 2 * np.linalg.norm(g[0])  # the garbage estimate: far worse than u = 0
        if fallback is None:
            assert np.linalg.norm(u[0] - exact[0]) > np.linalg.norm(g[0] - exact[0])
        else:
            np.testing.assert_array_equal(u[0], g[0])
        np.testing.assert_allclose(u[1:], exact[1:], rtol=1e-8, atol=1e-12)
