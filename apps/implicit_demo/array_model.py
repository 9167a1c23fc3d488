"""The demo on backends without autodiff (NumPy, CuPy): every derivative is written out.

The implicit layer uses :func:`implicit_core.cells.tanh_cell` and its hand-written VJP; the
head and the loss are differentiated by hand below. One code path for NumPy and CuPy: the
arrays' own array-API namespace does the arithmetic.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np

import implicit_core as ic
from implicit_core.cells import tanh_cell, tanh_cell_vjp

from .adam import Adam
from .data import Digits
from .model import PARAMS, DemoConfig, Evaluation, StepStats, Trainer, initial_parameters, timed


def softmax_cross_entropy(xp: Any, logits: Any, onehot: Any) -> tuple[Any, Any]:
    """Mean cross-entropy and its gradient w.r.t. the logits, ``(softmax - onehot) / batch``."""
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    log_p = shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
    batch = logits.shape[0]
    return -xp.sum(onehot * log_p) / batch, (xp.exp(log_p) - onehot) / batch


class ArrayTrainer(Trainer):
    def __init__(self, config: DemoConfig, data: Digits) -> None:
        super().__init__(config, data)
        self.backend = ic.get_backend(config.backend)
        xp = self.xp = self.backend.namespace()
        self.x_train, self.x_test = xp.asarray(data.x_train), xp.asarray(data.x_test)
        eye = np.eye(data.n_classes, dtype=np.float32)
        self.onehot_train, self.y_test = xp.asarray(eye[data.y_train]), xp.asarray(data.y_test)
        self.params = {k: xp.asarray(v) for k, v in initial_parameters(config, data.n_features, data.n_classes).items()}
        self.adam = Adam(config.lr)
        self.opt_state = self.adam.init(self.params)
        self.solver, self.gradient = ic.resolve_plugins(config.solver, config.gradient, **config.options)

    def _wait(self, out: Any) -> None:
        if self.backend.name == "cupy":  # kernels run asynchronously: wait before the clock stops
            import cupy

            cupy.cuda.get_current_stream().synchronize()

    def _forward(self, x: Any, gradient: Any = None, tol: float | None = None, max_iter: int | None = None):
        p = self.params
        inj = x @ p["U"].T + p["b"]
        z0 = self.xp.zeros((x.shape[0], self.config.hidden), dtype=x.dtype)
        z, info = ic.fixed_point(
            tanh_cell, z0, (p["W"], inj), vjp=tanh_cell_vjp, solver=self.solver,
            gradient=self.gradient if gradient is None else gradient,
            tol=self.config.tol if tol is None else tol,
            max_iter=self.config.max_iter if max_iter is None else max_iter, on_fail="ignore",
        )
        return z, info, z @ p["V"].T + p["c"]

    def _backward(self, x: Any, z: Any, info: ic.SolveInfo, dlogits: Any) -> dict[str, Any]:
        xp, p = self.xp, self.params
        dW, dinj = info.vjp(dlogits @ p["V"])  # dL/dz* = dlogits V, through the implicit layer
        return {"U": dinj.T @ x, "b": xp.sum(dinj, axis=0), "W": dW,
                "V": dlogits.T @ z, "c": xp.sum(dlogits, axis=0)}

    def _loss_and_grads(self, idx: np.ndarray, **solve: Any):
        i = self.xp.asarray(idx)
        x, onehot = (self.xp.take(a, i, axis=0) for a in (self.x_train, self.onehot_train))

        def forward():
            z, info, logits = self._forward(x, **solve)
            loss, dlogits = softmax_cross_entropy(self.xp, logits, onehot)
            return z, info, logits, loss, dlogits

        (z, info, logits, loss, dlogits), t_fwd = timed(forward, self._wait)
        grads, t_bwd = timed(lambda: self._backward(x, z, info, dlogits), self._wait)
        correct = self.xp.count_nonzero(self.xp.argmax(logits, axis=1) == self.xp.argmax(onehot, axis=1))
        return grads, info, float(loss), int(correct), t_fwd, t_bwd

    def train_step(self, idx: np.ndarray) -> StepStats:
        grads, info, loss, correct, t_fwd, t_bwd = self._loss_and_grads(idx)
        self.params, self.opt_state = self.adam.update(self.params, grads, self.opt_state)
        return StepStats(loss, correct, self._mean(info.steps), self._mean(info.converged), t_fwd, t_bwd)

    def evaluate(self) -> Evaluation:
        _, info, logits = self._forward(self.x_test)
        return Evaluation(self._mean(self.xp.argmax(logits, axis=1) == self.y_test), self._mean(info.steps),
                          self._mean(info.converged))

    def _mean(self, x: Any) -> float:
        """Mean of an integer or boolean array, as a Python float."""
        return float(self.xp.mean(self.xp.astype(x, self.xp.float32)))

    def gradients(self, idx: np.ndarray, gradient: Any, tol: float, max_iter: int) -> list[np.ndarray]:
        grads = self._loss_and_grads(idx, gradient=gradient, tol=tol, max_iter=max_iter)[0]
        return [np.asarray(self.backend.to_python(grads[k]), dtype=np.float64) for k in PARAMS]

    def peak_memory(self, idx: np.ndarray) -> int | None:
        if self.backend.name == "numpy":
            # NumPy reports its buffers to tracemalloc, so the peak covers every array of the step.
            tracemalloc.start()
            try:
                self.train_step(idx)
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        if self.backend.name == "cupy":
            import cupy

            pool = cupy.get_default_memory_pool()
            pool.free_all_blocks()
            before = pool.total_bytes()  # parameters and data: held before the step
            self.train_step(idx)
            return pool.total_bytes() - before  # the pool keeps every block it needed: its high-water mark
        return None
