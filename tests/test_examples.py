import importlib.util
import pathlib
import sys
import pytest

pytestmark = pytest.mark.slow  # end-to-end: trains, installs or spawns processes

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (Equinox modules) look their module up there
    spec.loader.exec_module(module)
    return module


def test_numpy_quickstart_runs_and_ranks_the_estimators():
    cosines = load("numpy_quickstart").main(batch=8, n=16)
    assert cosines["ift"] > 0.9999
    assert all(c > 0.5 for c in cosines.values())


def test_jax_equinox_example_trains():
    import pytest

    pytest.importorskip("equinox")
    pytest.importorskip("optax")
    accuracy = load("jax_equinox_deq").main(steps=60, batch=64, verbose=False)
    assert accuracy > 0.75  # 10 classes: chance is 0.1; 300 steps reach about 0.94


def test_torch_example_trains():
    import pytest

    pytest.importorskip("torch")
    accuracy = load("torch_deq").main(epochs=3, verbose=False)
    assert accuracy > 0.85  # 10 epochs reach about 0.96


def test_hyperparameter_example_lowers_the_validation_loss_with_every_method(tmp_path):
    module = load("hyperparameter_optimisation")
    results = module.main(steps=8, out=tmp_path, verbose=False)
    assert set(results) == {"ift", "shine", "jfb"}
    for method, h in results.items():
        losses = h["val_loss"]
        assert losses[-1] < 0.8 * losses[0], method  # λ = 1 over-regularises: the outer loop lowers it
        assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:])), method
        assert h["log_lambda"][-1] < 0
    assert (tmp_path / "hyperparameter_optimisation.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The example plugin packages pip-installed into a folder; the environment that sees them."""
    import os
    import subprocess

    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(EXAMPLES / "custom_solver_plugin"), str(EXAMPLES / "array_api_backend_plugin")], check=True)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}


def test_example_backend_plugin_installs_and_passes_the_conformance_suite(plugin_site):
    """A fresh interpreter finds the strict backend by its entry point; its README runs as shown."""
    import re
    import subprocess

    pytest.importorskip("array_api_strict")
    listing = subprocess.run([sys.executable, "-m", "implicit_core.cli", "plugins", "--plain"], env=plugin_site,
                             capture_output=True, text=True, check=True).stdout
    row = next(line.split() for line in listing.splitlines() if " strict " in f" {line} ")
    assert row[:4] == ["backend", "strict", "implicit-strict", "installed"]
    readme = (EXAMPLES / "array_api_backend_plugin" / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    shown = subprocess.run([sys.executable, "-c", block], env=plugin_site, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "broyden: 5/5 converged" in shown.stdout and "True" in shown.stdout


def test_custom_solver_plugin_installs_and_registers_like_a_third_party(plugin_site):
    """pip installs the example package; a fresh interpreter discovers its solver by entry point."""
    import subprocess

    env = plugin_site
    listing = subprocess.run([sys.executable, "-m", "implicit_core.cli", "plugins", "--plain"], env=env,
                             capture_output=True, text=True, check=True).stdout
    row = next(line.split() for line in listing.splitlines() if " halpern " in f" {line} ")
    assert row[:4] == ["solver", "halpern", "implicit-halpern", "available"]
    script = (
        "import numpy as np, implicit_core as ic\n"
        "A = np.array([[0.0, -1.0], [1.0, 0.0]])\n"  # a rotation: nonexpansive, fixed-point iteration cycles
        "f = lambda z, a: z @ A.T\n"
        "z0 = np.array([[1.0, 0.5]])\n"
        "z, info = ic.fixed_point(f, z0, solver='halpern', tol=1e-3, max_iter=5000)\n"
        "_, plain = ic.fixed_point(f, z0, solver='fixed_point', tol=1e-3, max_iter=5000, on_fail='ignore')\n"
        "print(bool(info.converged[0]), bool(plain.converged[0]), float(np.abs(z).max()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["True", "False"] and float(out[2]) < 1e-2  # Halpern reaches the fixed point 0
    import re

    readme = (EXAMPLES / "custom_solver_plugin" / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    shown = subprocess.run([sys.executable, "-c", block], env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "halpern: 3/3 converged" in shown.stdout and "fixed_point: 0/3 converged" in shown.stdout


def test_a_benchmark_with_a_missing_peer_stops_before_measuring_and_says_what_to_install():
    import subprocess

    script = EXAMPLES.parent / "benchmarks" / "torch_vs_torchdeq.py"
    code = ("import sys, importlib.util as u; real = u.find_spec; "
            "u.find_spec = lambda name, *a: None if name == 'torchdeq' else real(name, *a); "
            f"sys.argv = [{str(script)!r}]; sys.path.insert(0, {str(script.parent)!r}); "
            f"exec(compile(open({str(script)!r}).read(), {str(script)!r}, 'exec'), {{'__name__': '__main__'}})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert "torch_vs_torchdeq.py needs torchdeq (not installed here): pip install" in out.stderr


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_the_floor_benchmarks_hand_written_loop_keeps_the_solve_loops_contract(backend):
    """``benchmarks/floor.py`` sets the library's fixed-point forward beside a loop written
    directly in the framework to the same contract: on the same work both evaluate ``f`` as
    many times (per-sample stopping, a final evaluation)."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} not installed")
    sys.path.insert(0, str(EXAMPLES.parent / "benchmarks"))
    try:
        import floor
    finally:
        sys.path.pop(0)
    work = floor.WORKLOADS[backend](floor.reference_arrays(n=32, batch=16))
    assert work.handwritten() == work.solve("fixed_point") > 3
