"""The demo's model, written once in maths and once per framework.

    inj = x Uᵀ + b                      input projection
    z*  = tanh(z* Wᵀ + inj)             the implicit layer (solved per sample)
    logits = z* Vᵀ + c                  linear head, softmax cross-entropy loss

Every framework's trainer starts from the same NumPy initialisation for a given seed, so the
backends can be compared run for run.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .data import Digits

#: Parameter names in the order every trainer reports gradients.
PARAMS = ("U", "b", "W", "V", "c")


@dataclass
class DemoConfig:
    """Everything a run depends on; the defaults are the demo's."""

    backend: str = "numpy"
    solver: str = "anderson"
    gradient: str = "ift"
    epochs: int = 12
    seed: int = 0
    hidden: int = 64
    batch_size: int = 64
    lr: float = 2e-3
    tol: float = 1e-4
    max_iter: int = 40
    #: spectral norm of W at initialisation (< 1: the cell starts contractive)
    w_norm: float = 0.5
    #: options of the solver / gradient estimator (``m=5``, ``k=5``, ...)
    options: dict[str, Any] = field(default_factory=dict)


def initial_parameters(config: DemoConfig, n_features: int, n_classes: int) -> dict[str, np.ndarray]:
    """Glorot-scaled projections, ``W`` rescaled to ``||W||₂ = w_norm``, zero biases (float32)."""
    rng = np.random.default_rng(config.seed)
    h = config.hidden
    W = rng.standard_normal((h, h))
    W *= config.w_norm / np.linalg.norm(W, 2)
    params = {
        "U": rng.standard_normal((h, n_features)) * np.sqrt(2.0 / (h + n_features)),
        "b": np.zeros(h),
        "W": W,
        "V": rng.standard_normal((n_classes, h)) * np.sqrt(2.0 / (h + n_classes)),
        "c": np.zeros(n_classes),
    }
    return {k: v.astype(np.float32) for k, v in params.items()}


@dataclass
class StepStats:
    """One training step: the batch's loss and correct count, solver steps, and timings."""

    loss: float
    correct: int
    steps_mean: float
    converged: float  # fraction of the batch's samples that met the tolerance
    forward_s: float
    backward_s: float


@dataclass
class Evaluation:
    accuracy: float
    steps_mean: float
    converged: float


class Trainer(ABC):
    """A framework's way to train the demo model; the driver only talks to this interface.

    Subclasses hold the data on their device (moved once), the parameters and an optimiser
    (Adam), and implement a step, an evaluation, gradients under any estimator (for the
    gradient-quality columns of ``compare``) and the peak memory of a training step.
    """

    def __init__(self, config: DemoConfig, data: Digits) -> None:
        self.config = config
        self.data = data

    @abstractmethod
    def train_step(self, idx: np.ndarray) -> StepStats:
        """One Adam step on the training samples ``idx``."""

    @abstractmethod
    def evaluate(self) -> Evaluation:
        """Accuracy of the current parameters on the test split."""

    @abstractmethod
    def gradients(self, idx: np.ndarray, gradient: Any, tol: float, max_iter: int) -> list[np.ndarray]:
        """``dL/dθ`` on training samples ``idx`` (order :data:`PARAMS`), without an update."""

    @abstractmethod
    def peak_memory(self, idx: np.ndarray) -> int | None:
        """Peak bytes allocated by one training step on ``idx`` (``None``: cannot be measured)."""


def timed(fn: Callable[[], Any], wait: Callable[[Any], Any] = lambda out: None) -> tuple[Any, float]:
    """``(fn(), seconds)``; ``wait(out)`` blocks on asynchronous devices before the clock stops."""
    start = time.perf_counter()
    out = fn()
    wait(out)
    return out, time.perf_counter() - start


def make_trainer(config: DemoConfig, data: Digits) -> Trainer:
    """The trainer for ``config.backend``: framework autodiff on torch/JAX, hand-written VJPs otherwise."""
    import implicit_core as ic


    backend = ic.require_available(ic.get_backend(config.backend))  # typed errors: unknown or unavailable
    if config.backend == "torch":
        from .torch_model import TorchTrainer

        return TorchTrainer(config, data)
    if config.backend == "jax":
        from .jax_model import JaxTrainer

        return JaxTrainer(config, data)
    if backend.explicit_vjp:
        from .array_model import ArrayTrainer

        return ArrayTrainer(config, data)
    raise ic.ConfigurationError(
        f"the demo has no trainer for backend {config.backend!r}; it runs on torch, jax and "
        "on every backend without autodiff (numpy, cupy)"
    )
