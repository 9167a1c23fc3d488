"""The demo on PyTorch: an ``nn.Module`` around :class:`implicit_torch.DEQ`, trained with autograd."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from implicit_torch import DEQ
from implicit_torch.memory import PeakMemory

from .data import Digits
from .model import PARAMS, DemoConfig, Evaluation, StepStats, Trainer, initial_parameters, timed


class TanhCell(torch.nn.Module):
    """``f(z, inj) = tanh(z Wᵀ + inj)``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(torch.zeros(hidden, hidden))

    def forward(self, z: torch.Tensor, inj: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + inj)


class DigitsDEQ(torch.nn.Module):
    """Input projection → implicit tanh layer → linear head."""

    def __init__(self, config: DemoConfig, n_features: int, n_classes: int) -> None:
        super().__init__()
        h = config.hidden
        self.project = torch.nn.Linear(n_features, h)
        self.deq = DEQ(TanhCell(h), solver=config.solver, gradient=config.gradient, tol=config.tol,
                       max_iter=config.max_iter, on_fail="ignore", state_shape=(h,), **config.options)
        self.head = torch.nn.Linear(h, n_classes)
        init = initial_parameters(config, n_features, n_classes)
        with torch.no_grad():
            for name, tensor in self.named_tensors().items():
                tensor.copy_(torch.from_numpy(init[name]))

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The parameters under the names of :data:`implicit_demo.model.PARAMS`."""
        return {"U": self.project.weight, "b": self.project.bias, "W": self.deq.cell.W,
                "V": self.head.weight, "c": self.head.bias}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.project(x)))


class TorchTrainer(Trainer):
    def __init__(self, config: DemoConfig, data: Digits, device: str | None = None) -> None:
        super().__init__(config, data)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(config.seed)
        self.model = DigitsDEQ(config, data.n_features, data.n_classes).to(self.device)
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        as_tensor = lambda a: torch.as_tensor(a, device=self.device)  # noqa: E731
        self.x_train, self.y_train = as_tensor(data.x_train), as_tensor(data.y_train)
        self.x_test, self.y_test = as_tensor(data.x_test), as_tensor(data.y_test)

    def _wait(self, _: Any = None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _loss_and_backward(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
        i = torch.as_tensor(idx, device=self.device)
        x, y = self.x_train[i], self.y_train[i]
        self.optimiser.zero_grad(set_to_none=True)
        (logits, loss), t_fwd = timed(lambda: self._loss(x, y), self._wait)
        _, t_bwd = timed(loss.backward, self._wait)
        return logits, y, loss, t_fwd, t_bwd

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.nn.functional.cross_entropy(logits, y)

    def train_step(self, idx: np.ndarray) -> StepStats:
        self.model.train()
        logits, y, loss, t_fwd, t_bwd = self._loss_and_backward(idx)
        self.optimiser.step()
        info = self.model.deq.info
        return StepStats(float(loss.detach()), int((logits.argmax(1) == y).sum()), float(info.steps.float().mean()),
                         float(info.converged.float().mean()), t_fwd, t_bwd)

    @torch.no_grad()
    def evaluate(self) -> Evaluation:
        self.model.eval()
        logits = self.model(self.x_test)
        info = self.model.deq.info
        return Evaluation(float((logits.argmax(1) == self.y_test).float().mean()),
                          float(info.steps.float().mean()), float(info.converged.float().mean()))

    def gradients(self, idx: np.ndarray, gradient: Any, tol: float, max_iter: int) -> list[np.ndarray]:
        deq = self.model.deq
        saved = deq.gradient, deq.tol, deq.max_iter
        deq.gradient, deq.tol, deq.max_iter = self._estimator(gradient), tol, max_iter
        try:
            self._loss_and_backward(idx)
        finally:
            deq.gradient, deq.tol, deq.max_iter = saved
        grads = [self.model.named_tensors()[k].grad.detach().cpu().double().numpy() for k in PARAMS]
        self.optimiser.zero_grad(set_to_none=True)
        return grads

    @staticmethod
    def _estimator(gradient: Any) -> Any:
        import implicit_core as ic

        return ic.get_gradient(gradient) if isinstance(gradient, str) else gradient

    def peak_memory(self, idx: np.ndarray) -> int | None:
        with PeakMemory(self.device) as meter:
            self.train_step(idx)
        return meter.peak
