"""The training loop shared by ``demo`` and ``compare``: epochs, progress, history, summary."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from .data import Digits, batches, load_digits
from .model import DemoConfig, Trainer, make_trainer


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    train_accuracy: float
    test_accuracy: float
    steps_mean: float  # mean forward solver steps over the epoch's training samples
    converged: float  # fraction of training samples whose forward solve met the tolerance
    epoch_s: float
    forward_s: float
    backward_s: float


@dataclass
class RunResult:
    config: DemoConfig
    history: list[EpochRecord] = field(default_factory=list)

    @property
    def test_accuracy(self) -> float:
        return self.history[-1].test_accuracy

    def epoch_time(self) -> float:
        """Median seconds per epoch (the first epoch carries JAX's compilation: a median ignores it)."""
        return float(np.median([r.epoch_s for r in self.history]))

    def split(self) -> tuple[float, float]:
        """Median forward and backward seconds per epoch."""
        return (float(np.median([r.forward_s for r in self.history])),
                float(np.median([r.backward_s for r in self.history])))

    def as_dict(self) -> dict[str, Any]:
        forward, backward = self.split()
        return {"config": asdict(self.config), "test_accuracy": self.test_accuracy,
                "epoch_s": self.epoch_time(), "forward_s": forward, "backward_s": backward,
                "first_epoch_s": self.history[0].epoch_s, "history": [asdict(r) for r in self.history]}


def train(config: DemoConfig, data: Digits | None = None, progress: Any = None) -> tuple[RunResult, Trainer]:
    """Train for ``config.epochs`` epochs; ``progress`` is a ``rich.progress.Progress`` or ``None``."""
    data = data or load_digits(config.seed)
    trainer = make_trainer(config, data)
    rng = np.random.default_rng(config.seed)
    result = RunResult(config)
    for epoch in range(1, config.epochs + 1):
        order = batches(len(data.y_train), config.batch_size, rng)
        task = None
        if progress is not None:
            task = progress.add_task(f"epoch {epoch:>2}/{config.epochs}", total=len(order), stats="")
        start = time.perf_counter()
        losses, steps, converged, correct, seen, t_fwd, t_bwd = [], [], [], 0, 0, 0.0, 0.0
        for idx in order:
            s = trainer.train_step(idx)
            losses.append(s.loss)
            steps.append(s.steps_mean)
            converged.append(s.converged)
            correct, seen = correct + s.correct, seen + len(idx)
            t_fwd, t_bwd = t_fwd + s.forward_s, t_bwd + s.backward_s
            if task is not None:
                progress.update(task, advance=1, stats=f"loss {np.mean(losses):.3f} acc {correct / seen:.3f} "
                                                       f"steps {np.mean(steps):.1f}")
        epoch_s = time.perf_counter() - start
        test = trainer.evaluate()
        record = EpochRecord(epoch, float(np.mean(losses)), correct / seen, test.accuracy, float(np.mean(steps)),
                             float(np.mean(converged)), epoch_s, t_fwd, t_bwd)
        result.history.append(record)
        if task is not None:
            progress.update(task, stats=f"loss {record.loss:.3f} acc {record.train_accuracy:.3f} "
                                        f"test {record.test_accuracy:.3f} steps {record.steps_mean:.1f} "
                                        f"conv {100 * record.converged:.0f}%")
    return result, trainer


class LineProgress:
    """The progress interface of ``rich.progress.Progress`` as plain lines, for pipes and logs.

    No bar and no redrawing: one line per finished task (an epoch), with its last counters,
    printed once the task is complete and its final statistics are in.
    """

    def __init__(self, write: Any = print) -> None:
        self._tasks: dict[int, dict[str, Any]] = {}
        self._write = write

    def add_task(self, description: str, total: int, stats: str = "") -> int:
        self._flush()
        task = len(self._tasks)
        self._tasks[task] = {"description": description, "total": total, "completed": 0, "stats": stats,
                             "start": time.perf_counter(), "printed": False}
        return task

    def update(self, task: int, advance: int = 0, stats: str | None = None) -> None:
        t = self._tasks[task]
        t["completed"] += advance
        if stats is not None:
            t["stats"] = stats

    def advance(self, task: int) -> None:
        self.update(task, advance=1)

    def _flush(self) -> None:
        for t in self._tasks.values():
            if not t["printed"] and t["completed"] >= t["total"]:
                t["printed"] = True
                seconds = time.perf_counter() - t["start"]
                self._write(f"{t['description']}  {t['completed']}/{t['total']}  {seconds:.1f} s  {t['stats']}".rstrip())

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._flush()


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Any]:
    """A rich progress display on a terminal, one line per epoch when piped, ``None`` when disabled.

    The bar is narrow so that the counters stay readable in an 80-column terminal.
    """
    if not enabled:
        yield None
        return
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        Progress = None  # noqa: N806
    if Progress is None or not sys.stdout.isatty():
        with LineProgress() as lines:
            yield lines
        return
    from rich.console import Console

    console = Console()
    # The counters matter most: in a narrow terminal the bar shrinks and the clock goes.
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=16 if console.width >= 100 else 8),
               MofNCompleteColumn(), *([TimeElapsedColumn()] if console.width >= 100 else []),
               TextColumn("{task.fields[stats]}"))
    with Progress(*columns, console=console) as progress:
        yield progress
