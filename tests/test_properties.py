"""Property-based tests (hypothesis) over random maps, shapes, dtypes and settings."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import implicit_core as ic
from helpers import tanh_case

EAGER = ["numpy", "torch"]  # a compiling backend would spend every example compiling


def backend(name):
    be = ic.get_backend(name)
    if not be.available()[0]:
        pytest.skip(f"{name} unavailable")
    return be


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 8), batch=st.integers(1, 5), norm=st.floats(0.05, 0.9),
       solver=st.sampled_from(["fixed_point", "anderson", "broyden"]))
def test_ift_gradient_matches_finite_differences(seed, n, batch, norm, solver):
    """<dL/dc, d> equals (L(c + εd) - L(c - εd)) / 2ε for L = Σ w·z*, in float64."""
    be = ic.get_backend("numpy")
    case = tanh_case(be, batch=batch, n=n, norm=norm, seed=seed)
    rng = np.random.default_rng(seed + 7)
    w, d = rng.standard_normal((batch, n)), rng.standard_normal((batch, n))
    W, c = case.args
    ift = ic.get_gradient("ift", tol=1e-13, max_iter=500)

    def solve(c_):
        return ic.fixed_point(case.f, case.z0, (W, c_), solver=solver, gradient=ift, tol=1e-13, max_iter=500,
                              vjp=case.vjp, on_fail="raise")

    z, info = solve(c)
    _, dc = info.vjp(w)
    eps = 1e-6
    numeric = (np.sum(w * solve(c + eps * d)[0]) - np.sum(w * solve(c - eps * d)[0])) / (2 * eps)
    assert np.sum(dc * d) == pytest.approx(numeric, rel=1e-5, abs=1e-8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(EAGER),
    batch=st.integers(0, 4),
    n=st.integers(1, 5),
    dtype=st.sampled_from(["float64", "float32", "int64", "bool", "complex128"]),
    out_change=st.sampled_from([None, "shape", "dtype", "nan", "rank", "raise"]),
    tol=st.sampled_from([1e-6, 0.0, -1.0, float("nan"), float("inf"), 1e-3]),
    max_iter=st.sampled_from([20, 0, -3, 2.5, True]),
    solver=st.sampled_from(["anderson", "broyden", "fixed_point", "andersen", "newton"]),
    gradient=st.sampled_from(["ift", "jfb", "shine", "phantom", "broyden_reuse", "ifft"]),
    options=st.dictionaries(st.sampled_from(["m", "k", "lam", "tau", "beta", "mm", "refine"]),
                            st.sampled_from([-1, 0, 1, 3, 0.5, 2.0, "x"]), max_size=2),
    on_fail=st.sampled_from(["ignore", "raise", "explode"]),
)
def test_anything_goes_wrong_only_through_typed_errors(name, batch, n, dtype, out_change, tol, max_iter, solver,
                                                       gradient, options, on_fail):
    """Random — mostly invalid — calls either succeed or raise a subclass of ImplicitError."""
    be = backend(name)
    xp = be.xp
    base = tanh_case(be, batch=max(batch, 1), n=n)
    z0 = xp.zeros((batch, n), dtype=getattr(xp, dtype))

    def f(z, args):
        out = base.f(z, args)
        if out_change == "shape":
            return out[:, :-1]
        if out_change == "dtype":
            return xp.astype(out, xp.float32)
        if out_change == "nan":
            return out * float("nan")
        if out_change == "rank":
            return out[None]
        if out_change == "raise":
            raise RuntimeError("user bug")
        return xp.astype(out, z.dtype)

    try:
        z, info = ic.fixed_point(f, z0, base.args, solver=solver, gradient=gradient, tol=tol, max_iter=max_iter,
                                 on_fail=on_fail, vjp=base.vjp, **options)
    except ic.ImplicitError:
        return
    assert tuple(z.shape) == tuple(z0.shape) and z.dtype == z0.dtype  # success returns a state like z0
    assert len(info.failed) <= batch


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), m=st.integers(1, 8), batch=st.integers(1, 6), k=st.integers(1, 3),
       name=st.sampled_from(EAGER))
def test_unrolled_small_solve_matches_a_factorisation_and_isolates_bad_samples(seed, m, batch, k, name):
    """``solve_small(unrolled=True)`` (elimination without pivoting, NumPy's in place) solves
    symmetric positive definite systems as LAPACK does; a NaN or singular sample spoils only
    its own rows."""
    from implicit_core.plugin import solve_small

    xp = backend(name).xp
    rng = np.random.default_rng(seed)
    R = rng.standard_normal((batch + 2, m, m + 2))
    A = R @ np.swapaxes(R, 1, 2) + 0.1 * np.eye(m)
    b = rng.standard_normal((batch + 2, m, k))
    A[-2] = np.nan  # a non-finite system
    A[-1] = 0.0  # a singular one
    x = np.asarray(backend(name).to_python(solve_small(xp, xp.asarray(A), xp.asarray(b), unrolled=True)))
    np.testing.assert_allclose(x[:batch], np.linalg.solve(A[:batch], b[:batch]), rtol=1e-8, atol=1e-10)
    assert not np.isfinite(x[batch:]).all(axis=(1, 2)).any()
