import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_numpy_quickstart_runs_and_ranks_the_estimators():
    cosines = load("numpy_quickstart").main(batch=8, n=16)
    assert cosines["ift"] > 0.9999
    assert all(c > 0.5 for c in cosines.values())
