"""The comparison's seed workloads run end to end (one short epoch each) and report what they measure."""

import csv

import pytest

from implicit_core.cli import main

pytestmark = pytest.mark.slow


def test_mdeq_trains_every_estimator_and_reports_its_gradient_quality(tmp_path):
    pytest.importorskip("torch")
    from implicit_demo.workloads import mdeq

    rows = mdeq.run(["ift", "shine"], epochs=1, show_progress=False, train_samples=192)
    by = {r["gradient"]: r for r in rows}
    assert by["ift"]["cosine_to_ift"] > 0.99  # IFT at the training tolerance against IFT at a tight one
    assert by["shine"]["cosine_to_ift"] > 0.5
    assert by["shine"]["probe_backward_s"] < by["ift"]["probe_backward_s"]
    assert all(0.1 < r["value"] <= 1.0 for r in rows)  # test accuracy after 3 batches
    assert all(r["peak_memory_kib"] > 0 and r["steps_mean"] >= 1 for r in rows)
    assert all(r["x_explicit_depth"] == max(1, round(r["steps_mean"])) and r["x_explicit_memory_kib"] > 0
               for r in rows)


def test_mdeq_memory_with_a_fixed_history_does_not_grow_with_depth():
    pytest.importorskip("torch")
    from implicit_demo.workloads.mdeq import DEPTH_SOLVERS, MultiscaleTask
    from implicit_demo.workloads.torch_training import memory_against_depth

    broyden, anderson, fixed_point = DEPTH_SOLVERS
    table = {r["depth"]: r for r in memory_against_depth(MultiscaleTask(train_samples=128), DEPTH_SOLVERS, (4, 16))}
    assert table[16]["explicit"] > 3 * table[4]["explicit"]
    # (within a state-sized vector: whether the best iterate is a copy depends on the trajectory)
    assert table[16][anderson] <= 1.1 * table[4][anderson]  # a history of m slots: flat in depth
    assert table[16][broyden] > 1.5 * table[4][broyden]  # two vectors per step, up to m = 30
    assert table[16][fixed_point] <= 1.1 * table[4][fixed_point]  # no history at all
    assert table[16][fixed_point] < table[16][anderson] < table[16][broyden]


def test_transformer_deq_memory_does_not_grow_with_depth_unlike_the_unrolled_block():
    pytest.importorskip("torch")
    from implicit_demo.workloads.torch_training import memory_against_depth, memory_table
    from implicit_demo.workloads.transformer import DEPTH_SOLVERS, CharTask

    task = CharTask(chars=20_000, batches_per_epoch=2, batch_size=8)
    rows = memory_against_depth(task, DEPTH_SOLVERS, depths=(4, 16))
    table = {r["depth"]: r for r in rows}
    long, short = DEPTH_SOLVERS
    assert table[16]["explicit"] > 3 * table[4]["explicit"]  # explicit: linear in depth
    assert table[16][long] < 1.5 * table[4][long]  # DEQ: bounded (Broyden's history is capped)
    assert table[16][long] < 0.5 * table[16]["explicit"]
    # With a history shorter than the depths, the same from 4 steps to 16 (the backward peaks)
    assert table[16][short] <= 1.02 * table[4][short]
    assert memory_table(rows).count("\n") == 3 and f"| {short} / explicit |" in memory_table(rows)


def test_transformer_trains_and_scores_bits_per_character():
    pytest.importorskip("torch")
    from implicit_demo.workloads import transformer

    rows = transformer.run(["ift", "jfb"], epochs=1, show_progress=False, chars=20_000, batches_per_epoch=3,
                           batch_size=8)
    for r in rows:
        assert 2.0 < r["value"] < 7.0  # bits per character: log2(100) = 6.6 is a uniform guess
        assert r["x_explicit_depth"] >= 1 and r["x_explicit_memory_kib"] > 0
    assert rows[0]["cosine_to_ift"] > 0.99


def test_cli_compare_hyperparameter_workload_writes_its_table(tmp_path, capsys):
    assert main(["compare", "--workload", "hyperparameter", "--gradients", "ift,shine,jfb", "--epochs", "3",
                 "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "final validation loss" in out and "| shine |" in out
    with (tmp_path / "compare_hyperparameter.csv").open() as fh:
        rows = {r["gradient"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"ift", "shine", "jfb"}
    assert float(rows["ift"]["cosine_to_ift"]) > 0.999
    assert float(rows["shine"]["cosine_to_ift"]) > 0.9
    assert (tmp_path / "compare_hyperparameter.png").stat().st_size > 10_000


def test_cli_refuses_an_unknown_workload(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--workload", "cifar"])
    assert exc.value.code == 2
    assert "invalid choice: 'cifar'" in capsys.readouterr().err
