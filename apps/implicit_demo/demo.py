"""``implicit-core demo``: train the digits DEQ once and report what happened."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from . import plots
from .model import DemoConfig
from .train import RunResult, progress_bar, train


def run_demo(config: DemoConfig, out: str | pathlib.Path = "implicit-core-demo", show_progress: bool = True,
             echo: Any = print) -> RunResult:
    """Train, print a summary, write ``demo_<backend>.json`` and ``demo_<backend>.png`` to ``out``."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    echo(f"DEQ on digits: backend {config.backend}, solver {config.solver}, gradient {config.gradient}, "
         f"hidden {config.hidden}, {config.epochs} epochs, seed {config.seed}")
    with progress_bar(show_progress) as progress:
        result, _ = train(config, progress=progress)
    forward, backward = result.split()
    last = result.history[-1]
    lines = [
        f"test accuracy      {100 * result.test_accuracy:.1f} %",
        f"time per epoch     {result.epoch_time():.2f} s (median; first epoch {result.history[0].epoch_s:.2f} s)",
        f"forward / backward {forward:.2f} s / {backward:.2f} s per epoch",
        f"solver steps       {last.steps_mean:.1f} mean in the last epoch, "
        f"{100 * last.converged:.1f} % of samples converged to tol {config.tol:g}",
    ]
    (out / f"demo_{config.backend}.json").write_text(json.dumps(result.as_dict(), indent=2))
    png = plots.training_curves(result, out / f"demo_{config.backend}.png")
    lines.append(f"written            {out / f'demo_{config.backend}.json'}" + (f", {png}" if png else
                 " (pip install matplotlib for the PNG)"))
    echo("\n".join(lines))
    return result
