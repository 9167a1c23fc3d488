"""Training and measuring a torch DEQ workload once per gradient estimator.

A workload (:class:`TorchTask`) says how to build its model, batch its data, compute its loss
and score the model; :func:`run_task` does the rest the same way for every workload: train
from the same initialisation per estimator (the estimator swapped on the model's ``DEQ``),
time forward and backward, then measure on the trained weights the cosine of the estimator's
``dL/dθ`` to the exact implicit gradient and one training step's peak memory.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np
import torch

import implicit_core as ic
from implicit_torch.memory import PeakMemory

from ..train import progress_bar
from ..compare import cosine


class TorchTask(ABC):
    """One workload: data, model, loss and score; the model holds its implicit layer as ``.deq``."""

    name: str
    #: what :meth:`evaluate` returns, e.g. ``"test accuracy"``
    metric: str
    #: training settings of the DEQ (``tol``, ``stop_mode``, ``max_iter``)
    solve: dict[str, Any] = {"tol": 1e-3, "stop_mode": "rel", "max_iter": 30}
    #: the reference the cosine column is measured against: a tight forward and IFT
    exact: dict[str, Any] = {"tol": 1e-5, "max_iter": 100}
    lr: float = 2e-3

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @abstractmethod
    def build(self) -> torch.nn.Module:
        """A fresh model (the same weights for the same seed) with its ``DEQ`` at ``.deq``."""

    @abstractmethod
    def batches(self, rng: np.random.Generator) -> list[Any]:
        """One epoch of training batches."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The training loss on ``batch``."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module) -> float:
        """The score reported in the :attr:`metric` column."""

    @abstractmethod
    def probe(self) -> Any:
        """The batch gradients are compared on."""

    def extra(self, model: torch.nn.Module, row: dict[str, Any]) -> None:
        """Workload-specific columns added to ``row`` after training (default: none)."""


def step_peak_kib(task: TorchTask, model: torch.nn.Module, batch: Any = None) -> float:
    """One training step's peak memory in KiB (loss and backward; on the first training batch of
    the task's seed unless ``batch`` is given); the gradients are dropped afterwards."""
    if batch is None:
        batch = task.batches(np.random.default_rng(task.seed))[0]
    with PeakMemory("cpu") as meter:
        task.loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return round(meter.peak / 1024, 1)


def unrolled_memory(task: TorchTask, model: torch.nn.Module, row: dict[str, Any]) -> None:
    """Columns comparing one training step's memory with the explicit network: the cell applied
    as many times as the DEQ's mean forward steps, the same weights, backpropagation through
    every layer (``task.build(depth)`` builds it)."""
    depth = max(1, round(row["steps_mean"]))
    explicit = task.build(depth)
    explicit.load_state_dict(model.state_dict())
    row["x_explicit_depth"] = depth
    row["x_explicit_memory_kib"] = step_peak_kib(task, explicit)
    row["x_memory_saved"] = f"{round(100 * (1 - row['peak_memory_kib'] / row['x_explicit_memory_kib']))} %"


def _grads(model: torch.nn.Module) -> list[np.ndarray]:
    return [p.grad.detach().double().numpy().copy() for p in model.parameters() if p.grad is not None]


def gradient_on(task: TorchTask, model: torch.nn.Module, gradient: Any, **solve: Any) -> list[np.ndarray]:
    """``dL/dθ`` on the probe batch with ``gradient`` (and the given stopping rule), no update."""
    deq = model.deq
    saved = deq.gradient, deq.tol, deq.max_iter
    deq.gradient = ic.get_gradient(gradient) if isinstance(gradient, str) else gradient
    deq.tol, deq.max_iter = solve.get("tol", deq.tol), solve.get("max_iter", deq.max_iter)
    try:
        model.zero_grad(set_to_none=True)
        task.loss(model, task.probe()).backward()
        return _grads(model)
    finally:
        deq.gradient, deq.tol, deq.max_iter = saved
        model.zero_grad(set_to_none=True)


def backward_time(task: TorchTask, model: torch.nn.Module, gradient: str, repeat: int = 3) -> float:
    """Median seconds of one backward pass on the probe batch (evaluation mode: the estimator's
    cost without training-only terms such as a Jacobian penalty, which every estimator pays alike)."""
    model.deq.gradient = ic.get_gradient(gradient)
    times = []
    for _ in range(repeat):
        model.zero_grad(set_to_none=True)
        loss = task.loss(model, task.probe())
        start = time.perf_counter()
        loss.backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return float(np.median(times))


def train_one(task: TorchTask, gradient: str, epochs: int, progress: Any = None) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(task.seed)
    model = task.build()
    model.deq.gradient = ic.get_gradient(gradient)
    optimiser = torch.optim.Adam(model.parameters(), lr=task.lr)
    rng = np.random.default_rng(task.seed)
    fwd = bwd = 0.0
    steps: list[float] = []
    bar = None
    start = time.perf_counter()
    for epoch in range(epochs):
        order = task.batches(rng)
        if progress is not None:
            bar = progress.add_task(f"{task.name} {gradient} {epoch + 1}/{epochs}", total=len(order), stats="")
        for batch in order:
            model.train()
            optimiser.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = task.loss(model, batch)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimiser.step()
            fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
            steps.append(float(model.deq.info.steps.float().mean()))
            if bar is not None:
                progress.update(bar, advance=1, stats=f"loss {float(loss):.3f}  steps {steps[-1]:.1f}")
    seconds = time.perf_counter() - start
    return model, {"epoch_s": seconds / epochs, "forward_s": fwd / epochs, "backward_s": bwd / epochs,
                   "steps_mean": float(np.mean(steps[-max(1, len(steps) // epochs):]))}


def run_task(task: TorchTask, gradients: Sequence[str], epochs: int, show_progress: bool = True) -> list[dict[str, Any]]:
    """One row per estimator: score, timings, cosine to exact IFT, peak memory, forward steps."""
    rows = []
    with progress_bar(show_progress) as progress:
        for gradient in gradients:
            model, timing = train_one(task, gradient, epochs, progress)
            model.eval()
            with torch.no_grad():
                score = task.evaluate(model)
            exact = gradient_on(task, model, ic.get_gradient("ift", tol=1e-6, max_iter=200), **task.exact)
            estimate = gradient_on(task, model, gradient)
            layer_backward = backward_time(task, model, gradient)
            model.train()
            peak = step_peak_kib(task, model)
            row = {"workload": task.name, "gradient": gradient, "metric": task.metric, "value": round(score, 4),
                   **{k: round(v, 4) for k, v in timing.items()},
                   "peak_memory_kib": peak, "cosine_to_ift": round(cosine(estimate, exact), 4),
                   "probe_backward_s": round(layer_backward, 5)}
            task.extra(model, row)
            rows.append(row)
    return rows


def memory_against_depth(task: TorchTask, solvers: dict[str, Any], depths: Sequence[int] = (4, 8, 16, 32)
                         ) -> list[dict[str, Any]]:
    """One training step's peak memory (KiB) at each depth: the DEQ held to exactly ``depth``
    solver steps with each forward solver of ``solvers`` (column label -> solver, or ``(solver,
    gradient)``; IFT by default), and the explicit network of ``depth`` layers
    (``task.build(depth)``, the same weights)."""
    rows = []
    batch = task.batches(np.random.default_rng(task.seed))[0]
    for depth in depths:
        torch.manual_seed(task.seed)
        deq_model = task.build()
        deq_model.deq.tol, deq_model.deq.max_iter = 1e-12, depth  # exactly `depth` steps
        explicit = task.build(depth)
        explicit.load_state_dict(deq_model.state_dict())
        row: dict[str, Any] = {"depth": depth}
        for label, spec in solvers.items():
            solver, gradient = spec if isinstance(spec, tuple) else (spec, "ift")
            deq_model.deq.solver = ic.get_solver(solver) if isinstance(solver, str) else solver
            deq_model.deq.gradient = ic.get_gradient(gradient) if isinstance(gradient, str) else gradient
            row[label] = step_peak_kib(task, deq_model, batch)
        row["explicit"] = step_peak_kib(task, explicit, batch)
        rows.append(row)
    return rows


def memory_table(rows: list[dict[str, Any]]) -> str:
    """:func:`memory_against_depth`'s rows as Markdown, with each DEQ's ratio to the explicit network."""
    labels = [key for key in rows[0] if key not in ("depth", "explicit")]
    lines = ["| depth | " + " | ".join(labels) + " | explicit | " + " | ".join(f"{k} / explicit" for k in labels) + " |",
             "|" + "---|" * (2 + 2 * len(labels))]
    for r in rows:
        lines.append(f"| {r['depth']} | " + " | ".join(f"{r[k]:.0f}" for k in labels) + f" | {r['explicit']:.0f} | "
                     + " | ".join(f"{r[k] / r['explicit']:.2f}" for k in labels) + " |")
    return "\n".join(lines)
