"""The reference work of the project on the NumPy backend.

``f(z, x) = tanh(W z + U x + b)``, n = 256, batch 512, digits features, ||W||_2 = 0.9,
float32, tol 1e-4, max 40 iterations. Prints, per solver, the steps to tolerance and the
forward time as a multiple of the cost of its own f-evaluations (the floor), and per gradient
estimator the backward time and the cosine of dL/dW to a float64 exact-IFT reference.

    python benchmarks/reference_numpy.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import implicit_core as ic
from implicit_core.cells import tanh_cell, tanh_cell_vjp
from _reference import reference_arrays


def reference_problem(dtype=np.float32):
    ref = reference_arrays()
    inj = ref["X"] @ ref["U"].T + ref["b"]
    return ref["W"].astype(dtype), inj.astype(dtype)


f, f_vjp = tanh_cell, tanh_cell_vjp  # tanh(z Wᵀ + inj) with its hand-written VJP


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    opts = parser.parse_args(argv)
    W, inj = reference_problem()
    z0 = np.zeros_like(inj)
    feval_ms, _ = best_of(lambda: f(z0, (W, inj)), 20)
    print(f"one f-evaluation: {feval_ms:.2f} ms (numpy, float32, batch 512, n 256)\n")
    print(f"{'solver':12s} {'steps max':>9s} {'steps mean':>10s} {'residual max':>12s} {'forward ms':>10s} {'x f-evals':>9s}")
    for name in ("fixed_point", "anderson", "broyden"):
        ms, (z, info) = best_of(lambda: ic.fixed_point(f, z0, (W, inj), solver=name, tol=1e-4, max_iter=40, on_fail="ignore"), opts.repeat)
        evals = int(info.steps.max()) + 1
        print(f"{name:12s} {int(info.steps.max()):9d} {info.steps.mean():10.1f} {info.residual.max():12.2e} {ms:10.1f} {ms / (evals * feval_ms):9.2f}")

    W64, inj64 = W.astype(np.float64), inj.astype(np.float64)
    w = np.random.default_rng(1).standard_normal(inj.shape)
    _, ref_info = ic.fixed_point(f, np.zeros_like(inj64), (W64, inj64), solver="broyden", tol=1e-10, max_iter=200,
                                 gradient=ic.get_gradient("ift", tol=1e-10, max_iter=200), vjp=f_vjp)
    gW_ref = ref_info.vjp(w)[0]
    print(f"\n{'gradient':14s} {'backward ms':>11s} {'x ift':>6s} {'cosine':>7s}")
    ift_ms = None
    for name in ("ift", "jfb", "phantom", "shine", "broyden_reuse"):
        z, info = ic.fixed_point(f, z0, (W, inj), solver="broyden", gradient=name, tol=1e-4, max_iter=40, vjp=f_vjp, on_fail="ignore")
        ms, (gW, _) = best_of(lambda: info.vjp(w.astype(np.float32)), opts.repeat)
        ift_ms = ms if name == "ift" else ift_ms
        cos = float(np.sum(gW * gW_ref) / (np.linalg.norm(gW) * np.linalg.norm(gW_ref)))
        print(f"{name:14s} {ms:11.2f} {ms / ift_ms:6.3f} {cos:7.4f}")


if __name__ == "__main__":
    main()
