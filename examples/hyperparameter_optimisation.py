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

# The problem, its hand-written VJP and the outer loop are shared with `implicit-core compare
# --workload hyperparameter` (which tunes one penalty per feature instead of one in all).
from implicit_demo.workloads.hyperparameter import optimise

METHODS = ("ift", "shine", "jfb")


def main(steps: int = 40, out: str | None = None, verbose: bool = True) -> dict[str, dict]:
    results = {m: optimise(m, steps) for m in METHODS}  # one penalty λ: log λ0 = 0
    if verbose:
        print(f"{'method':8s} {'val loss first → last':>22s} {'λ last':>9s} {'test acc':>8s} {'seconds':>8s} {'hypergrad. ms':>13s} {'inner steps':>11s}")
        for m, h in results.items():
            print(f"{m:8s} {h['val_loss'][0]:10.4f} → {h['val_loss'][-1]:8.4f} {np.exp(h['log_lambda'][-1]):9.2e} "
                  f"{h['test_accuracy']:8.3f} {h['time'][-1]:8.3f} {1e3 * np.median(h['hypergradient_s']):13.3f} "
                  f"{np.mean(h['inner_steps']):11.1f}")
    if out is not None:
        path = plot(results, pathlib.Path(out))
        if verbose:
            print(f"written {path}")
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
