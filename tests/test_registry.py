"""Plugin discovery: built-ins from the core's list, third parties through entry points, both
through the same pluggy hooks."""

import dataclasses
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import implicit_core as ic
from helpers import linear_case


@pytest.fixture
def fresh_registry():
    """A monkeypatch whose changes are undone *before* the registry reloads its entry points."""
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()
    ic.reload_plugins()


def solver_names():
    return {p.name for p in ic.plugins() if p.kind == "solver" and p.available}


def test_builtins_are_registered_from_the_core_list():
    rows = {(p.kind, p.name): p for p in ic.plugins()}
    for kind, name in [("backend", "numpy"), ("backend", "cupy"), ("solver", "anderson"), ("solver", "broyden"),
                       ("solver", "fixed_point"), ("gradient", "ift"), ("gradient", "jfb"), ("gradient", "phantom"),
                       ("gradient", "shine"), ("gradient", "broyden_reuse")]:
        assert rows[(kind, name)].source == "implicit-core"
        assert rows[(kind, name)].plugin.startswith("implicit_core.")  # prefixed: no clash with a third party's
    assert rows[("backend", "numpy")].available
    cupy = {(p.kind, p.name): p for p in ic.plugins(check=True)}[("backend", "cupy")]
    assert cupy.checked
    if not cupy.available:
        assert cupy.reason  # unavailable always says why


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ic.UnknownPluginError, match="Did you mean 'anderson'"):
        ic.get_solver("andersen")
    with pytest.raises(ic.UnknownPluginError, match="Did you mean 'shine'"):
        ic.get_gradient("shin")
    with pytest.raises(ic.ConfigurationError, match="Did you mean 'm'.*Its options are: m, lam, beta"):
        ic.get_solver("anderson", mm=3)


@dataclasses.dataclass(eq=False)
class Halving(ic.Solver):
    """A third-party solver: z <- (z + F(z)) / 2, with a fake identity-based inverse."""

    name = "halving"
    provides_inverse = True

    weight: float = 0.5

    def init(self, problem, z0):
        return {"z": z0, "fz": problem.F(z0)}

    def step(self, problem, state, k, active):
        z = self.weight * state["z"] + (1 - self.weight) * state["fz"]
        return {"z": z, "fz": problem.F(z)}

    def inverse_jacobian(self, problem, state):
        xp = problem.xp
        zeros = xp.zeros((state["z"].shape[0], 1, state["z"].shape[1]), dtype=state["z"].dtype)
        return ic.LowRankInverse(zeros, zeros, xp)  # H = -I: SHINE then equals JFB


def test_runtime_registration_is_used_by_fixed_point_and_shine(fresh_registry):
    ic.register(Halving)
    be = ic.get_backend("numpy")
    case = linear_case(be)
    z, info = ic.fixed_point(case.f, case.z0, case.args, solver="halving", gradient="shine", tol=1e-10, max_iter=400, vjp=case.vjp)
    assert info.converged.all() and info.solver == "halving"
    w = np.ones_like(z)
    np.testing.assert_array_equal(info.vjp(w)[1], w)  # -H^T g with H = -I is g
    with pytest.raises(ic.PluginError, match="already taken.*replace=True"):
        ic.register(Halving)
    ic.register(Halving, replace=True)
    ic.unregister("halving")
    with pytest.raises(ic.UnknownPluginError):
        ic.get_solver("halving")


def test_options_are_the_declared_dataclass_fields():
    assert ic.get_solver("anderson").option_names() == ["m", "lam", "beta"]
    assert ic.get_gradient("jfb").option_names() == []  # no options: nothing to advertise
    assert ic.get_gradient("ift").option_names() == ["solver", "tol", "max_iter", "stop_mode"]
    assert repr(ic.get_solver("anderson", m=3)) == "Anderson(m=3, lam=0.0001, beta=1.0)"


def test_a_renamed_option_keeps_working_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'lam' is now called 'damping'"):
        assert ic.get_gradient("phantom", lam=0.5).damping == 0.5
    with pytest.raises(ic.ConfigurationError, match="pass 'damping' only"):
        ic.get_gradient("phantom", lam=0.5, damping=0.5)
    # Anderson's own `lam` is no longer ambiguous with phantom's damping.
    solver, gradient = ic.resolve_plugins("anderson", "phantom", lam=1e-3, damping=0.5)
    assert (solver.lam, gradient.damping) == (1e-3, 0.5)
    with pytest.warns(DeprecationWarning):  # with a solver that has no `lam`: the old name still reaches phantom
        _, gradient = ic.resolve_plugins("fixed_point", "phantom", lam=0.5)
    assert gradient.damping == 0.5


def test_a_plain_class_plugin_still_works_but_is_told_to_declare_options(fresh_registry):
    class Legacy(ic.Solver):
        name = "legacy"

        def __init__(self, tau: float = 0.5, *args, **kwargs):
            self.tau = tau

        def init(self, problem, z0):
            return {"z": z0, "fz": problem.F(z0)}

        def step(self, problem, state, k, active):
            return {"z": state["fz"], "fz": problem.F(state["fz"])}

    ic.register(Legacy)
    with pytest.warns(DeprecationWarning, match="declare the options"):
        assert ic.get_solver("legacy", tau=0.3).tau == 0.3
    with pytest.warns(DeprecationWarning), pytest.raises(ic.ConfigurationError, match="unknown option 'args'"):
        ic.get_solver("legacy", args=1)


def test_registering_garbage_is_a_typed_error(fresh_registry):
    with pytest.raises(ic.ConfigurationError):
        ic.register(object)
    with pytest.raises(ic.PluginError, match="class"):
        ic.register(Halving())


def _make_distribution(root, dist, module, source, entry="thirdparty"):
    """A distribution as pip would install it: a module plus its .dist-info with entry points."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[implicit_core]\n{entry} = {module}\n")


GOOD_PLUGIN = """
    import dataclasses
    import implicit_core as ic

    @dataclasses.dataclass(eq=False)
    class Relaxed(ic.Solver):
        name = "relaxed"
        tau: float = 0.7
        def init(self, problem, z0):
            return {"z": z0, "fz": problem.F(z0)}
        def step(self, problem, state, k, active):
            z = self.tau * state["fz"] + (1 - self.tau) * state["z"]
            return {"z": z, "fz": problem.F(z)}

    @ic.hookimpl
    def implicit_core_solvers(register):
        register(Relaxed)
"""


def test_entry_point_plugin_of_another_distribution(tmp_path, fresh_registry):
    monkeypatch = fresh_registry
    _make_distribution(tmp_path, "relaxed-solver", "relaxed_solver", GOOD_PLUGIN)
    _make_distribution(tmp_path, "broken-plugin", "broken_plugin", "raise ImportError('boom at import')", entry="broken")
    _make_distribution(tmp_path, "raising-hook", "raising_hook", """
        import implicit_core as ic
        @ic.hookimpl
        def implicit_core_solvers(register):
            raise RuntimeError("hook exploded")
    """, entry="raising")
    _make_distribution(tmp_path, "clashing", "clashing", """
        import implicit_core as ic
        from implicit_solvers import Anderson
        class Fake(Anderson):
            pass
        @ic.hookimpl
        def implicit_core_solvers(register):
            register(Fake)      # name 'anderson' is taken by the built-in
            register(42)        # garbage
    """, entry="clash")
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ic.reload_plugins()
    assert any(issubclass(w.category, ic.PluginWarning) for w in caught)
    rows = {(p.kind, p.name): p for p in ic.plugins()}
    assert rows[("solver", "relaxed")].source == "relaxed-solver"
    assert "boom at import" in rows[("plugin", "broken")].reason
    assert "hook exploded" in rows[("solver", "raising")].reason
    broken_reasons = " ".join(p.reason for p in ic.plugins() if not p.available)
    assert "already taken by implicit-core" in broken_reasons
    assert "expected a Solver subclass" in broken_reasons
    # the built-in anderson still wins, everything else still works
    assert type(ic.get_solver("anderson")).__module__ == "implicit_solvers.anderson"
    case = linear_case(ic.get_backend("numpy"))
    z, info = ic.fixed_point(case.f, case.z0, case.args, solver="relaxed", tol=1e-10, max_iter=300)
    assert info.converged.all()
    with pytest.raises(ic.UnknownPluginError, match="broken"):
        ic.get_solver("raising")


def test_autoload_switch_keeps_only_builtins_and_the_allow_list(tmp_path, fresh_registry):
    monkeypatch = fresh_registry
    _make_distribution(tmp_path, "relaxed-solver", "relaxed_solver", GOOD_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("IMPLICIT_CORE_DISABLE_PLUGIN_AUTOLOAD", "1")
    ic.reload_plugins()
    names = solver_names()
    assert "relaxed" not in names and "anderson" in names
    monkeypatch.setenv("IMPLICIT_CORE_PLUGINS", "relaxed-solver")
    ic.reload_plugins()
    assert "relaxed" in solver_names()


def test_core_imports_no_framework():
    """implicit_core (and its plugins) import only numpy, pluggy and array-api-compat."""
    code = textwrap.dedent("""
        import sys, warnings
        warnings.simplefilter("error")
        import implicit_core, implicit_core.cli, implicit_solvers, implicit_gradients
        import implicit_numpy, implicit_cupy, implicit_torch, implicit_jax
        rows = implicit_core.plugins()  # lists availability without importing a framework
        implicit_core.cli.main(["plugins", "--plain"])
        bad = sorted(m for m in ("torch", "jax", "cupy", "jaxlib", "tensorflow") if m in sys.modules)
        print("frameworks imported:", ",".join(bad))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "frameworks imported:", out.stdout
    assert any(line.startswith("backend   torch") and "installed" in line for line in lines), out.stdout


def test_plugins_check_probes_backends_and_lookup_reports_missing_modules():
    from implicit_core.plugin import Backend

    class Missing(Backend):
        name = "missing_backend"
        requires = ("no_such_framework_xyz",)
        install_hint = "pip install no-such-framework"

        def owns(self, x):
            return False

        def namespace(self):
            raise AssertionError("never asked")

        def linearise(self, problem, z):
            raise AssertionError("never asked")

    ic.register(Missing)
    try:
        for check in (False, True):
            row = {(p.kind, p.name): p for p in ic.plugins(check=check)}[("backend", "missing_backend")]
            assert not row.available and row.checked
            assert "no_such_framework_xyz is not installed; pip install no-such-framework" in row.reason
        with pytest.raises(ic.BackendUnavailableError, match="no_such_framework_xyz is not installed"):
            ic.fixed_point(lambda z, a: z, np.zeros((1, 2)), (), backend="missing_backend")
        checked = {(p.kind, p.name): p for p in ic.plugins(check=True)}
        assert all(p.checked for p in checked.values())
        assert checked[("backend", "torch")].available  # torch is installed in the test environment
    finally:
        ic.unregister("missing_backend")


def test_every_module_imports_with_warnings_as_errors():
    import pkgutil

    import implicit_core

    names = [m.name for m in pkgutil.walk_packages(implicit_core.__path__, "implicit_core.")]
    code = "import warnings; warnings.simplefilter('error')\n" + "\n".join(f"import {n}" for n in names)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nothing_outside_the_core_imports_its_private_modules():
    """Built-in plugins, the demo, examples and benchmarks use only public names
    (``implicit_core`` and ``implicit_core.plugin``): what a third party can use too."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    private = re.compile(r"^\s*(from|import)\s+implicit_core\._", re.M)
    offenders = [str(path.relative_to(root)) for folder in ("backends", "plugins", "apps", "examples", "benchmarks")
                 for path in (root / folder).rglob("*.py") if private.search(path.read_text())]
    assert offenders == []


def test_a_source_tree_without_installed_metadata_has_every_builtin():
    """No entry points at all (a checkout on PYTHONPATH, never installed): the built-ins load."""
    code = textwrap.dedent("""
        import importlib.metadata as md
        md.entry_points = lambda **kw: []            # as if nothing were installed
        import numpy as np, implicit_core as ic
        names = sorted(p.name for p in ic.plugins() if p.kind in ("solver", "gradient"))
        z, info = ic.fixed_point(lambda z, a: 0.5 * z + 1.0, np.zeros((2, 3)), solver="anderson")
        print(",".join(names), bool(info.converged.all()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["anderson,broyden,broyden_reuse,fixed_point,ift,jfb,phantom,shine", "True"]


def test_a_third_party_entry_point_named_like_a_builtin_does_not_collide(tmp_path, fresh_registry):
    _make_distribution(tmp_path, "relaxed-solver", "relaxed_solver", GOOD_PLUGIN, entry="torch")
    fresh_registry.syspath_prepend(str(tmp_path))
    ic.reload_plugins()
    rows = {(p.kind, p.name): p for p in ic.plugins()}
    assert rows[("solver", "relaxed")].plugin == "torch" and rows[("solver", "relaxed")].available
    assert rows[("backend", "torch")].plugin == "implicit_core.torch"


COMMAND_PLUGIN = """
    import implicit_core as ic

    def add_arguments(parser):
        parser.add_argument("--name", default="world")

    def run(args):
        print(f"hello {args.name}")
        return 0

    @ic.hookimpl
    def implicit_core_commands(register):
        register("hello", run, help="say hello", add_arguments=add_arguments)
        register("demo", run, help="clashes with the demo's command")
"""


def test_a_distribution_adds_cli_commands_through_the_hook(tmp_path, fresh_registry, capsys):
    from implicit_core.cli import main

    _make_distribution(tmp_path, "hello-command", "hello_command", COMMAND_PLUGIN, entry="hello")
    _make_distribution(tmp_path, "bad-command", "bad_command", """
        import implicit_core as ic
        @ic.hookimpl
        def implicit_core_commands(register):
            raise RuntimeError("no commands today")
    """, entry="bad")
    fresh_registry.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ic.PluginWarning)
        ic.reload_plugins()
    commands = {p.name: p.source for p in ic.plugins() if p.kind == "command" and p.available}
    assert commands["hello"] == "hello-command"
    assert commands["demo"] == "implicit-core"  # the first registration wins
    broken = {p.name: p.reason for p in ic.plugins() if p.kind == "command" and not p.available}
    assert "already taken" in broken["demo"] and "no commands today" in broken["bad"]
    assert main(["hello", "--name", "DEQ"]) == 0
    assert capsys.readouterr().out.strip() == "hello DEQ"


def test_the_core_imports_no_app():
    """The demo's commands arrive through the hook: nothing in implicit_core names the app."""
    import pathlib

    core = pathlib.Path(ic.__file__).parent
    offenders = [p.name for p in core.rglob("*.py") if "implicit_demo" in p.read_text()]
    assert offenders == []
