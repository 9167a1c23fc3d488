import importlib.util
import pathlib
import sys

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
    assert accuracy > 0.75  # 10 classes: chance is 0.1; 300 steps reach about 0.92
