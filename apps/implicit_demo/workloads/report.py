"""Tables and figures of a workload's comparison rows (CSV, Markdown, PNG)."""

from __future__ import annotations

import csv
import pathlib
from typing import Any, Sequence


def _ratio(row: dict[str, Any], rows: Sequence[dict[str, Any]], key: str) -> str:
    ift = next((r for r in rows if r["gradient"] == "ift"), None)
    if ift is None or not row.get(key) or not ift.get(key):
        return "–"
    return f"{row[key] / ift[key]:.2f}"


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per estimator; backward time and memory also as ratios to ``ift``'s row."""
    metric = rows[0]["metric"]
    extra = [k for k in rows[0] if k.startswith("x_")]  # workload-specific columns
    probe = "probe_backward_s" in rows[0]
    head = ["gradient", metric, "step/epoch s", "backward s", "× ift", *(["probe backward s", "× ift"] if probe else []),
            "peak mem. KiB", "× ift", "cosine to IFT", "solver steps", *(k[2:].replace("_", " ") for k in extra)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["gradient"], f"{r['value']:.4f}", f"{r['epoch_s']:.3g}", f"{r['backward_s']:.3g}",
                 _ratio(r, rows, "backward_s"),
                 *([f"{r['probe_backward_s']:.3g}", _ratio(r, rows, "probe_backward_s")] if probe else []),
                 f"{r['peak_memory_kib']:.0f}", _ratio(r, rows, "peak_memory_kib"),
                 f"{r['cosine_to_ift']:.4f}", f"{r['steps_mean']:.1f}", *(str(r[k]) for k in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(rows: Sequence[dict[str, Any]], out: pathlib.Path, title: str) -> list[pathlib.Path]:
    """``compare_<workload>.csv``, ``.md`` and ``.png`` (the figure only with matplotlib)."""
    name = rows[0]["workload"]
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"compare_{name}.csv", out / f"compare_{name}.md"]
    with paths[0].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths[1].write_text(f"{title}\n\n{to_markdown(rows)}\n")
    png = figure(rows, out / f"compare_{name}.png", title)
    return paths + ([png] if png else [])


def figure(rows: Sequence[dict[str, Any]], path: pathlib.Path, title: str) -> pathlib.Path | None:
    """Score, backward time relative to IFT, and cosine to IFT per estimator (zoomed axes)."""
    from ..plots import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    names = [r["gradient"] for r in rows]
    colours = [f"C{i}" for i in range(len(rows))]
    ift = next((r for r in rows if r["gradient"] == "ift"), rows[0])
    panels = [
        (rows[0]["metric"], [r["value"] for r in rows]),
        ("backward time / IFT's", [r["backward_s"] / ift["backward_s"] for r in rows]),
        ("cosine of dL/dθ to exact IFT", [r["cosine_to_ift"] for r in rows]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (label, values) in zip(axes, panels):
        ax.bar(names, values, color=colours)
        low, high = min(values), max(values)
        pad = 0.15 * (high - low) or 0.05 * abs(high) or 0.05
        ax.set(title=label, ylim=(max(0.0, low - pad) if label != panels[1][0] else 0.0, high + pad))
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
