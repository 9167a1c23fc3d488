"""The reference work every benchmark runs: ``f(z, x) = tanh(W z + U x + b)``.

n = 256, batch 512, inputs = scikit-learn's digits features (scaled to [0, 1]),
||W||_2 = 0.9, float32, tol 1e-4, max 40 iterations. Arrays are generated here once, in
float64 NumPy, so that every framework solves the very same problem.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np

from implicit_core.testing import reference_work

N, BATCH, TOL, MAX_ITER = 256, 512, 1e-4, 40


def reference_arrays(n: int = N, batch: int = BATCH, seed: int = 0) -> dict[str, np.ndarray]:
    """``X`` (batch, 64), ``W`` (n, n), ``U`` (n, 64), ``b`` (n,), and a loss weight ``w`` (batch, n)."""
    return reference_work(n=n, batch=batch, seed=seed)


def report(title: str, table: str, markdown: str | None) -> None:
    """Print a result table under its title, and write it to ``markdown`` when given."""
    text = f"{title}\n\n{table}\n"
    print("\n" + text)
    if markdown:
        with open(markdown, "w") as fh:
            fh.write(text)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def require(*modules: str, install: str) -> None:
    """Exit with a one-line message naming what to install when a peer library is missing.

    Called before anything is measured, so that a missing peer never ends a run halfway.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        script = sys.argv[0].rsplit("/", 1)[-1] or "this benchmark"
        sys.exit(f"{script} needs {', '.join(missing)} (not installed here): {install}")
