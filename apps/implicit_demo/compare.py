"""``implicit-core compare``: the gradient estimators side by side on the digits DEQ.

Every estimator × backend trains from the same initialisation with the same solver, seed and
budget; then, on the trained parameters, the estimator's gradient is compared with the exact
implicit gradient (IFT solved to a tight tolerance), and one training step's peak memory is
measured with the backend's own accounting.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
from typing import Any, Sequence

import numpy as np

import implicit_core as ic

from . import plots
from .data import load_digits
from .model import DemoConfig
from .train import progress_bar, train

GRADIENTS = ("ift", "jfb", "phantom", "shine", "broyden_reuse")
COLUMNS = ("backend", "gradient", "solver", "epochs", "test_accuracy", "epoch_s", "forward_s", "backward_s",
           "peak_memory_kib", "cosine_to_ift", "steps_mean")
#: The exact gradient the cosine column is measured against.
EXACT = {"tol": 1e-5, "max_iter": 200}


def cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Cosine between two gradients given as lists of arrays (all parameters together)."""
    u = np.concatenate([x.ravel() for x in a])
    v = np.concatenate([x.ravel() for x in b])
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def run_comparison(backends: Sequence[str], gradients: Sequence[str] = GRADIENTS, base: DemoConfig | None = None,
                   out: str | pathlib.Path = "implicit-core-compare", show_progress: bool = True,
                   echo: Any = print) -> list[dict[str, Any]]:
    """One row per backend × estimator; writes ``compare.csv``, ``compare.md`` and ``compare.png``."""
    base = base or DemoConfig(solver="broyden")  # SHINE and Broyden reuse need Broyden's inverse estimate
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits(base.seed)
    probe = np.arange(min(256, len(data.y_train)))  # the batch every gradient is compared on
    rows = []
    with progress_bar(show_progress) as progress:
        task = progress.add_task("compare", total=len(backends) * len(gradients), stats="") if progress else None
        for backend in backends:
            for gradient in gradients:
                if progress is not None:
                    progress.update(task, stats=f"{backend} / {gradient}")
                config = dataclasses.replace(base, backend=backend, gradient=gradient)
                result, trainer = train(config, data)
                exact = ic.get_gradient("ift", **EXACT)
                g_exact = trainer.gradients(probe, exact, **EXACT)
                g_est = trainer.gradients(probe, gradient, config.tol, config.max_iter)
                memory = trainer.peak_memory(probe[: config.batch_size])
                forward, backward = result.split()
                rows.append({
                    "backend": backend, "gradient": gradient, "solver": config.solver, "epochs": config.epochs,
                    "test_accuracy": round(result.test_accuracy, 4), "epoch_s": round(result.epoch_time(), 4),
                    "forward_s": round(forward, 4), "backward_s": round(backward, 4),
                    "peak_memory_kib": None if memory is None else round(memory / 1024, 1),
                    "cosine_to_ift": round(cosine(g_est, g_exact), 4),
                    "steps_mean": round(result.history[-1].steps_mean, 2),
                })
                if progress is not None:
                    progress.advance(task)
    write_csv(rows, out / "compare.csv")
    markdown = to_markdown(rows)
    (out / "compare.md").write_text(markdown + "\n")
    png = plots.comparison_figure(rows, out / "compare.png")
    echo(markdown)
    echo(f"\nwritten {out / 'compare.csv'}, {out / 'compare.md'}" + (f", {png}" if png else ""))
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Backward time and memory also as ratios to the same backend's ``ift`` row."""
    head = ["backend", "gradient", "test acc.", "epoch s", "backward s", "× ift", "peak mem. KiB", "× ift",
            "cosine to IFT", "solver steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ift = next((x for x in rows if x["backend"] == r["backend"] and x["gradient"] == "ift"), None)
        ratio = lambda key: f"{r[key] / ift[key]:.2f}" if ift and r[key] and ift[key] else "–"  # noqa: E731
        mem = "–" if r["peak_memory_kib"] is None else f"{r['peak_memory_kib']:.0f}"
        lines.append(f"| {r['backend']} | {r['gradient']} | {r['test_accuracy']:.3f} | {r['epoch_s']:.3f} | "
                     f"{r['backward_s']:.3f} | {ratio('backward_s')} | {mem} | {ratio('peak_memory_kib')} | "
                     f"{r['cosine_to_ift']:.4f} | {r['steps_mean']:.1f} |")
    return "\n".join(lines)
