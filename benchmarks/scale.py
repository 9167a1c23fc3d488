"""Large batch on the CPU: batch 4096, n = 1024, float32 — time and peak memory of a training step.

``f(z) = tanh(z Wᵀ + c)`` with ``||W||₂ = 0.9``. Each solve runs exactly ``max_iter`` steps
(``tol`` below reach) so that memory can be compared at 10 and at 40 iterations: the forward
keeps no graph and the solver buffers have a fixed size (Anderson ``m``, Broyden ``m``), so
the peak must not grow with the iteration count. Peak memory: NumPy through ``tracemalloc``
(NumPy reports its buffers to it), PyTorch through ``implicit_torch.memory.PeakMemory``.

    python benchmarks/scale.py [--batch 4096] [--n 1024] [--backends numpy,torch]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

import implicit_core as ic
from implicit_core.cells import tanh_cell, tanh_cell_vjp

MIB = 2**20


def problem(batch: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n)).astype(np.float32)
    W *= 0.9 / np.linalg.norm(W, 2)
    c = rng.standard_normal((batch, n)).astype(np.float32)
    w = rng.standard_normal((batch, n)).astype(np.float32) / batch
    return W, c, w


def step_numpy(W, c, w, solver, gradient, iters):
    z, info = ic.fixed_point(tanh_cell, np.zeros_like(c), (W, c), solver=solver, gradient=gradient, tol=1e-30,
                             max_iter=iters, vjp=tanh_cell_vjp, on_fail="ignore")
    dW, dc = info.vjp(w)
    return dW


def measure_numpy(W, c, w, solver, gradient, iters):
    start = time.perf_counter()
    step_numpy(W, c, w, solver, gradient, iters)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    step_numpy(W, c, w, solver, gradient, iters)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak


def measure_torch(W, c, w, solver, gradient, iters):
    import torch

    from implicit_torch.memory import PeakMemory

    Wt = torch.tensor(W, requires_grad=True)
    ct, wt = torch.tensor(c), torch.tensor(w)

    def step():
        z, _ = ic.fixed_point(lambda z, a: torch.tanh(z @ a[0].T + a[1]), torch.zeros_like(ct), (Wt, ct),
                              solver=solver, gradient=gradient, tol=1e-30, max_iter=iters, on_fail="ignore")
        (z * wt).sum().backward()
        Wt.grad = None

    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    with PeakMemory("cpu") as meter:
        step()
    return seconds, meter.peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--backends", default="numpy,torch")
    opts = parser.parse_args(argv)
    W, c, w = problem(opts.batch, opts.n)
    state_mib = opts.batch * opts.n * 4 / MIB
    print(f"batch {opts.batch}, n {opts.n}, float32: one state is {state_mib:.0f} MiB\n")
    print(f"{'backend':8s} {'solver':9s} {'gradient':8s} {'iters':>5s} {'step s':>7s} {'peak MiB':>9s} {'x state':>8s} {'peak 40 / 10':>12s}")
    runs = [("anderson", ic.get_solver("anderson", m=5), "ift"), ("anderson", ic.get_solver("anderson", m=5), "jfb"),
            ("broyden", ic.get_solver("broyden", m=10), "shine")]
    measure = {"numpy": measure_numpy, "torch": measure_torch}
    for backend in opts.backends.split(","):
        for label, solver, gradient in runs:
            grad = ic.get_gradient("ift", max_iter=10, tol=1e-30) if gradient == "ift" else gradient
            peaks = {}
            for iters in (10, 40):
                seconds, peak = measure[backend](W, c, w, solver, grad, iters)
                peaks[iters] = peak
                ratio = f"{peaks[40] / peaks[10]:.3f}" if iters == 40 else ""
                print(f"{backend:8s} {label:9s} {gradient:8s} {iters:5d} {seconds:7.2f} {peak / MIB:9.0f} "
                      f"{peak / MIB / state_mib:8.1f} {ratio:>12s}", flush=True)


if __name__ == "__main__":
    main()
