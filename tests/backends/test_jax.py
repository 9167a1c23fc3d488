"""What only the JAX backend does: jit, vmap, grad transformations, pytrees, closures, sharding."""

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import implicit_core as ic
from implicit_core.cells import tanh_cell, tanh_cell_vjp

jax = pytest.importorskip("jax")
jnp = jax.numpy
from jax.test_util import check_grads  # noqa: E402

SOLVERS = ["fixed_point", "anderson", "broyden"]
PAIRS = [(s, g) for s in SOLVERS for g in ("ift", "jfb", "phantom")] + [("broyden", "shine"), ("broyden", "broyden_reuse")]


def _problem(batch=4, n=6, norm=0.7, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n))
    W *= norm / np.linalg.norm(W, 2)
    return jnp.asarray(W), jnp.asarray(rng.standard_normal((batch, n)))


def _cell(z, args):
    W, c = args
    return jnp.tanh(z @ W.T + c)


def _layer(solver, gradient="ift", **kw):
    def layer(W, c):
        z, _ = ic.fixed_point(_cell, jnp.zeros_like(c), (W, c), solver=solver, gradient=gradient, **kw)
        return z

    return layer


@pytest.mark.parametrize("solver", SOLVERS)
def test_check_grads_ift_through_every_solver(solver):
    W, c = _problem()
    gradient = ic.get_gradient("ift", solver=solver, tol=1e-12, max_iter=300)
    check_grads(_layer(solver, gradient, tol=1e-12, max_iter=300), (W, c), order=1, modes=["rev"],
                atol=1e-6, rtol=1e-6, eps=1e-6)


@pytest.mark.parametrize("solver,gradient", PAIRS)
def test_jit_every_solver_and_estimator(solver, gradient):
    """No Python-side concretisation anywhere: the jitted value and gradient equal the eager ones."""
    W, c = _problem()
    kw = dict(tol=1e-10, max_iter=100, on_fail="ignore")

    def loss(W, c):
        return jnp.sum(_layer(solver, gradient, **kw)(W, c) ** 2)

    eager = jax.value_and_grad(loss, argnums=(0, 1))(W, c)
    jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(W, c)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-9, atol=1e-12)


def test_vmap_over_a_batch_of_problems():
    Ws = jnp.stack([_problem(seed=s)[0] for s in range(3)])
    c = _problem()[1]
    layer = _layer("anderson", tol=1e-10, max_iter=100)
    batched = jax.jit(jax.vmap(layer, in_axes=(0, None)))(Ws, c)
    single = jax.jit(layer)  # compiled once for the three problems
    for i in range(3):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single(Ws[i], c)), atol=1e-12)
    grads = jax.jit(jax.vmap(jax.grad(lambda W, c: jnp.sum(layer(W, c))), in_axes=(0, None)))(Ws, c)
    one = jax.jit(jax.grad(lambda W: jnp.sum(layer(W, c))))  # compiled once for the three problems
    for i in range(3):
        np.testing.assert_allclose(np.asarray(grads[i]), np.asarray(one(Ws[i])), atol=1e-10)


def test_derivatives_of_every_order_with_ift():
    """jvp, jacfwd = jacrev and grad of grad, against finite differences (float64); the hessian
    (forward over reverse) and Broyden in the root test below. Each derivative is compiled once
    (jit) and evaluated at the points the differences need. (Fixed-point iteration forward and
    backward: the derivative rules do not depend on the solver, and it compiles fastest.)"""
    W, c = _problem()
    ift = ic.get_gradient("ift", solver="fixed_point", tol=1e-12, max_iter=300)
    layer = _layer("fixed_point", ift, tol=1e-12, max_iter=300)
    L = jax.jit(lambda s: jnp.sum(layer(W * s, c) ** 2))
    h = 1e-5
    d1 = jax.jit(jax.grad(L))
    fd1 = (L(1.0 + h) - L(1.0 - h)) / (2 * h)
    np.testing.assert_allclose(float(jax.jit(lambda s: jax.jvp(L, (s,), (1.0,))[1])(1.0)), float(fd1), rtol=1e-6)
    fd2 = (d1(1.0 + h) - d1(1.0 - h)) / (2 * h)
    np.testing.assert_allclose(float(jax.jit(jax.grad(d1))(1.0)), float(fd2), rtol=1e-5)
    rows = lambda c: layer(W, c).sum(0)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.jit(jax.jacfwd(rows))(c)), np.asarray(jax.jit(jax.jacrev(rows))(c)),
                               rtol=0, atol=1e-8)


def test_derivatives_of_a_root_through_forward_and_reverse_mode():
    """root(g) with g written the optimistix way, f(x) - x: jacfwd = jacrev, hessian = FD."""
    W, c = _problem()
    solve = lambda c: ic.root(lambda z, a: _cell(z, a) - z, jnp.zeros_like(c), (W, c), tol=1e-11,  # noqa: E731
                              max_iter=200, gradient=ic.get_gradient("ift", tol=1e-11, max_iter=300))[0]
    rows = lambda c: solve(c).sum(0)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.jit(jax.jacfwd(rows))(c)), np.asarray(jax.jit(jax.jacrev(rows))(c)),
                               rtol=0, atol=1e-8)
    L = lambda s: jnp.sum(solve(c * s) ** 3)  # noqa: E731
    d1, h = jax.jit(jax.grad(L)), 1e-5
    np.testing.assert_allclose(float(jax.jit(jax.hessian(L))(1.0)), float((d1(1.0 + h) - d1(1.0 - h)) / (2 * h)),
                               rtol=1e-5)


def test_grad_of_grad_through_jfb_on_a_linear_map():
    """With J independent of the parameter, JFB's second derivative is the derivative of its
    first (the linear-solve rule du = E(dg - dAᵀu) reduces to du = dg)."""
    A, b = _problem()
    A = A * 0.5
    L = lambda s: jnp.sum(ic.fixed_point(lambda z, a: z @ A.T + a, jnp.zeros_like(b), s * b, gradient="jfb",  # noqa: E731
                                         tol=1e-13, max_iter=200)[0] ** 2)
    d1, h = jax.jit(jax.grad(L)), 1e-5
    np.testing.assert_allclose(float(jax.jit(jax.grad(d1))(1.0)), float((d1(1.0 + h) - d1(1.0 - h)) / (2 * h)),
                               rtol=1e-6)


def test_pytree_state_and_args_and_closure_capture():
    W, c = _problem(n=6)
    V = jnp.asarray(np.random.default_rng(3).standard_normal((3, 6)) * 0.2)

    def cell(z, params):  # state: a dict of two arrays; args: a dict
        a = jnp.tanh(z["a"] @ params["W"].T + z["b"] @ params["V"] + c)
        b = jnp.tanh(0.5 * z["b"] + 0.1 * a[:, :3])
        return {"a": a, "b": b}

    z0 = {"a": jnp.zeros((4, 6)), "b": jnp.zeros((4, 3))}

    def loss_args(params):
        z, _ = ic.fixed_point(cell, z0, params, tol=1e-12, max_iter=200)
        return jnp.sum(z["a"] ** 2) + jnp.sum(z["b"])

    def loss_closure(W):  # W captured by the function, not passed as args
        z, _ = ic.fixed_point(lambda z, p: cell(z, {"W": W, "V": p}), z0, V, tol=1e-12, max_iter=200)
        return jnp.sum(z["a"] ** 2) + jnp.sum(z["b"])

    g_args = jax.jit(jax.grad(loss_args))({"W": W, "V": V})
    g_closure = jax.jit(jax.grad(loss_closure))(W)
    np.testing.assert_allclose(np.asarray(g_closure), np.asarray(g_args["W"]), atol=1e-10)
    # (jitted: check_grads evaluates the loss at many points, each an eager trace otherwise)
    check_grads(jax.jit(loss_closure), (W,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)


def test_nested_in_a_scan():
    W, c = _problem()

    def step(carry, c_t):
        z, _ = ic.fixed_point(_cell, carry, (W, c_t), tol=1e-10, max_iter=100)
        return z, jnp.sum(z)

    def run(W_scale):
        def step_scaled(carry, c_t):
            z, _ = ic.fixed_point(_cell, carry, (W * W_scale, c_t), tol=1e-10, max_iter=100)
            return z, jnp.sum(z)

        _, out = jax.lax.scan(step_scaled, jnp.zeros_like(c), jnp.stack([c, 0.5 * c, -c]))
        return jnp.sum(out)

    _, out = jax.lax.scan(step, jnp.zeros_like(c), jnp.stack([c, 0.5 * c, -c]))
    assert out.shape == (3,)
    g = jax.jit(jax.grad(run))(1.0)
    h = 1e-6
    np.testing.assert_allclose(float(g), float((run(1.0 + h) - run(1.0 - h)) / (2 * h)), rtol=1e-5)


def test_on_fail_eager_and_under_jit():
    W, c = _problem(norm=0.95)
    solve = lambda W, on_fail: ic.fixed_point(_cell, jnp.zeros_like(c), (W, c), tol=1e-14, max_iter=2,  # noqa: E731
                                              on_fail=on_fail)
    with pytest.raises(ic.ConvergenceError) as err:
        solve(W, "raise")
    assert err.value.info.failed == [0, 1, 2, 3]
    with pytest.raises(Exception, match="did not converge"):  # a JaxRuntimeError carrying our message
        jax.jit(lambda W: solve(W, "raise")[0])(W).block_until_ready()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.jit(lambda W: solve(W, "warn")[0])(W).block_until_ready()
        jax.effects_barrier()
    assert any(issubclass(w.category, ic.ConvergenceWarning) for w in caught)
    z, info = jax.jit(lambda W: solve(W, "ignore"))(W)
    assert not bool(info.converged.any()) and info.steps.shape == (4,)


@pytest.mark.slow
def test_sharded_batch_equals_single_device():
    """Two CPU devices (XLA_FLAGS), batch sharded across them: same solution and gradient."""
    code = textwrap.dedent("""
        import numpy as np, jax, jax.numpy as jnp
        jax.config.update("jax_enable_x64", True)
        import implicit_core as ic
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        assert len(jax.devices()) == 2, jax.devices()
        rng = np.random.default_rng(0)
        W = rng.standard_normal((16, 16)); W *= 0.8 / np.linalg.norm(W, 2)
        W, c = jnp.asarray(W), jnp.asarray(rng.standard_normal((8, 16)))
        def loss(W, c):
            z, info = ic.fixed_point(lambda z, a: jnp.tanh(z @ a[0].T + a[1]), jnp.zeros_like(c), (W, c),
                                     solver="broyden", tol=1e-12, max_iter=100)
            return jnp.sum(z ** 2), z
        f = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (v1, z1), g1 = f(W, c)
        mesh = Mesh(np.array(jax.devices()), ("batch",))
        c_sharded = jax.device_put(c, NamedSharding(mesh, P("batch", None)))
        (v2, z2), g2 = f(W, c_sharded)
        assert len(z2.sharding.device_set) == 2, z2.sharding
        np.testing.assert_allclose(np.asarray(z2), np.asarray(z1), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), rtol=0, atol=1e-11)
        print("ok", float(v1), float(v2))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


def test_vmap_over_unbatched_problems_reports_per_problem():
    """batched=False under jax.vmap: each mapped problem is one system; info keeps the mapped
    axis, and its methods name the failed problems."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 5, 5))
    A *= (np.array([0.5, 0.99, 0.7]) / np.linalg.norm(A, 2, axis=(1, 2)))[:, None, None]
    b = jnp.asarray(rng.standard_normal((3, 5)))

    def solve(A, b):
        return ic.fixed_point(lambda z, a: a[0] @ z + a[1], jnp.zeros(5), (A, b), batched=False, tol=1e-10,
                              solver="fixed_point", max_iter=60, on_fail="ignore")

    z, info = jax.jit(jax.vmap(solve))(jnp.asarray(A), b)
    assert info.steps.shape == (3, 1)
    assert info.failed == [(1, 0)] and info.reasons() == {(1, 0): "max_iter reached"}
    assert "2/3 converged" in info.summary()
    for i in (0, 2):
        np.testing.assert_allclose(np.asarray(z[i]), np.linalg.solve(np.eye(5) - A[i], np.asarray(b[i])), atol=1e-8)


def test_repeated_eager_solves_compile_once_and_see_current_values(caplog):
    """An eager call is compiled once per function, configuration and shapes; values the
    function reads at call time (a reassigned global, a captured scalar) still take effect."""
    import logging

    W, c = _problem()
    scale = {"s": 1.0}

    def cell(z, a):
        return jnp.tanh(scale["s"] * z @ W.T + a)

    solve = lambda: ic.fixed_point(cell, jnp.zeros_like(c), c, tol=1e-11, max_iter=200)[0]  # noqa: E731
    solve()
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            z1 = solve()
        assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
        scale["s"] = 0.5  # the same function object, a different map
        z2 = solve()
    finally:
        jax.config.update("jax_log_compiles", False)
    np.testing.assert_allclose(np.asarray(z2), np.asarray(jnp.tanh(0.5 * z2 @ W.T + c)), atol=1e-9)
    assert float(jnp.abs(z1 - z2).max()) > 1e-3


def test_jacobian_penalty_under_jit_and_grad():
    W, c = _problem()

    def penalty(W, c, shared):
        z, info = ic.fixed_point(_cell, jnp.zeros_like(c), (W, c), tol=1e-10, jac_reg=shared, jac_seed=5)
        if shared:
            return info.jac_loss.mean()
        return ic.jacobian_regularisation(_cell, z, (W, c), seed=5).mean()

    value, grad = jax.jit(jax.value_and_grad(penalty), static_argnums=2)(W, c, True)
    value_sep, grad_sep = jax.value_and_grad(penalty)(W, c, False)
    np.testing.assert_allclose(value, value_sep, rtol=1e-12)
    np.testing.assert_allclose(grad, grad_sep, rtol=1e-10, atol=1e-14)


def test_broyden_with_a_long_history_under_jit():
    """A history of more than 65536 entries is kept in blocks under a trace and read a few
    blocks at a time (with_history), in Broyden's own update and in its OPA steps: the same
    solution and SHINE gradient as NumPy's single buffer."""
    W, c = _problem(batch=64, n=48, norm=0.9)
    solver = ic.get_solver("broyden", m=30, opa=lambda z: z)

    def loss(W, c):
        z, _ = ic.fixed_point(_cell, jnp.zeros_like(c), (W, c), solver=solver, gradient="shine", tol=1e-9, max_iter=60)
        return jnp.sum(z**2)

    value, grad = jax.jit(jax.value_and_grad(loss))(W, c)
    W_np, c_np = np.asarray(W), np.asarray(c)
    z, info = ic.fixed_point(tanh_cell, np.zeros_like(c_np), (W_np, c_np), vjp=tanh_cell_vjp, solver=solver,
                             gradient="shine", tol=1e-9, max_iter=60)
    np.testing.assert_allclose(value, np.sum(z**2), rtol=1e-10)
    # (SHINE reads the estimate its path built: float64 sums in another order move it by ~1e-7)
    np.testing.assert_allclose(np.asarray(grad), info.vjp(2 * z)[0], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("m", [30, 5])
def test_broyden_good_update_kept_as_steps_under_jit(m, monkeypatch):
    """The good update's steps, kept in blocks under a trace and read a few blocks at a time,
    restarted when full (m = 5), give the same solution and SHINE gradient (which reads the
    compact estimate) as NumPy's eager buffers."""
    import implicit_solvers.broyden as broyden

    monkeypatch.setattr(broyden, "STEPS_FROM", 0)  # (kept as steps on this state of 48 numbers a sample)
    W, c = _problem(batch=64, n=48, norm=0.9)
    solver = ic.get_solver("broyden", m=m, update="good")

    def loss(W, c):
        z, _ = ic.fixed_point(_cell, jnp.zeros_like(c), (W, c), solver=solver, gradient="shine", tol=1e-9, max_iter=60)
        return jnp.sum(z**2)

    value, grad = jax.jit(jax.value_and_grad(loss))(W, c)
    W_np, c_np = np.asarray(W), np.asarray(c)
    z, info = ic.fixed_point(tanh_cell, np.zeros_like(c_np), (W_np, c_np), vjp=tanh_cell_vjp, solver=solver,
                             gradient="shine", tol=1e-9, max_iter=60)
    assert info.steps.max() > min(m + 1, 16)  # (m = 5 restarts; m = 30 reads the third block)
    np.testing.assert_allclose(value, np.sum(z**2), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(grad), info.vjp(2 * z)[0], rtol=1e-6, atol=1e-5)
