"""Bi-level hyper-parameter optimisation: tune the L2 penalty of a logistic regression.

The inner problem is the regularised training loss's optimality condition, a root problem

    g(θ, log λ) = ∇_θ [ mean_i log(1 + exp(-ỹ_i x_iᵀθ)) ] + λ θ = 0,     λ = exp(log λ),

solved by the library's quasi-Newton solver (Broyden). The outer problem lowers the
validation loss L_val(θ*(λ)) by gradient descent on log λ, with the hypergradient

    dL_val/d log λ = -∇L_valᵀ (∂g/∂θ)⁻¹ ∂g/∂log λ

obtained three ways (the SHINE paper's bi-level setting, Ramzi et al., 2022):
``ift`` solves the adjoint system, ``shine`` reuses Broyden's inverse estimate from the inner
solve, ``jfb`` replaces (∂g/∂θ)⁻¹ by the identity. Plain NumPy: the VJP of g is written out
(a Hessian-vector product).

    python examples/hyperparameter_optimisation.py [--steps 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np

import implicit_core as ic

METHODS = ("ift", "shine", "jfb")


def load_problem(seed: int = 0):
    """breast_cancer (569 × 30), standardised, with a bias column; split 50/25/25."""
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
    """``g(θ, log λ)`` and its VJP ``v ↦ (vᵀ∂g/∂θ, vᵀ∂g/∂log λ)``."""

    def g(theta, log_lam):
        return logistic_grad(theta, X, y) + np.exp(log_lam) * theta

    def g_vjp(theta, log_lam, v):
        p = sigmoid(X @ theta[0])
        hv = ((p * (1 - p) * (X @ v[0])) @ X / len(y))[None]  # ∂g/∂θ is the (symmetric) Hessian
        lam = np.exp(log_lam)
        return hv + lam * v, lam * np.sum(v * theta)

    return g, g_vjp


def optimise(method: str, steps: int = 40, lr: float = 1.0, log_lam0: float = 0.0, seed: int = 0) -> dict:
    """Gradient descent on log λ with hypergradients from ``method``; warm-started inner solves."""
    (X_tr, y_tr), (X_val, y_val), (X_te, y_te) = load_problem(seed)
    g, g_vjp = make_inner(X_tr, y_tr)
    log_lam, theta = log_lam0, np.zeros((1, X_tr.shape[1]))
    history = {"val_loss": [], "log_lambda": [], "time": [], "inner_steps": [], "hypergradient_s": []}
    start = time.perf_counter()
    for _ in range(steps):
        theta, info = ic.root(g, theta, log_lam, solver="broyden", gradient=method, tol=1e-8, max_iter=100,
                              vjp=g_vjp, on_fail="raise")
        tick = time.perf_counter()
        hypergradient = float(info.vjp(logistic_grad(theta, X_val, y_val)))
        history["hypergradient_s"].append(time.perf_counter() - tick)
        history["val_loss"].append(logistic_loss(theta, X_val, y_val))
        history["log_lambda"].append(log_lam)
        history["inner_steps"].append(int(info.steps[0]))
        history["time"].append(time.perf_counter() - start)
        log_lam -= lr * hypergradient
    history["test_accuracy"] = float(np.mean((X_te @ theta[0] > 0) == y_te))
    return history


def main(steps: int = 40, out: str | None = None, verbose: bool = True) -> dict[str, dict]:
    results = {m: optimise(m, steps) for m in METHODS}
    if verbose:
        print(f"{'method':8s} {'val loss first → last':>22s} {'λ last':>9s} {'test acc':>8s} {'seconds':>8s} {'hypergrad. ms':>13s} {'inner steps':>11s}")
        for m, h in results.items():
            print(f"{m:8s} {h['val_loss'][0]:10.4f} → {h['val_loss'][-1]:8.4f} {np.exp(h['log_lambda'][-1]):9.2e} "
                  f"{h['test_accuracy']:8.3f} {h['time'][-1]:8.3f} {1e3 * np.median(h['hypergradient_s']):13.3f} "
                  f"{np.mean(h['inner_steps']):11.1f}")
    if out is not None:
        plot(results, pathlib.Path(out))
    return results


def plot(results: dict[str, dict], out: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for m, h in results.items():
        axes[0].plot(h["val_loss"], label=m)
        axes[1].plot(h["time"], h["val_loss"], label=m)
        axes[2].plot(np.exp(h["log_lambda"]), label=m)
    axes[0].set(title="validation loss", xlabel="outer step")
    axes[1].set(title="validation loss vs wall-clock", xlabel="seconds")
    axes[2].set(title="λ", xlabel="outer step", yscale="log")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    path = out / "hyperparameter_optimisation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="implicit-core-examples")
    opts = parser.parse_args()
    main(opts.steps, opts.out)
