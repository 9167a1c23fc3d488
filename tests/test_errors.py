"""Bad input gets a typed error that names the problem and the fix."""

import numpy as np
import pytest

import implicit_core as ic
from helpers import EXPLICIT_VJP, tanh_case


def run(case, **kw):
    kw.setdefault("vjp", case.vjp)
    return ic.fixed_point(kw.pop("f", case.f), kw.pop("z0", case.z0), kw.pop("args", case.args), **kw)


@pytest.fixture
def case(be):
    return tanh_case(be)


BAD_SETTINGS = [
    (dict(solver="andersen"), ic.UnknownPluginError, "Did you mean 'anderson'"),
    (dict(gradient="ifft"), ic.UnknownPluginError, "Did you mean 'ift'"),
    (dict(mm=3), ic.ConfigurationError, "unknown option 'mm'.*Did you mean 'm'"),
    (dict(stop_mode="relative"), ic.ConfigurationError, "Did you mean 'rel'"),
    (dict(on_fail="warning"), ic.ConfigurationError, "on_fail must be one of"),
    (dict(tol=0.0), ic.ConfigurationError, "tol must be a finite number > 0"),
    (dict(tol=-1e-3), ic.ConfigurationError, "tol must be"),
    (dict(tol=float("nan")), ic.ConfigurationError, "tol must be"),
    (dict(max_iter=0), ic.ConfigurationError, "max_iter must be an integer >= 1"),
    (dict(max_iter=2.5), ic.ConfigurationError, "max_iter must be an integer"),
    (dict(solver="anderson", m=0), ic.ConfigurationError, "m must be an integer >= 1"),
    (dict(solver="anderson", beta=1.5), ic.ConfigurationError, "beta must be a number in"),
    (dict(solver="broyden", update="bad"), ic.ConfigurationError, "update must be one of"),
    (dict(solver="fixed_point", gradient="shine"), ic.ConfigurationError, "Use one of: broyden"),
    (dict(solver=ic.get_solver("anderson"), m=4), ic.ConfigurationError, "is an instance"),
    (dict(solver=3), ic.ConfigurationError, "registered name or a Solver instance"),
    (dict(divergence=0.5), ic.ConfigurationError, "divergence must be"),
    (dict(vjp=42), ic.ConfigurationError, "vjp must be a callable"),
    (dict(f=None), ic.ConfigurationError, "must be callable"),
    (dict(backend="numpyy"), ic.UnknownPluginError, "Did you mean 'numpy'"),
    (dict(solver="broyden", m=0), ic.ConfigurationError, "broyden: m must be an integer >= 1"),
    (dict(solver="anderson", m=2.5), ic.ConfigurationError, "anderson: m must be an integer"),
    (dict(solver="anderson", lam=-1.0), ic.ConfigurationError, "lam must be"),
    (dict(gradient="phantom", k=0), ic.ConfigurationError, "phantom: k must be an integer >= 1"),
    (dict(solver="fixed_point", gradient="phantom", damping=0.0), ic.ConfigurationError, "phantom: damping must be a number in \\(0"),
    (dict(solver="anderson", gradient="broyden_reuse"), ic.ConfigurationError, "Use one of: broyden"),
    (dict(solver="broyden", gradient="shine", refin=2), ic.ConfigurationError, "unknown option 'refin'.*Did you mean 'refine'"),
    (dict(solver="broyden", gradient="shine", fallback=-1.0), ic.ConfigurationError, "fallback"),
    (dict(gradient=ic.get_gradient("ift"), tol_backward=1.0), ic.ConfigurationError, "unknown option 'tol_backward'"),
    (dict(tol=float("inf")), ic.ConfigurationError, "tol must be a finite number"),
    (dict(max_iter=True), ic.ConfigurationError, "max_iter must be an integer"),
    (dict(gradient=3), ic.ConfigurationError, "GradientEstimator instance"),
    (dict(divergence="big"), ic.ConfigurationError, "divergence must be"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_SETTINGS, ids=[str(i) for i in range(len(BAD_SETTINGS))])
def test_bad_settings(case, kwargs, error, message):
    with pytest.raises(error, match=message):
        run(case, **kwargs)


def test_bad_states(be, case):
    xp = be.xp
    z0 = case.z0
    cases = [
        (dict(z0=xp.zeros((0, 8), dtype=z0.dtype)), ic.ShapeError, "batch size 0"),
        (dict(z0=xp.asarray(0.0)), ic.ShapeError, "leading batch axis"),
        (dict(z0=xp.zeros((5, 8), dtype=xp.int64)), ic.DTypeError, "real floating"),
        (dict(z0=xp.zeros((5, 8), dtype=xp.complex128)), ic.DTypeError, "real floating"),
        (dict(z0=xp.full((5, 8), float("nan"), dtype=z0.dtype)), ic.NonFiniteError, "NaN or Inf"),
        (dict(z0=(xp.zeros((5, 4), dtype=xp.float64), xp.zeros((5, 4), dtype=xp.float32))), ic.DTypeError, "mix dtypes"),
        (dict(z0=(xp.zeros((5, 4), dtype=z0.dtype), xp.zeros((3, 4), dtype=z0.dtype))), ic.ShapeError, "batch size"),
        (dict(z0=xp.zeros((5, 7), dtype=z0.dtype)), ic.UserFunctionError, "has shape\\(s\\) \\[\\(5, 7\\)\\]"),
        (dict(f=lambda z, a: case.f(z, a)[:, :7]), ic.ShapeError, "has shape \\(5, 7\\).*expected \\(5, 8\\)"),
        (dict(f=lambda z, a: case.f(z, a)[None, ...]), ic.ShapeError, "map the state onto itself"),
        (dict(f=lambda z, a: xp.astype(case.f(z, a), xp.float32)), ic.DTypeError, "dtype (\\w+.)?float32"),
        (dict(f=lambda z, a: (case.f(z, a), z)), ic.ShapeError, "structure"),
        (dict(f=lambda z, a: be.to_python(case.f(z, a))), ic.ShapeError, "structure|has shape"),
        (dict(args=(case.args[0], case.args[1] * float("inf"))), ic.NonFiniteError, "args contains"),
        (dict(z0=[[0.0] * 8] * 5), ic.BackendMismatchError, "Python list of numbers: pass an array, e.g. np.asarray"),
        (dict(z0=object()), ic.BackendMismatchError, "no registered backend handles"),
        (dict(z0=xp.zeros((5, 8), dtype=xp.bool)), ic.DTypeError, "real floating"),
        (dict(z0=xp.zeros((8,), dtype=z0.dtype) + 1), ic.ShapeError, "1-D state is ambiguous. Pass batched=False"),
        (dict(f=lambda z, a: z[:4], z0=xp.zeros((8,), dtype=z0.dtype), batched=False), ic.ShapeError,
         "has shape \\(4,\\).*expected \\(8,\\)"),
        (dict(batched=1), ic.ConfigurationError, "batched must be True or False"),
        (dict(z0=xp.full((5, 8), float("inf"), dtype=z0.dtype)), ic.NonFiniteError, "NaN or Inf"),
        (dict(args=(case.args[0] * float("nan"), case.args[1])), ic.NonFiniteError, "args contains"),
        (dict(f=lambda z, a: 1 / 0), ic.UserFunctionError, "f\\(z0\\) raised ZeroDivisionError"),
        (dict(f=lambda z, a: None), ic.ImplicitError, "gave a builtins.NoneType|is a None, but the state z0 is a single array"),
        (dict(f=lambda z, a: xp.astype(case.f(z, a) * 10, xp.int64)), ic.DTypeError, "dtype"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            run(case, **kwargs)


def test_vjp_missing_or_wrong(be, case):
    if be.name not in EXPLICIT_VJP:
        with pytest.raises(ic.ConfigurationError, match="autodiff|drop the vjp"):
            run(case, vjp=lambda z, a, v: (v, a))
        return
    z, info = run(case, vjp=None)  # forward alone needs no VJP
    w = be.xp.ones_like(z)
    with pytest.raises(ic.ConfigurationError, match="pass vjp=f_vjp"):
        info.vjp(w)
    _, info = run(case, vjp=lambda z, a, v: (v[:, :3], a))
    with pytest.raises(ic.ShapeError, match="vjp\\(z, args, v\\)\\[0\\] has shape"):
        info.vjp(w)
    _, info = run(case, vjp=lambda z, a, v: v)
    with pytest.raises(ic.ShapeError, match="pair"):
        info.vjp(w)
    _, info = run(case)
    with pytest.raises(ic.ShapeError, match="cotangent"):
        info.vjp(w[:, :2])


def test_mixed_array_libraries(be, case):
    if be.name == "torch":
        other = np.zeros((5, 2))
    else:
        torch = pytest.importorskip("torch")
        other = torch.zeros(5, 2, dtype=torch.float64)
    with pytest.raises(ic.BackendMismatchError, match="one array library"):
        run(case, args=(case.args[0], other))
    with pytest.raises(ic.BackendMismatchError, match="one array library"):
        run(case, args={"W": case.args[0], "extra": other})
    with pytest.raises(ic.BackendMismatchError, match="several backends"):
        run(case, z0=(case.z0, other))
    with pytest.raises(ic.BackendMismatchError, match="but the backend is"):
        run(case, z0=other, backend=be.name)
    with pytest.raises(ic.ImplicitError, match="backend|array"):
        run(case, f=lambda z, a: other * 0 + 1)  # f answers in another library's arrays
    if be.name == "torch":  # torch and JAX arrays in one call
        jnp = pytest.importorskip("jax.numpy")
        with pytest.raises(ic.BackendMismatchError, match="one array library"):
            run(case, args=(case.args[0], jnp.zeros((5, 8))))


def test_unavailable_backend_says_why():
    be = ic.get_backend("cupy")
    ok, reason = be.available()
    if ok:
        pytest.skip("cupy is available here")
    with pytest.raises(ic.BackendUnavailableError, match="cupy.*unavailable"):
        ic.fixed_point(lambda z, a: z * 0.5, np.zeros((2, 2)), backend="cupy")


def test_convergence_failure_warn_raise_ignore(case):
    with pytest.warns(ic.ConvergenceWarning, match="did not converge for 5 sample"):
        run(case, tol=1e-15, max_iter=2, on_fail="warn")
    with pytest.raises(ic.ConvergenceError) as err:
        run(case, tol=1e-15, max_iter=2, on_fail="raise")
    assert err.value.info.failed == [0, 1, 2, 3, 4]
    assert set(err.value.info.reasons().values()) == {"max_iter reached"}
    _, info = run(case, tol=1e-15, max_iter=2, on_fail="ignore")
    assert not np.asarray(case.be.to_python(info.converged)).any()


def test_errors_share_one_base_class():
    for err in (ic.ConfigurationError, ic.UnknownPluginError, ic.ShapeError, ic.DTypeError, ic.BackendMismatchError,
                ic.DeviceMismatchError, ic.BackendUnavailableError, ic.PluginError, ic.NonFiniteError, ic.ConvergenceError):
        assert issubclass(err, ic.ImplicitError)
