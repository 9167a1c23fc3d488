"""Every built-in solver on the shared problem set, on every backend."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import implicit_core as ic
from helpers import SOLVERS, linear_case, tanh_case, tuple_case

# Steps to tol 1e-10 on the linear reference map (n = 6, ||A|| = 0.7), measured; a regression
# in any solver's convergence speed shows up here.
MAX_STEPS = {"fixed_point": 75, "anderson": 25, "broyden": 16}


@pytest.mark.parametrize("solver", SOLVERS)
def test_linear_map_reaches_closed_form(be, solver):
    case = linear_case(be)
    z, info = ic.fixed_point(case.f, case.z0, case.args, solver=solver, tol=1e-10, max_iter=200, vjp=case.vjp)
    A, b = (case.to_host(a) for a in case.args)
    z_exact = np.linalg.solve(np.eye(A.shape[0]) - A, b.T).T
    np.testing.assert_allclose(case.to_host(z), z_exact, atol=1e-9)
    assert case.to_host(info.converged).all()
    assert case.to_host(info.residual).max() <= 1e-10
    assert case.to_host(info.steps).max() <= MAX_STEPS[solver]


@pytest.mark.parametrize("solver", SOLVERS)
def test_half_precision_state_is_solved_in_float32(be, solver):
    """A float16 state: the function runs in float16, the solver's arithmetic in float32."""
    xp = be.xp
    rng = np.random.default_rng(0)
    A = rng.standard_normal((8, 8))
    A *= 0.7 / np.linalg.norm(A, 2)
    b = rng.standard_normal((4, 8))
    seen = []

    def f(z, args):
        seen.append(z.dtype)
        A16, b16 = args
        return xp.tanh(z @ A16.T + b16)

    if not hasattr(xp, "float16"):
        pytest.skip(f"{be.name} has no float16 (the array API standard does not require it)")
    args16 = (xp.asarray(A.astype(np.float16)), xp.asarray(b.astype(np.float16)))
    z, info = ic.fixed_point(f, xp.zeros((4, 8), dtype=xp.float16), args16, solver=solver, tol=1e-2,
                             stop_mode="rel")
    assert z.dtype == xp.float16 and all(d == xp.float16 for d in seen)
    assert info.residual.dtype == xp.float32 and bool(xp.all(info.converged))
    z64, _ = ic.fixed_point(lambda z, a: xp.tanh(z @ a[0].T + a[1]), xp.zeros((4, 8), dtype=xp.float64),
                            (xp.asarray(A), xp.asarray(b)), tol=1e-12, max_iter=200)
    np.testing.assert_allclose(np.asarray(be.to_python(z), dtype=np.float64), be.to_python(z64), atol=2e-2)


@pytest.mark.parametrize("solver", SOLVERS)
def test_tuple_state_of_different_shapes(be, solver):
    case = tuple_case(be)
    (a, b), info = ic.fixed_point(case.f, case.z0, case.args, solver=solver, tol=1e-9, max_iter=200)
    assert a.shape == (3, 4) and b.shape == (3, 2, 3)
    fa, fb = case.f((a, b), case.args)
    assert np.abs(case.to_host(fa - a)).max() < 1e-8
    assert np.abs(case.to_host(fb - b)).max() < 1e-8


@pytest.mark.parametrize("solver", SOLVERS)
def test_per_sample_stopping_freezes_converged_samples(be, solver):
    """Easy samples (saturating input, tiny Jacobian) stop early; their result is the one they converged to."""
    xp = be.xp
    case = tanh_case(be, batch=4, n=8, norm=0.9)
    W, c = case.args
    scale = xp.asarray(np.array([5.0, 0.05, 5.0, 0.05])[:, None])  # saturated tanh = easy
    args = (W, c * scale)
    z, info = ic.fixed_point(case.f, case.z0, args, solver=solver, tol=1e-8, max_iter=300, trace=True)
    steps = case.to_host(info.steps)
    assert steps[0] < steps[1] and steps[2] < steps[3]
    trace = case.to_host(info.trace)
    # After its last step, the easy sample's recorded residual never changes again.
    assert np.all(trace[steps[0] :, 0] == trace[steps[0], 0])
    # ... and the result of a sample does not depend on its batch-mates.
    z_alone, _ = ic.fixed_point(case.f, case.z0[:1, ...], (W, args[1][:1, ...]), solver=solver, tol=1e-8, max_iter=300)
    np.testing.assert_allclose(case.to_host(z)[:1], case.to_host(z_alone), rtol=0, atol=1e-12)


def test_trace_has_one_row_per_step(be):
    case = tanh_case(be)
    _, info = ic.fixed_point(case.f, case.z0, case.args, solver="anderson", tol=1e-8, max_iter=100, trace=True)
    trace = case.to_host(info.trace)
    assert trace.shape == (case.to_host(info.steps).max() + 1, 5)
    assert np.all(trace[-1] <= 1e-8)


@pytest.mark.parametrize("solver", SOLVERS)
def test_non_finite_sample_is_stopped_and_reported_alone(be, solver):
    xp = be.xp
    case = tanh_case(be, batch=3)

    def f(z, args):
        out = case.f(z, args)
        # Sample 1 produces NaN once its iterate moves away from zero.
        poison = xp.where(xp.abs(z[1:2, :1]) > 0, xp.asarray(float("nan"), dtype=z.dtype), 0.0)
        return xp.concat([out[:1, ...], out[1:2, ...] + poison, out[2:, ...]], axis=0)

    z, info = ic.fixed_point(f, case.z0, case.args, solver=solver, tol=1e-8, max_iter=100, on_fail="ignore")
    status = case.to_host(info.status)
    assert list(status) == [1, 3, 1]
    assert info.failed == [1]
    assert info.reasons() == {1: "non-finite values"}
    assert np.isfinite(case.to_host(z)).all()  # the last finite iterate is returned


def test_divergence_stops_the_sample(be):
    xp = be.xp
    z0 = xp.asarray(np.array([[1.0], [0.0]]))
    f = lambda z, a: 3.0 * z  # noqa: E731  expanding; sample 1 sits on the fixed point 0
    z, info = ic.fixed_point(f, z0, solver="fixed_point", tol=1e-10, max_iter=100, on_fail="ignore", divergence=1e3)
    assert list(case_host(be, info.status)) == [4, 1]
    assert case_host(be, info.steps)[0] < 10


def case_host(be, x):
    return np.asarray(be.to_python(x))


def test_anderson_singular_least_squares_does_not_crash(be):
    """Identical history rows (a map that returns a constant) make G G^T singular."""
    xp = be.xp
    const = xp.asarray(np.ones((2, 5)))
    z, info = ic.fixed_point(lambda z, a: const, xp.zeros((2, 5), dtype=const.dtype), solver=ic.get_solver("anderson", m=4, lam=0.0), tol=1e-12, max_iter=10)
    np.testing.assert_allclose(case_host(be, z), 1.0)
    # A map with NaN in one sample's history: that sample falls back, the other converges.
    z, info = ic.fixed_point(lambda z, a: z * 0.5, xp.asarray(np.ones((2, 3))), solver=ic.get_solver("anderson", lam=0.0), tol=1e-12, max_iter=100)
    assert case_host(be, info.converged).all()


@pytest.mark.parametrize("unrolled", [False, True], ids=["factorised", "unrolled"])
def test_a_singular_small_system_fails_only_its_own_sample(be, unrolled):
    """``solve_small``: one exactly singular matrix in the batch gives NaN for that sample only."""
    from implicit_core.plugin import solve_small

    xp = be.xp
    A = np.stack([np.eye(3) * 2.0, np.zeros((3, 3)), [[4.0, 1, 0], [1, 3, 0], [0, 0, 1]]])
    b = np.ones((3, 3, 1))
    with np.errstate(divide="ignore", invalid="ignore"):  # (NumPy's warnings about the singular one)
        x = case_host(be, solve_small(xp, xp.asarray(A), xp.asarray(b), unrolled=unrolled))
    np.testing.assert_allclose(x[0], np.linalg.solve(A[0], b[0]), rtol=1e-12)
    np.testing.assert_allclose(x[2], np.linalg.solve(A[2], b[2]), rtol=1e-12)
    assert not np.isfinite(x[1]).all()


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 10), seed=st.integers(0, 2**16), ridge=st.floats(1e-6, 1.0))
def test_unrolled_small_solve_equals_the_factorised_one_on_spd_systems(m, seed, ridge):
    """Elimination without pivoting (``unrolled=True``) on regularised Gram matrices, as Anderson
    builds them: the same solution as LAPACK's pivoted factorisation, to float64 rounding."""
    from implicit_core.plugin import solve_small

    xp = ic.get_backend("numpy").xp
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((4, m, 3 * m)) * rng.uniform(0.01, 100.0, (4, 1, 1))
    A = G @ np.swapaxes(G, 1, 2)
    A += ridge * np.trace(A, axis1=1, axis2=2)[:, None, None] / m * np.eye(m)
    b = rng.standard_normal((4, m, 2))
    want = solve_small(xp, A, b)
    np.testing.assert_allclose(solve_small(xp, A, b, unrolled=True), want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


def test_history_columns_cost_what_was_written(be):
    """Eager backends slice the written slots; a traced loop keeps the whole (zero-padded) buffer."""
    from types import SimpleNamespace

    from implicit_core.plugin import history_columns

    xp = be.xp
    buffer = xp.asarray(np.arange(2 * 5 * 3, dtype=np.float64).reshape(2, 5, 3))
    problem = SimpleNamespace(backend=be, xp=xp)  # what history_columns reads of a Problem
    count = xp.asarray(np.array([1, 3], dtype=np.int32))
    part = history_columns(problem, buffer, count, copy=True)
    expected = 5 if be.traced else 3
    assert tuple(part.shape) == (2, expected, 3)
    np.testing.assert_array_equal(case_host(be, part), np.arange(30.0).reshape(2, 5, 3)[:, :expected])
    assert tuple(history_columns(problem, buffer, 9).shape) == (2, 5, 3)


def test_with_history_reads_the_written_slots_at_most_twice_over(be):
    """Eagerly the exact slots; traced, the smallest of 8, 16, ..., m holding them (one branch runs)."""
    from types import SimpleNamespace

    from implicit_core.plugin import with_history

    xp = be.xp
    host = np.zeros((2, 20, 2048))  # (large enough to be read in parts under a trace)
    host[:, :11] = np.random.default_rng(0).standard_normal((2, 11, 2048))
    problem = SimpleNamespace(backend=be, xp=xp)
    seen = []

    def total(U):
        seen.append(int(U.shape[1]))
        return xp.sum(U, axis=1)

    out = with_history(problem, (xp.asarray(host),), xp.asarray(11, dtype=xp.int32), total)
    np.testing.assert_allclose(case_host(be, out), host.sum(axis=1), atol=1e-12)
    assert seen == ([8, 16, 20] if be.traced else [11])


def test_history_blocks_are_written_and_read_like_one_buffer(be):
    """A history kept in blocks (traced: 8, 8, 16, ... columns): ``write_row`` with an int or an
    array slot writes the block holding it, ``with_history`` reads whole first blocks only."""
    from types import SimpleNamespace

    from implicit_core.plugin import history_block_widths, with_history, write_row

    xp = be.xp
    problem = SimpleNamespace(backend=be, xp=xp)
    shape = (2, 20, 2048)
    widths = history_block_widths(problem, shape)
    assert widths == ((8, 8, 4) if be.traced else (20,))
    assert history_block_widths(problem, (2, 20, 16)) == (20,)  # a small history: one block
    blocks = tuple(xp.zeros((2, w, 2048), dtype=xp.float64) for w in widths)
    rows = np.random.default_rng(0).standard_normal((11, 2, 2048))
    active = xp.asarray(np.array([True, False]))
    for slot in range(11):
        index = slot if slot % 2 else xp.asarray(slot, dtype=xp.int32)
        blocks = write_row(problem, blocks, index, xp.asarray(rows[slot]), active)
    expected = np.zeros(shape)
    expected[0, :11] = rows[:, 0]
    np.testing.assert_array_equal(np.concatenate([case_host(be, b) for b in blocks], axis=1), expected)
    seen = []

    def total(U):
        seen.append(sum(int(b.shape[1]) for b in U))
        return sum(xp.sum(b, axis=1) for b in U)

    out = with_history(problem, (blocks,), xp.asarray(11, dtype=xp.int32), total)
    np.testing.assert_allclose(case_host(be, out), expected.sum(axis=1), atol=1e-12)
    assert seen == ([8, 16, 20] if be.traced else [20])


def test_best_iterate_is_returned(be):
    """A map that overshoots after converging: the returned point is the lowest-residual one."""
    case = tanh_case(be, batch=2)
    z, info = ic.fixed_point(case.f, case.z0, case.args, solver="fixed_point", tol=1e-30, max_iter=40, on_fail="ignore", trace=True)
    trace = case_host(be, info.trace)
    np.testing.assert_allclose(case_host(be, info.residual), trace.min(axis=0))


def test_root_form_matches_fixed_point_form(be):
    case = tanh_case(be)
    g = lambda z, a: z - case.f(z, a)  # noqa: E731
    z_fp, _ = ic.fixed_point(case.f, case.z0, case.args, tol=1e-10, max_iter=100)
    for solver in SOLVERS:
        z_root, info = ic.root(g, case.z0, case.args, solver=solver, tol=1e-10, max_iter=200)
        np.testing.assert_allclose(case_host(be, z_root), case_host(be, z_fp), atol=1e-9)


def test_broyden_adjoint_update_and_opa_converge(be):
    case = tanh_case(be, n=10, norm=0.9)
    z_ref, _ = ic.fixed_point(case.f, case.z0, case.args, tol=1e-11, max_iter=200)
    for opts in ({"update": "adjoint"}, {"opa": lambda z: z, "opa_freq": 3}, {"update": "adjoint", "opa": lambda z: z}):
        z, info = ic.fixed_point(case.f, case.z0, case.args, solver=ic.get_solver("broyden", **opts), tol=1e-10, max_iter=100, vjp=case.vjp)
        assert case_host(be, info.converged).all(), opts
        np.testing.assert_allclose(case_host(be, z), case_host(be, z_ref), atol=1e-9)


def _dense_good_broyden(F, z0, steps, m, max_growth, alpha=1.0):
    """Broyden's good inverse update on a dense ``H`` per sample (float64 NumPy), with the
    solver's rules: ``H_0 = -I`` refit to ``s I`` at the first secant pair, refused steps that
    still update ``H``, and a restart from ``s I`` when ``m`` updates are held.
    Returns the iterates, the final ``H`` per sample and the number of refused steps."""
    iterates, inverses, refused = [], [], 0
    for z in z0:
        n = z.shape[0]
        scale, r = -1.0, F(z) - z
        H = scale * np.eye(n)
        dz, path, updates = -alpha * H @ r, [], 0
        for k in range(steps):
            z_new = z + dz
            g_new = F(z_new) - z_new
            if k == 0:
                dg = g_new - r
                scale = dz @ dg / (dg @ dg)
                H = scale * np.eye(n)
            grown = max_growth is not None and np.linalg.norm(g_new) > max_growth * np.linalg.norm(r)
            refused += grown
            if updates == m:  # restart from s I
                H, updates = scale * np.eye(n), 0
            else:
                Hdg = H @ (g_new - r)
                H = H + np.outer(dz - Hdg, dz @ H) / (dz @ Hdg)
                updates += 1
            if not grown:
                z, r = z_new, g_new
            dz = -alpha * H @ r
            path.append(z)
        iterates.append(path)
        inverses.append(H)
    return np.array(iterates).transpose(1, 0, 2), np.array(inverses), refused


@pytest.mark.parametrize("m, max_growth, alpha, gain", [(30, None, 1.0, 0.95), (3, None, 1.0, 0.95),
                                                        (30, 1.02, 1.0, 3.0), (4, 4.0, 0.7, 0.95)])
def test_broyden_good_update_kept_as_steps_is_the_dense_update(be, m, max_growth, alpha, gain, monkeypatch):
    """The good update is kept as its steps and a small matrix per sample (one vector a step):
    its iterates and its inverse estimate are those of the dense update, refused steps and the
    restart when the columns are full included."""
    import implicit_solvers.broyden as broyden

    monkeypatch.setattr(broyden, "STEPS_FROM", 0)  # (the form is kept for states of 4 (m + 1) numbers on)
    xp = be.xp
    rng = np.random.default_rng(1)
    W = rng.standard_normal((12, 12))
    W *= gain / np.linalg.norm(W, 2)  # (3: not a contraction, where Broyden's steps are refused)
    c = rng.standard_normal((4, 12))
    z0 = np.zeros((4, 12))
    steps = 9
    iterates, inverses, refused = [], [], 0
    for b in range(4):  # the reference, one sample at a time
        path, H, r = _dense_good_broyden(lambda z, b=b: np.tanh(W @ z + c[b]), z0[b:b + 1], steps, m, max_growth, alpha)
        iterates.append(path[:, 0])
        inverses.append(H[0])
        refused += r
    want, H_want = np.stack(iterates, axis=1), np.stack(inverses)
    if gain > 1:
        assert refused > 0  # (the refused branch is exercised)
    Wx, cx = xp.asarray(W), xp.asarray(c)
    problem = ic.Problem.on_flat(be, xp.asarray(z0), lambda z: xp.tanh(z @ Wx.T + cx))
    problem.max_steps = steps + 1
    solver = ic.get_solver("broyden", m=m, max_growth=max_growth, step_size=alpha, update="good")
    state = solver.init(problem, xp.asarray(z0))
    assert "S" in state and "U" not in state  # (kept as steps)
    everyone = xp.asarray(np.ones(4, dtype=bool))
    for k in range(steps):
        state = solver.step(problem, state, xp.asarray(k, dtype=xp.int32), everyone)
        np.testing.assert_allclose(case_host(be, state["z"]), want[k], rtol=1e-9, atol=1e-11)
    H = solver.inverse_jacobian(problem, state)
    v = rng.standard_normal((4, 12))
    np.testing.assert_allclose(case_host(be, H.matvec(xp.asarray(v))), np.einsum("bij,bj->bi", H_want, v), atol=1e-9)
    np.testing.assert_allclose(case_host(be, H.rmatvec(xp.asarray(v))), np.einsum("bji,bj->bi", H_want, v), atol=1e-9)
    np.testing.assert_allclose(case_host(be, H.T.matvec(xp.asarray(v))), np.einsum("bji,bj->bi", H_want, v), atol=1e-9)


def test_limited_memory_broyden_wraps_its_buffer(be):
    case = tanh_case(be, n=12, norm=0.95)
    z, info = ic.fixed_point(case.f, case.z0, case.args, solver=ic.get_solver("broyden", m=3), tol=1e-10, max_iter=200)
    assert case_host(be, info.converged).all()
    assert case_host(be, info.steps).max() > 3


def test_broyden_history_follows_the_solve_without_changing_it(be, monkeypatch):
    """Eagerly the first columns are allocated up front and the others in chunks when a solve
    needs them (never copied); the iterates are those of a single buffer, OPA and wrap-around
    included."""
    import implicit_solvers.broyden as broyden

    if be.traced:
        pytest.skip("under a trace the history holds all m columns from the start (fixed shapes)")
    case = tanh_case(be, n=12, norm=0.95)
    # Samples that stop at once (zero input), early (a small one) and late: the later columns
    # are allocated for the samples still running.
    scale = be.xp.asarray(np.array([[1.0], [0.0], [1e-3], [1.0], [1.0]]))
    case.args = (case.args[0], case.args[1] * scale)
    runs = {}
    monkeypatch.setattr(broyden, "STEPS_FROM", 0)  # (the good update's steps on this small state too)
    for first in (3, 64):
        monkeypatch.setattr(broyden, "FIRST_SLOTS", first)
        for opts in ({"m": 20}, {"m": 6}, {"m": 20, "opa": lambda z: z, "opa_freq": 3},
                     {"m": 20, "update": "good"}, {"m": 6, "update": "good"}):  # (the good update: its steps)
            solver = ic.get_solver("broyden", **opts)
            z, info = ic.fixed_point(case.f, case.z0, case.args, solver=solver, tol=1e-10, max_iter=60, trace=True,
                                     vjp=case.vjp, gradient="shine")
            assert case_host(be, info.converged).all()
            assert case_host(be, info.steps).max() > 6 and case_host(be, info.steps).min() < 3  # (m=6 wraps)
            w = be.xp.asarray(np.random.default_rng(0).standard_normal((5, 12)))
            runs[first, repr(sorted(opts))] = (case_host(be, z), case_host(be, info.trace),
                                               *(case_host(be, g) for g in case.grad(z, info, w)))
    for key in {k for _, k in runs}:
        for short, whole in zip(runs[3, key][:2], runs[64, key][:2]):  # z* and the residual trace
            np.testing.assert_allclose(short, whole, rtol=1e-13, atol=1e-14)
        # SHINE's gradient reads the whole estimate, whose last adjoint terms divide by residuals
        # near zero: the rounding of a product split in two parts shows there, at 1e-6 at most.
        for short, whole in zip(runs[3, key][2:], runs[64, key][2:]):
            np.testing.assert_allclose(short, whole, rtol=1e-4, atol=1e-5)
    allocated = []
    empty = be.xp.empty
    monkeypatch.setattr(broyden, "FIRST_SLOTS", 3)
    monkeypatch.setattr(be.xp, "empty", lambda shape, **kw: (allocated.append(shape[:2]), empty(shape, **kw))[1])
    shapes = {}
    for update in ("adjoint", "good"):
        for max_iter in (2, 5, 60):  # a short solve never allocates the later chunks
            allocated.clear()
            ic.fixed_point(case.f, case.z0, case.args, solver=ic.get_solver("broyden", m=20, update=update), tol=1e-10,
                           max_iter=max_iter, on_fail="ignore", vjp=case.vjp)
            shapes[update, max_iter] = [tuple(int(d) for d in shape) for shape in allocated]  # (V: empty_like(U))
    # The rank-one terms: the first 3 columns for all 5 samples, then chunks of 3, 6 and 8
    # columns (the columns held doubling, up to m = 20) for the 4 (then 3) samples still running, each
    # when the solve first needs it (with max_iter = 5, m is cut to the 5 columns the solve can
    # write). The good update's steps: one vector a step, the same blocks up to m + 1 = 21
    # columns (3 for a solve of 2 steps: the m factors sit between m + 1 steps).
    assert shapes == {("adjoint", 2): [(5, 2)], ("adjoint", 5): [(5, 3), (4, 2)],
                      ("adjoint", 60): [(5, 3), (4, 3), (4, 6), (3, 8)],
                      ("good", 2): [(5, 3)], ("good", 5): [(5, 3), (4, 3)], ("good", 60): [(5, 3), (4, 3), (4, 6), (4, 9)]}


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    batch=st.integers(1, 6),
    dtype=st.sampled_from(["float32", "float64"]),
    solver=st.sampled_from(SOLVERS),
    norm=st.floats(0.05, 0.9),
    m=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_property_contractive_maps_converge_below_tol(n, batch, dtype, solver, norm, m, seed):
    be = ic.get_backend("numpy")
    case = tanh_case(be, batch=batch, n=n, norm=norm, dtype=dtype, seed=seed)
    tol = 1e-4 if dtype == "float32" else 1e-9
    options = {"m": m} if solver != "fixed_point" else {"tau": 1.0}
    z, info = ic.fixed_point(case.f, case.z0, case.args, solver=solver, tol=tol, max_iter=500, on_fail="raise", **options)
    assert z.dtype == np.dtype(dtype)
    assert (info.residual <= tol).all() and info.converged.all()
    assert (info.steps <= 500).all()


def affine_root(be, sign, dtype, n=200, seed=0):
    """jaxopt's affine test, n = 200: ``g = sign (M x + b - x)`` with ``||M|| = 0.9``."""
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    M *= 0.9 / np.linalg.norm(M, 2)
    b = rng.standard_normal(n)
    x_star = np.linalg.solve(np.eye(n) - M, b)
    Mt, bt = be.xp.asarray(M.astype(dtype)), be.xp.asarray(b.astype(dtype))
    return (lambda x, a: sign * (x @ Mt.T + bt - x)), x_star


#: TorchDEQ 0.1.0's Broyden on the same map, written as its fixed point M x + b (steps to 1e-4
#: in float32 and 1e-8 in float64, measured side by side).
TORCHDEQ_STEPS = {"float32": 15, "float64": 26}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("sign", [1, -1])
def test_broyden_root_converges_on_either_sign_convention(be, sign, dtype):
    g, x_star = affine_root(be, sign, dtype)
    tol = 1e-4 if dtype == "float32" else 1e-8
    z0 = be.xp.zeros((1, 200), dtype=getattr(be.xp, dtype))
    z, info = ic.root(g, z0, None, tol=tol, max_iter=100, gradient="jfb", on_fail="raise",
                      vjp=(lambda z, a, v: (v, None)) if be.explicit_vjp else None)
    assert int(np.asarray(be.to_python(info.steps)).max()) <= 2 * TORCHDEQ_STEPS[dtype]
    np.testing.assert_allclose(np.asarray(be.to_python(z))[0], x_star, atol=50 * tol)


@pytest.mark.parametrize("sign", [1, -1])
def test_broyden_root_on_a_stiff_implicit_euler_step(be, sign):
    """One implicit Euler step of the heat equation, ``y - y0 - dt L y = 0`` (either sign):
    ``F = z - g`` is far from contractive, and the initial inverse must learn its scale."""
    m = 100
    h = 1.0 / (m + 1)
    dt = 3 * h * h
    L = (np.diag(-2 * np.ones(m)) + np.diag(np.ones(m - 1), 1) + np.diag(np.ones(m - 1), -1)) / h**2
    y0 = np.random.default_rng(0).standard_normal((1, m))
    Lx, y0x = be.xp.asarray(L), be.xp.asarray(y0)
    z, info = ic.root(lambda y, a: sign * (y0x + dt * (y @ Lx.T) - y), be.xp.asarray(y0), None, tol=1e-6,
                      max_iter=100, gradient="jfb", on_fail="raise",
                      vjp=(lambda z, a, v: (v, None)) if be.explicit_vjp else None)
    exact = np.linalg.solve(np.eye(m) - dt * L, y0[0])
    np.testing.assert_allclose(np.asarray(be.to_python(z))[0], exact, atol=1e-6)
    # Without the rescaled initial inverse, the same solve fails.
    z, info = ic.root(lambda y, a: sign * (y0x + dt * (y @ Lx.T) - y), be.xp.asarray(y0), None, tol=1e-6,
                      max_iter=100, gradient="jfb", on_fail="ignore", scale_initial=False, max_growth=None,
                      vjp=(lambda z, a, v: (v, None)) if be.explicit_vjp else None)
    assert not np.asarray(be.to_python(info.converged)).all()


@pytest.mark.parametrize("solver", SOLVERS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # (a backend)
@given(rates=st.permutations([0.1, 0.3, 0.5, 0.7, 0.85, 0.95]), seed=st.integers(0, 2**16))
def test_samples_stopping_at_different_steps_keep_their_own_iterates(be, solver, rates, seed):
    """Per-sample contraction rates make samples stop (and freeze) at different steps, so every
    step after the first stop selects rows of the batch: each sample's result is then the one it
    gets solved alone, and its step count is its own."""
    xp = be.xp
    rng = np.random.default_rng(seed)
    batch, n = len(rates), 5  # (one batch size: a traced backend compiles once)
    a = xp.asarray(np.repeat(np.asarray(rates)[:, None], n, axis=1) * rng.uniform(0.9, 1.0, (batch, n)))
    b = xp.asarray(rng.standard_normal((batch, n)))
    f = lambda z, args: args[0] * xp.tanh(z) + args[1]  # noqa: E731  (elementwise: samples independent)
    options = dict(solver=solver, tol=1e-9, max_iter=300, on_fail="raise")
    z, info = ic.fixed_point(f, xp.zeros((batch, n), dtype=xp.float64), (a, b), **options)
    steps = case_host(be, info.steps)
    for i in range(batch):
        zi, info_i = ic.fixed_point(f, xp.zeros((1, n), dtype=xp.float64), (a[i : i + 1, ...], b[i : i + 1, ...]), **options)
        np.testing.assert_allclose(case_host(be, z)[i], case_host(be, zi)[0], rtol=0, atol=1e-12)
        assert steps[i] == case_host(be, info_i.steps)[0]


@pytest.mark.parametrize("solver", SOLVERS)
def test_large_states_that_stop_at_different_steps_keep_their_own_iterates(be, solver):
    """As above with a state of 256 KiB, where eager CPU backends copy the frozen samples'
    rows instead of selecting them with a ``where`` broadcast over the rows, and with 256
    samples, where Anderson eliminates its small systems in place rather than through LAPACK."""
    xp = be.xp
    rng = np.random.default_rng(3)
    batch, n = 256, 128
    a = xp.asarray(np.linspace(0.1, 0.95, batch)[:, None] * rng.uniform(0.9, 1.0, (batch, n)))
    b = xp.asarray(rng.standard_normal((batch, n)))
    f = lambda z, args: args[0] * xp.tanh(z) + args[1]  # noqa: E731
    options = dict(solver=solver, tol=1e-9, max_iter=300, on_fail="raise")
    z, info = ic.fixed_point(f, xp.zeros((batch, n), dtype=xp.float64), (a, b), **options)
    steps = case_host(be, info.steps)
    assert len(set(steps.tolist())) > 5
    for i in (0, 85, 170, 255):
        zi, info_i = ic.fixed_point(f, xp.zeros((1, n), dtype=xp.float64), (a[i : i + 1, ...], b[i : i + 1, ...]), **options)
        np.testing.assert_allclose(case_host(be, z)[i], case_host(be, zi)[0], rtol=0, atol=1e-12)
        assert steps[i] == case_host(be, info_i.steps)[0]
