"""Bi-level hyper-parameter optimisation, as SHINE's paper frames it (plain NumPy).

Inner problem: the optimality condition of an L2-regularised logistic regression, a root
problem solved by Broyden,

    g(θ, log λ) = ∇_θ mean_i [log(1 + exp(x_iᵀθ)) - y_i x_iᵀθ] + λ ⊙ θ = 0,     λ = exp(log λ).

Outer problem: lower the validation loss ``L_val(θ*(λ))`` by gradient descent on ``log λ``
with the hypergradient ``dL_val/dlog λ = -(λ ⊙ θ*) ⊙ u``, ``u = (∂g/∂θ)⁻ᵀ ∇L_val``, which
each gradient estimator approximates in its own way. ``λ`` is either one penalty (the
example) or one per feature (the comparison: 31 hyper-parameters, so the hypergradient is a
vector and its cosine to the exact one is meaningful). Data: scikit-learn's breast_cancer.
"""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import numpy as np

import implicit_core as ic

from ..compare import cosine


def load_problem(seed: int = 0):
    """breast_cancer (569 × 30), standardised, with a bias column; split 50/25/25 (train/val/test)."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    X, y = X[order], y[order]
    n_train, n_val = len(y) // 2, len(y) // 4
    mean, std = X[:n_train].mean(0), X[:n_train].std(0)
    X = np.hstack([(X - mean) / std, np.ones((len(y), 1))])
    parts = np.split(np.arange(len(y)), [n_train, n_train + n_val])
    return [(X[i], y[i].astype(np.float64)) for i in parts]


def sigmoid(t):
    return 0.5 * (1 + np.tanh(0.5 * t))  # no overflow for large |t|


def logistic_loss(theta, X, y):
    """Mean binary cross-entropy of the logits ``X θ``; θ is ``(1, d)``."""
    t = X @ theta[0]
    return float(np.mean(np.logaddexp(0, t) - y * t))


def logistic_grad(theta, X, y):
    return ((sigmoid(X @ theta[0]) - y) @ X / len(y))[None]


def make_inner(X, y):
    """``g(θ, log λ)`` and its VJP ``v ↦ (vᵀ∂g/∂θ, vᵀ∂g/∂log λ)`` (λ a scalar or one per feature)."""

    def g(theta, log_lam):
        return logistic_grad(theta, X, y) + np.exp(log_lam) * theta

    def g_vjp(theta, log_lam, v):
        p = sigmoid(X @ theta[0])
        hv = ((p * (1 - p) * (X @ v[0])) @ X / len(y))[None]  # ∂g/∂θ is the (symmetric) Hessian
        lam = np.exp(log_lam)
        d_log_lam = lam * (v * theta)[0]
        return hv + lam * v, (np.sum(d_log_lam) if np.ndim(log_lam) == 0 else d_log_lam)

    return g, g_vjp


def optimise(method: Any, steps: int = 40, lr: float = 1.0, log_lam0: Any = 0.0, seed: int = 0,
             exact: Any = None) -> dict:
    """Gradient descent on log λ with hypergradients from ``method``; warm-started inner solves.

    With ``exact`` (an estimator), every step also computes the exact hypergradient at the
    same point (untimed) and records the cosine of ``method``'s to it.
    """
    (X_tr, y_tr), (X_val, y_val), (X_te, y_te) = load_problem(seed)
    g, g_vjp = make_inner(X_tr, y_tr)
    log_lam, theta = log_lam0, np.zeros((1, X_tr.shape[1]))
    history: dict[str, list] = {"val_loss": [], "log_lambda": [], "time": [], "inner_steps": [], "inner_s": [],
                                "hypergradient_s": [], "cosine": []}
    start = time.perf_counter()
    for _ in range(steps):
        tick = time.perf_counter()
        theta, info = ic.root(g, theta, log_lam, solver="broyden", gradient=method, tol=1e-8, max_iter=100,
                              vjp=g_vjp, on_fail="raise")
        tock = time.perf_counter()
        dval = logistic_grad(theta, X_val, y_val)
        hypergradient = info.vjp(dval)
        history["hypergradient_s"].append(time.perf_counter() - tock)
        history["inner_s"].append(tock - tick)
        if exact is not None:
            paused = time.perf_counter()
            _, reference = ic.root(g, theta, log_lam, solver="broyden", gradient=exact, tol=1e-10, max_iter=200,
                                   vjp=g_vjp, on_fail="raise")
            history["cosine"].append(cosine([np.atleast_1d(hypergradient)], [np.atleast_1d(reference.vjp(dval))]))
            start += time.perf_counter() - paused  # the reference is not part of the method's time
        history["val_loss"].append(logistic_loss(theta, X_val, y_val))
        history["log_lambda"].append(log_lam)
        history["inner_steps"].append(int(info.steps[0]))
        history["time"].append(time.perf_counter() - start)
        log_lam = log_lam - lr * hypergradient
    history["test_accuracy"] = float(np.mean((X_te @ theta[0] > 0) == y_te))
    return history


def run(gradients, epochs: int | None = None, seed: int = 0, show_progress: bool = True, steps: int = 40):
    """One row per estimator: 31 per-feature penalties tuned for ``epochs`` (default 40) outer steps."""
    steps = epochs or steps
    d = load_problem(seed)[0][0].shape[1]
    exact = ic.get_gradient("ift", tol=1e-12, max_iter=500)
    rows = []
    for method in gradients:
        tracemalloc.start()
        try:
            h = optimise(method, steps, log_lam0=np.zeros(d), seed=seed, exact=exact)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        rows.append({
            "workload": "hyperparameter", "gradient": method, "metric": "final validation loss",
            "value": round(h["val_loss"][-1], 4), "epoch_s": round(h["time"][-1] / steps, 5),
            "forward_s": round(float(np.sum(h["inner_s"])) / steps, 5),
            "backward_s": round(float(np.sum(h["hypergradient_s"])) / steps, 5),
            "steps_mean": round(float(np.mean(h["inner_steps"])), 1),
            "peak_memory_kib": round(peak / 1024, 1), "cosine_to_ift": round(float(np.mean(h["cosine"])), 4),
            "x_test_accuracy": round(h["test_accuracy"], 3),
            "x_validation_loss_first": round(h["val_loss"][0], 4),
        })
    return rows
