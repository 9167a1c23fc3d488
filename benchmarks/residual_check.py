"""What the final re-measurement of the residual costs: one evaluation of ``f`` per solve.

Every solve with more than one sample evaluates ``f`` once more on the returned batch, so that
the residual it reports is the true one (samples that depend on each other are caught). This
prints, per backend and solver, on the reference work: the forward time, the time of one
``f`` evaluation, and their ratio, which is the check's share of the forward (plus two norms).

    python benchmarks/residual_check.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import implicit_core as ic
from _reference import MAX_ITER, TOL, reference_arrays, report


def timed(fn, repeat):
    fn()  # warm-up (JAX: compilation)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def setups(ref):
    yield "numpy", np, lambda a: a.astype(np.float32), lambda x: x
    try:
        import torch

        torch.set_num_threads(1)
        yield "torch", torch, lambda a: torch.as_tensor(a, dtype=torch.float32), lambda x: x
    except ImportError:
        print("torch not installed: skipped (pip install 'implicit-core[torch]')")
    try:
        import jax
        import jax.numpy as jnp

        yield "jax", jnp, lambda a: jnp.asarray(a, dtype=jnp.float32), lambda x: x.block_until_ready()
    except ImportError:
        print("jax not installed: skipped (pip install 'implicit-core[jax]')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    ref = reference_arrays()
    rows = ["| backend | solver | forward ms | one f ms | steps max | check / forward |", "|---|---|---|---|---|---|"]
    for name, xp, to, ready in setups(ref):
        W, U, b, X = (to(ref[k]) for k in ("W", "U", "b", "X"))
        c = X @ U.T + b

        def f(z, c):
            return xp.tanh(z @ W.T + c)

        z0 = to(np.zeros((X.shape[0], W.shape[0])))
        t_f = timed(lambda: ready(f(z0, c)), args.repeat * 5)
        for solver in ("fixed_point", "anderson", "broyden"):
            def solve(z0, c, solver=solver):
                return ic.fixed_point(f, z0, c, solver=solver, gradient="jfb", tol=TOL, max_iter=MAX_ITER,
                                      on_fail="ignore", vjp=(lambda z, a, v: (v, v)) if name == "numpy" else None)

            if name == "jax":  # measured as it runs in practice: compiled
                import jax

                solve = jax.jit(solve)

            def forward():
                z, info = solve(z0, c)
                ready(z)
                return info

            t = timed(forward, args.repeat)
            steps = int(np.max(np.asarray(forward().to_python(forward().steps))))
            rows.append(f"| {name} | {solver} | {1e3 * t:.1f} | {1e3 * t_f:.2f} | {steps} | **{t_f / t:.3f}** |")
    report(f"Residual re-measurement on the reference work (n 256, batch 512, float32, tol {TOL})",
           "\n".join(rows), args.markdown)


if __name__ == "__main__":
    main()
