"""PNG figures for ``demo`` and ``compare`` (matplotlib, headless)."""

from __future__ import annotations

import pathlib
from typing import Any, Sequence


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def training_curves(result: Any, path: pathlib.Path) -> pathlib.Path | None:
    """Loss, accuracy and solver steps per epoch; ``None`` when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    h = result.history
    epochs = [r.epoch for r in h]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r.loss for r in h], marker="o")
    axes[0].set(title="training loss", xlabel="epoch", yscale="log")
    axes[1].plot(epochs, [r.train_accuracy for r in h], marker="o", label="train")
    axes[1].plot(epochs, [r.test_accuracy for r in h], marker="o", label="test")
    low = min(min(r.train_accuracy, r.test_accuracy) for r in h)
    axes[1].set(title="accuracy", xlabel="epoch", ylim=(max(0.0, low - 0.02), 1.005))
    axes[1].legend()
    axes[2].plot(epochs, [r.steps_mean for r in h], marker="o")
    axes[2].set(title="mean forward solver steps", xlabel="epoch")
    c = result.config
    fig.suptitle(f"DEQ on digits — {c.backend}, solver {c.solver}, gradient {c.gradient}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def comparison_figure(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> pathlib.Path | None:
    """Backward time vs test accuracy, and gradient cosine to exact IFT, per estimator × backend."""
    plt = _pyplot()
    if plt is None:
        return None
    gradients = list(dict.fromkeys(r["gradient"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    markers = dict(zip(backends, "osD^v<>"))
    colours = {g: f"C{i}" for i, g in enumerate(gradients)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), layout="constrained")  # room for the outside legend
    for r in rows:
        axes[0].scatter(r["backward_s"] * 1e3, r["test_accuracy"], marker=markers[r["backend"]],
                        color=colours[r["gradient"]], s=60)
    for g in gradients:
        axes[0].scatter([], [], color=colours[g], label=g)
    for b in backends:
        axes[0].scatter([], [], color="grey", marker=markers[b], label=b)
    axes[0].set(title="backward time per epoch vs test accuracy", xlabel="backward ms per epoch",
                ylabel="test accuracy", xscale="log")
    # Beside the axes, not over the points.
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    width = 0.8 / max(len(backends), 1)
    for j, b in enumerate(backends):
        cos = [next((r["cosine_to_ift"] for r in rows if r["backend"] == b and r["gradient"] == g), float("nan"))
               for g in gradients]
        axes[1].bar([i + j * width for i in range(len(gradients))], cos, width=width, label=b)
    axes[1].set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(gradients))], gradients)
    axes[1].tick_params(axis="x", labelrotation=20, labelsize=8)
    # Zoomed: the estimators differ between 0.8 and 1.0, which an axis from 0 would flatten.
    lowest = min(r["cosine_to_ift"] for r in rows)
    axes[1].set(title="cosine of dL/dθ to exact IFT (trained model)", ylim=(max(0.0, lowest - 0.05), 1.005))
    axes[1].legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
