"""``implicit-core demo`` and ``compare``: they train, reach their accuracy, and write their files."""

import csv
import json

import numpy as np
import pytest

from implicit_core.cli import main
from implicit_demo.cli import DEMO_BACKENDS
from implicit_demo.compare import GRADIENTS, run_comparison
from implicit_demo.data import batches, load_digits
from implicit_demo.demo import run_demo
from implicit_demo.model import DemoConfig

from helpers import BACKENDS, backend_or_skip


#: The full training runs cover the backends the demo defaults to (and CuPy); every other
#: registered backend trains the same model in test_every_backend_trains_the_same_model.
TRAINED = [b for b in BACKENDS if b in (*DEMO_BACKENDS, "cupy")]


@pytest.fixture(params=TRAINED)
def backend(request):
    backend_or_skip(request.param)
    return request.param


@pytest.mark.slow
def test_demo_defaults_reach_95_percent(backend, tmp_path):
    result = run_demo(DemoConfig(backend=backend), out=tmp_path, show_progress=False, echo=lambda *_: None)
    assert result.test_accuracy >= 0.95
    assert all(r.converged >= 0.99 for r in result.history)  # the cell stays (nearly) contractive while training
    summary = json.loads((tmp_path / f"demo_{backend}.json").read_text())
    assert summary["test_accuracy"] == result.test_accuracy and len(summary["history"]) == 12
    assert summary["forward_s"] > 0 and summary["backward_s"] > 0
    assert (tmp_path / f"demo_{backend}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_every_backend_trains_the_same_model():
    """Same seed, same initialisation and batches: NumPy and the frameworks agree step for step."""
    from implicit_demo.model import make_trainer

    data = load_digits(0)
    losses = {}
    for name in BACKENDS:
        if not __import__("implicit_core").get_backend(name).available()[0]:
            continue
        trainer = make_trainer(DemoConfig(backend=name, tol=1e-6, max_iter=80), data)
        rng = np.random.default_rng(0)
        losses[name] = [trainer.train_step(idx).loss for idx in batches(len(data.y_train), 64, rng)[:5]]
    reference = losses.pop("numpy")
    for name, values in losses.items():
        np.testing.assert_allclose(values, reference, rtol=2e-4, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("gradients", [("ift", "jfb", "phantom"), ("shine", "broyden_reuse")], ids=["exact-and-unrolled", "inverse-reuse"])
def test_compare_writes_a_row_per_estimator_and_backend(backend, gradients, tmp_path):
    """One backend and a group of estimators per test: the parallel runner spreads them over the cores."""
    if backend == "jax" and "ift" in gradients:
        # (compiling three more training steps; JAX's estimators are checked in tests/gradients,
        # and the JAX trainer's comparison rows by the other group)
        pytest.skip("JAX: the inverse-reuse group covers the JAX comparison")
    if backend == "jax":  # one estimator: the JAX trainer's rows, not every estimator compiled again
        gradients = gradients[-1:]
    rows = run_comparison([backend], gradients, base=DemoConfig(solver="broyden", epochs=1), out=tmp_path,
                     show_progress=False, echo=lambda *_: None)
    with (tmp_path / "compare.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [(r["backend"], r["gradient"]) for r in table] == [(backend, g) for g in gradients]
    assert len(rows) == len(gradients)
    by = {r["gradient"]: r for r in rows}
    assert all(r["test_accuracy"] > 0.7 for r in rows)  # one epoch: chance is 0.1
    if "ift" in by:
        assert by["ift"]["cosine_to_ift"] > 0.999  # the same estimator, looser tolerance
        assert by["phantom"]["cosine_to_ift"] > 0.99
        assert 0.5 < by["jfb"]["cosine_to_ift"] < 0.9999  # approximate, but a descent direction
        assert by["jfb"]["backward_s"] < by["ift"]["backward_s"]
    else:  # the defaults read the adjoint-Broyden inverse estimate: close to exact
        assert by.get("shine", {"cosine_to_ift": 1.0})["cosine_to_ift"] > 0.9
        assert by["broyden_reuse"]["cosine_to_ift"] > 0.95
    assert f"| {backend} | {gradients[-1]} |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 10_000


@pytest.mark.slow
def test_cli_demo_runs_and_writes_its_files(tmp_path, capsys):
    assert main(["demo", "--backend", "numpy", "--epochs", "2", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "forward / backward" in out
    assert (tmp_path / "demo_numpy.json").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["demo", "--backend", "nump"], ["unknown backend 'nump'", "Did you mean 'numpy'", "Available:", "torch"]),
        (["demo", "--backend", "numpy", "--gradient", "shin"], ["unknown gradient estimator 'shin'", "broyden_reuse, ift"]),
        (["demo", "--backend", "numpy", "--solver", "anders"], ["unknown solver", "Did you mean 'anderson'"]),
        (["demo", "--backend", "numpy", "--gradient", "shine"], ["solver 'anderson' keeps none", "broyden"]),
        (["compare", "--backends", "numpy,tensorflow"], ["unknown backend 'tensorflow'", "numpy"]),
        (["compare", "--gradients", "ift,jbf"], ["unknown gradient estimator 'jbf'", "Did you mean 'jfb'"]),
    ],
)
def test_cli_rejects_unknown_names_listing_the_available_ones(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line, no traceback
    for text in expected:
        assert text in err


def test_the_old_bench_command_still_runs_compare_and_says_so(capsys):
    assert main(["bench", "--gradients", "ift,jbf"]) == 2
    err = capsys.readouterr().err
    assert "'bench' is now called 'compare'" in err and "unknown gradient estimator 'jbf'" in err


def test_cli_reports_an_unavailable_backend(capsys):
    import implicit_core as ic

    if ic.get_backend("cupy").available()[0]:
        pytest.skip("CuPy is available here")
    assert main(["demo", "--backend", "cupy"]) == 2
    assert "backend 'cupy' is unavailable here" in capsys.readouterr().err


@pytest.mark.slow
def test_piped_demo_prints_one_line_per_epoch_within_80_columns(tmp_path):
    """No bar when the output is not a terminal: one line per finished epoch with its counters."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "implicit_core.cli", "demo", "--backend", "numpy", "--epochs", "3",
                          "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("epoch")]
    assert len(epochs) == 3 and all("/22" in e and "test" in e and "conv" in e for e in epochs)
    assert all(len(line) <= 80 for line in epochs), epochs
    assert "\r" not in out.stdout and "\x1b[" not in out.stdout  # no redrawing, no colour codes
    assert any(line.startswith("test accuracy") for line in lines)
