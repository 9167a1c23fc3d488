"""Threads, warnings-as-errors, long runs and the inputs real code passes."""

import collections
import dataclasses
import copy
import gc
import os
import subprocess
import sys
import textwrap
import threading
import warnings
import weakref

import numpy as np
import pytest

import implicit_core as ic
from helpers import linear_case, prepare_arg, tanh_case
from test_registry import GOOD_PLUGIN, _make_distribution, fresh_registry, solver_names  # noqa: F401

HERE = os.path.dirname(__file__)


def run_python(code, env=None, flags=()):
    out = subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


# --------------------------------------------------------------------------- threads
def racing(threads, setup, z0, options):
    """A fresh interpreter whose ``threads`` threads make their first solve at once (barrier)."""
    return f"""
import threading, implicit_core as ic
{setup}
barrier, errors = threading.Barrier({threads}, timeout=60), []
def work():
    barrier.wait()
    try:
        ic.fixed_point(lambda z, a: 0.5 * z + 1.0, {z0}, {options})
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=work) for _ in range({threads})]
[t.start() for t in threads]; [t.join() for t in threads]
print("errors", errors)
"""


def test_concurrent_first_use_in_a_fresh_process():
    """Four threads make the process's first solves at once (barrier): all find the built-ins."""
    out = run_python(racing(4, "import numpy as np", "np.zeros((2, 3))", 'solver="anderson", tol=1e-8'))
    assert "errors []" in out


def test_concurrent_first_jax_solves_register_solveinfo_once():
    pytest.importorskip("jax")
    out = run_python(racing(3, "import jax.numpy as jnp; ic.plugins()", "jnp.zeros((2, 3))", "tol=1e-6"))
    assert "errors []" in out


class _Named(ic.Solver):
    def init(self, problem, z0):
        return {"z": z0, "fz": problem.F(z0)}

    def step(self, problem, state, k, active):
        return {"z": state["fz"], "fz": problem.F(state["fz"])}


def test_registry_reads_while_another_thread_registers(fresh_registry):
    classes = [type(f"S{i}", (_Named,), {"name": f"threaded_{i}"}) for i in range(200)]
    barrier, errors, done = threading.Barrier(3, timeout=60), [], threading.Event()

    def writer():
        barrier.wait()
        for cls in classes:
            ic.register(cls)
            ic.unregister(cls.name)
        done.set()

    def reader():
        barrier.wait()
        try:
            while not done.is_set():
                ic.plugins()
                ic.get_solver("anderson")
                ic.available_backends()
        except Exception as exc:  # "dictionary changed size during iteration" before
            errors.append(repr(exc))

    threads = [threading.Thread(target=f) for f in (writer, reader, reader)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []


def test_concurrent_unregister_is_one_success_and_one_typed_error(fresh_registry):
    ic.register(type("Once", (_Named,), {"name": "once"}))
    barrier, outcomes = threading.Barrier(2, timeout=60), []

    def drop():
        barrier.wait()
        try:
            ic.unregister("once")
            outcomes.append("ok")
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=drop) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(outcomes) == ["UnknownPluginError", "ok"]


def test_a_plugin_warning_at_import_under_warnings_as_errors_loses_no_other_plugin(tmp_path):
    _make_distribution(tmp_path, "aaa-warns", "aaa_warns", """
        import warnings
        warnings.warn("old API", DeprecationWarning)
    """, entry="warns")
    _make_distribution(tmp_path, "relaxed-solver", "relaxed_solver", GOOD_PLUGIN)
    out = run_python("""
        import implicit_core as ic
        try:
            ic.plugins()
        except ic.PluginWarning as exc:  # -W error: the report is an exception, after loading
            print("warned:", exc)
        rows = {(p.kind, p.name): p for p in ic.plugins()}
        print("relaxed" if ("solver", "relaxed") in rows else "lost", "anderson" if ("solver", "anderson") in rows else "lost")
        print(rows[("plugin", "warns")].reason)
    """, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}, flags=("-W", "error"))
    assert "relaxed anderson" in out and "old API" in out


def test_a_deq_shared_by_threads_gives_each_its_own_info():
    torch = pytest.importorskip("torch")
    from implicit_torch import DEQ

    # float64: a float32 state cannot reach tol 1e-8 on every draw (rounding floor ~1e-8)
    deq = DEQ(lambda z, x: torch.tanh(0.5 * z + x), tol=1e-8)
    barrier, seen, errors = threading.Barrier(2, timeout=20), {}, []

    def call(batch):
        try:
            x = torch.randn(batch, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
            barrier.wait()
            deq(x)
            barrier.wait()  # both calls done: each thread still reads its own
            seen[batch] = int(np.asarray(deq.info.to_python(deq.info.steps)).size)
        except BaseException as exc:  # surfaced below instead of as a thread warning
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=call, args=(b,)) for b in (3, 7)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    assert seen == {3: 3, 7: 7}


# --------------------------------------------------------------------------- memory
@pytest.mark.parametrize("gradient", ["shine", "ift"])
def test_a_solve_is_freed_by_reference_counting(be, gradient):
    """No reference cycle through info.vjp / the backward hook: with the cyclic GC off, the
    SolveInfo (and the Broyden buffers it keeps for SHINE) die with the caller's references."""
    case = tanh_case(be, batch=4, n=16)
    gc.collect()
    gc.disable()
    try:
        z, info = ic.fixed_point(case.f, case.z0, case.args, solver="broyden", gradient=gradient, vjp=case.vjp)
        case.grad(z, info, be.xp.ones_like(z))
        ref = weakref.ref(info)
        del z, info
        assert ref() is None
    finally:
        gc.enable()


def test_rss_stays_flat_over_many_numpy_broyden_shine_solves():
    from implicit_core.cells import tanh_cell, tanh_cell_vjp

    rng = np.random.default_rng(0)
    W = rng.standard_normal((128, 128))
    W *= 0.9 / np.linalg.norm(W, 2)
    c = rng.standard_normal((128, 128))

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def step():
        z, info = ic.fixed_point(tanh_cell, np.zeros((128, 128)), (W, c), solver="broyden", gradient="shine",
                                 vjp=tanh_cell_vjp, tol=1e-6)
        info.vjp(np.ones_like(z))

    gc.disable()
    try:
        for _ in range(5):
            step()
        before = rss()
        for _ in range(60):  # each keeps 2 x 30 x 128 x 128 float64 = 7.9 MB of Broyden buffers
            step()
        grown = rss() - before
    finally:
        gc.enable()
    assert grown < 60 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB over 60 solves"


def test_histories_and_traces_are_sized_by_what_a_solve_can_use(be):
    case = tanh_case(be, n=64)
    kw = dict(vjp=case.vjp, tol=1e-6)
    for solver in ("anderson", "broyden"):  # 10⁷ slots of (5, 64) would be 26 GB each: 31 are made
        _, info = ic.fixed_point(case.f, case.z0, case.args, solver=ic.get_solver(solver, m=10**7), max_iter=30, **kw)
        assert np.asarray(be.to_python(info.converged)).all()
    if be.traced:
        with pytest.raises(ic.ConfigurationError, match="preallocates"):
            ic.fixed_point(case.f, case.z0, case.args, trace=True, max_iter=10**9, **kw)
    else:
        _, info = ic.fixed_point(case.f, case.z0, case.args, trace=True, max_iter=10**9, **kw)
        steps = int(np.asarray(be.to_python(info.steps)).max())
        assert tuple(info.trace.shape) == (steps + 1, 5)
        assert np.asarray(be.to_python(info.converged)).all()


def test_running_out_of_memory_is_reported_as_such():
    class Hungry(_Named):
        name = "hungry"

        def init(self, problem, z0):
            raise MemoryError("cannot allocate 1 TiB")

    with pytest.raises(MemoryError, match="1 TiB"):
        ic.fixed_point(lambda z, a: 0.5 * z, np.zeros((2, 2)), solver=Hungry())


def test_deepcopy_after_a_jac_reg_step_and_jac_loss_released_after_backward():
    torch = pytest.importorskip("torch")
    from implicit_torch import DEQ

    lin = torch.nn.Linear(4, 4)
    deq = DEQ(lambda z, x: torch.tanh(0.5 * lin(z) + x), jac_reg=True, state_shape=(4,)).train()
    z = deq(torch.randn(3, 4))
    loss = z.square().sum() + 0.1 * deq.jac_loss
    ema = copy.deepcopy(deq)  # EMA / best-model copies
    assert ema.info is None and ema.jac_loss is None
    ref = weakref.ref(deq.jac_loss)
    loss.backward()
    del loss
    assert deq.jac_loss is None and ref() is None


# --------------------------------------------------------------------------- inputs
def test_autocast_runs_the_cell_in_reduced_precision_and_the_solver_in_float32():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight *= 0.5 / torch.linalg.matrix_norm(lin.weight, 2)
    x = torch.randn(5, 8)
    seen = []

    def cell(z, x):
        inner = lin(z)
        seen.append(inner.dtype)
        return torch.tanh(inner + x)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        # (a bfloat16 cell rounds its output to ~4e-3 per entry: a tolerance under that noise
        # is met by chance; 2e-2 is met by every one of 200 random cells)
        z, info = ic.fixed_point(cell, torch.zeros(5, 8), x, solver="anderson", tol=2e-2)
        loss = z.square().sum()
    loss.backward()
    assert z.dtype == torch.float32 and torch.bfloat16 in seen
    assert info.converged.all() and torch.isfinite(lin.weight.grad).all()


Pair = collections.namedtuple("Pair", ["a", "b"])
Single = collections.namedtuple("Single", ["a"])


def test_named_tuple_states(be):
    xp = be.xp

    def f(z, args):
        return type(z)(*(0.5 * leaf + 1.0 for leaf in z))

    vjp = (lambda z, a, v: (type(v)(*(0.5 * x for x in v)), None)) if be.explicit_vjp else None
    for z0 in (Pair(xp.zeros((2, 3), dtype=xp.float64), xp.zeros((2, 4), dtype=xp.float64)),
               Single(xp.zeros((2, 3), dtype=xp.float64))):
        z, info = ic.fixed_point(f, z0, None, tol=1e-10, max_iter=100, gradient="jfb", vjp=vjp)
        assert type(z) is type(z0) and len(z) == len(z0)
        for leaf, ref in zip(z, z0):
            assert tuple(leaf.shape) == tuple(ref.shape)
            np.testing.assert_allclose(np.asarray(be.to_python(leaf)), 2.0, atol=1e-8)


def _matrix(a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # numpy discourages it too
        return np.matrix(a)


def test_numpy_matrix_is_refused_and_mixed_dict_keys_are_fine():
    with pytest.raises(ic.ConfigurationError, match="numpy.matrix.*np.asarray"):
        ic.fixed_point(lambda z, a: 0.5 * z, _matrix(np.zeros((2, 2))))
    with pytest.raises(ic.ConfigurationError, match="args holds a numpy.matrix"):
        ic.fixed_point(lambda z, a: 0.5 * z, np.zeros((2, 2)), {"A": _matrix(np.eye(2))})
    args = {1: np.ones((2, 2)), "scale": np.full((2, 2), 0.5)}
    z, _ = ic.fixed_point(lambda z, a: a["scale"] * z + a[1], np.zeros((2, 2)), args, tol=1e-10, max_iter=100)
    np.testing.assert_allclose(z, 2.0, atol=1e-8)


def test_numpy_scalars_as_settings():
    case = linear_case(ic.get_backend("numpy"))
    z, info = ic.fixed_point(case.f, case.z0, case.args, tol=np.float32(1e-6), max_iter=np.int64(200),
                             m=np.int64(3), lam=np.float64(1e-4))
    assert info.converged.all()
    with pytest.raises(ic.ConfigurationError, match="max_iter must be an integer >= 1, got np.int64\\(0\\)"):
        ic.fixed_point(case.f, case.z0, case.args, max_iter=np.int64(0))


def test_a_solver_answering_in_another_library_or_device_is_named():
    torch = pytest.importorskip("torch")

    @dataclasses.dataclass(eq=False)
    class Stray(_Named):
        name = "stray"
        where: str = "numpy"

        def step(self, problem, state, k, active):
            out = super().step(problem, state, k, active)
            if self.where == "numpy":
                return {key: v.numpy() for key, v in out.items()}
            return {key: v.to("meta") for key, v in out.items()}

    for where, message in (("numpy", "numpy.ndarray, but the solve runs on torch.Tensor"), ("meta", "device meta")):
        with pytest.raises(ic.PluginError, match=message):
            ic.fixed_point(lambda z, a: 0.5 * z + 1, torch.zeros(2, 3), solver=Stray(where), tol=1e-8)


@pytest.mark.parametrize("name", ["\ufb01xed_point", "FIXED_POINT", "\uff46\uff49\uff58\uff45\uff44_point"])
def test_names_that_only_look_like_a_builtin_are_refused(fresh_registry, name):
    with pytest.raises(ic.PluginError, match="only looks like"):
        ic.register(type("LookAlike", (_Named,), {"name": name}))
    assert ic.get_solver("fixed_point").name == "fixed_point"


@pytest.mark.parametrize("spelling", ["TRUE", "on", "Yes"])
def test_autoload_switch_accepts_the_usual_truthy_spellings(tmp_path, fresh_registry, spelling):
    _make_distribution(tmp_path, "relaxed-solver", "relaxed_solver", GOOD_PLUGIN)
    fresh_registry.syspath_prepend(str(tmp_path))
    fresh_registry.setenv("IMPLICIT_CORE_DISABLE_PLUGIN_AUTOLOAD", spelling)
    ic.reload_plugins()
    assert "relaxed" not in solver_names() and "anderson" in solver_names()


def test_a_misspelt_allow_list_entry_is_warned_about(tmp_path, fresh_registry):
    _make_distribution(tmp_path, "relaxed-solver", "relaxed_solver", GOOD_PLUGIN)
    fresh_registry.syspath_prepend(str(tmp_path))
    fresh_registry.setenv("IMPLICIT_CORE_DISABLE_PLUGIN_AUTOLOAD", "1")
    fresh_registry.setenv("IMPLICIT_CORE_PLUGINS", "relaxd-solver")
    with pytest.warns(ic.PluginWarning, match="'relaxd-solver'.*relaxed-solver"):
        ic.reload_plugins()


def test_cli_demo_with_zero_epochs_is_one_line_and_exit_2(capsys):
    from implicit_core.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--epochs", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--epochs" in err[0] and ">= 1" in err[0]


# --------------------------------------------------------------------------- messages
def test_convergence_warnings_point_at_the_callers_line():
    torch = pytest.importorskip("torch")
    from implicit_torch import DEQ

    def warnings_of(action):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            action()
        return [w for w in caught if issubclass(w.category, ic.ConvergenceWarning)]

    case = tanh_case(ic.get_backend("numpy"), norm=0.95)
    direct = warnings_of(lambda: ic.fixed_point(case.f, case.z0, case.args, tol=1e-14, max_iter=2))
    deq = DEQ(lambda z, x: torch.tanh(0.9 * z + x), tol=1e-14, max_iter=2)
    forward = warnings_of(lambda: deq(torch.randn(2, 3)))
    x = torch.randn(2, 3, requires_grad=True)
    tight = ic.get_gradient("ift", max_iter=1, tol=1e-14)
    z, _ = ic.fixed_point(lambda z, x: torch.tanh(0.9 * z + x), torch.zeros(2, 3), x, tol=1e-6, gradient=tight)
    backward = warnings_of(lambda: z.sum().backward())
    for caught in (direct, forward, backward):
        assert caught and os.path.samefile(caught[0].filename, __file__), [w.filename for w in caught]


def test_user_errors_are_raised_at_the_api_boundary():
    with pytest.raises(ic.ConfigurationError) as err:
        ic.fixed_point(lambda z, a: z, np.zeros((2, 2)), tol=0)
    frames = [f for f in __import__("traceback").extract_tb(err.value.__traceback__)]
    library = [f for f in frames if "implicit_core" in f.filename]
    assert len(library) <= 1, frames
    assert type(err.value).__module__ == "implicit_core"


def test_deq_validates_its_settings_at_construction():
    pytest.importorskip("torch")
    from implicit_torch import DEQ

    for kwargs, message in ((dict(tol=0), "tol must be"), (dict(max_iter=0), "max_iter must be"),
                            (dict(on_fail="warning"), "Did you mean 'warn'")):
        with pytest.raises(ic.ConfigurationError, match=message):
            DEQ(lambda z, x: z, **kwargs)


def test_messages_say_what_to_change(be):
    xp = be.xp
    z0 = (xp.zeros((2, 3), dtype=xp.float64), xp.zeros((2, 3), dtype=xp.float64))
    vjp = (lambda z, a, v: (v, None)) if be.explicit_vjp else None
    with pytest.raises(ic.ShapeError, match="is a list of 2 array.*z0 is a tuple of 2"):
        ic.fixed_point(lambda z, a: [z[0], z[1]], z0, vjp=vjp)
    if be.name in ("numpy", "jax"):
        z, info = ic.fixed_point(lambda z, a: 0.5 * z + a, xp.zeros((2, 3), dtype=xp.float64),
                                 xp.ones((2, 3), dtype=xp.float64), vjp=(lambda z, a, v: (0.5 * v, v)) if vjp else None)
        with pytest.raises(ic.ShapeError, match="cotangent g passed to info.vjp.*pass dL/dz\\*, shaped like z\\*"):
            info.vjp(xp.ones((2, 4), dtype=xp.float64))
    with pytest.raises(ic.DTypeError) as err:
        ic.fixed_point(lambda z, a: z, xp.zeros((2, 3), dtype=xp.int32), vjp=vjp)
    assert "astype" not in str(err.value) and "float32 or float64" in str(err.value)


def test_deq_without_state_shape_names_it():
    torch = pytest.importorskip("torch")
    from implicit_torch import DEQ

    lin = torch.nn.Linear(16, 16)
    deq = DEQ(lambda z, x: torch.tanh(lin(z) + x[:, :16]))
    with pytest.raises(ic.UserFunctionError, match="state_shape=\\(n,\\)"):
        deq(torch.randn(4, 64))


def test_jax_args_and_traced_settings_get_their_own_messages():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with pytest.raises(ic.ConfigurationError, match="args holds a str"):
        ic.fixed_point(lambda z, a: 0.5 * z, jnp.zeros((2, 3)), ("mode", jnp.ones(3)))
    with pytest.raises(ic.ConfigurationError, match="static"):
        jax.jit(lambda tol: ic.fixed_point(lambda z, a: 0.5 * z, jnp.zeros((2, 3)), tol=tol)[0])(1e-4)
