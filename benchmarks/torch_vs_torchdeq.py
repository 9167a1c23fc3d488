"""implicit-core's torch backend against TorchDEQ, side by side in one run.

The reference work (``benchmarks/_reference.py``): ``f(z, x) = tanh(W z + U x + b)``, n = 256,
batch 512, digits features, ||W||_2 = 0.9, float32, forward tol 1e-4 (absolute, per sample),
max 40 iterations; IFT's backward solve uses the forward's solver, tol and budget. The loss is
``sum(w * z*) / batch`` for a fixed random ``w``. Per solver and gradient mode it prints:
forward ms and backward ms of a training step (median of ``--repeat``), solver steps,
final residual, peak memory of the step, the cosine of dL/dW to a float64 exact-IFT
reference, and each figure as a ratio ours / TorchDEQ. SHINE and Broyden reuse have no
TorchDEQ counterpart: their backward is compared to TorchDEQ's IFT backward.

    pip install torchdeq            # benchmark dependency only
    python benchmarks/torch_vs_torchdeq.py [--device cuda] [--repeat 10] [--markdown out.md]

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU every tensor storage the
step creates, from allocation to release (``implicit_torch.memory.PeakMemory``); parameters
and inputs, which both share, are not counted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _reference import require

require("torch", "torchdeq", install="pip install torch==2.13.0 torchdeq")

import torch  # noqa: E402

from _reference import MAX_ITER, TOL, cosine, reference_arrays, report  # noqa: E402
from implicit_core import get_gradient  # noqa: E402
from implicit_torch import DEQ  # noqa: E402
from implicit_torch.memory import PeakMemory  # noqa: E402

TORCHDEQ_SOLVER = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}
#: (solver, gradient mode); the mode names are ours, translated for TorchDEQ below.
CASES = [(s, g) for s in ("fixed_point", "anderson", "broyden") for g in ("ift", "jfb", "phantom")]
CASES += [("broyden", "shine"), ("broyden", "broyden_reuse")]
PHANTOM_K, PHANTOM_LAM = 5, 0.8


class Cell(torch.nn.Module):
    def __init__(self, ref, dtype, device):
        super().__init__()
        as_param = lambda a: torch.nn.Parameter(torch.as_tensor(a, dtype=dtype, device=device))  # noqa: E731
        self.W, self.U, self.b = as_param(ref["W"]), as_param(ref["U"]), as_param(ref["b"])

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def exact_ift_grad_W(ref, device):
    """dL/dW in float64 by a dense per-sample solve of ``(I - J)^T u = dL/dz*``."""
    cell = Cell(ref, torch.float64, device)
    x = torch.as_tensor(ref["X"], dtype=torch.float64, device=device)
    w = torch.as_tensor(ref["w"], dtype=torch.float64, device=device) / x.shape[0]
    z = torch.zeros(x.shape[0], cell.W.shape[0], dtype=torch.float64, device=device)
    with torch.no_grad():
        for _ in range(400):  # ||W|| = 0.9: 400 plain iterations reach float64 precision
            z = cell(z, x)
        s = 1 - cell(z, x) ** 2  # J = diag(s) W per sample
        eye = torch.eye(z.shape[1], dtype=torch.float64, device=device)
        J = s[:, :, None] * cell.W[None]
        u = torch.linalg.solve((eye - J).transpose(1, 2), w[:, :, None])[..., 0]
    out = cell(z, x)
    (gW,) = torch.autograd.grad(out, [cell.W], u)
    return gW.cpu().numpy()


# --------------------------------------------------------------------------- the two layers
def ours(cell, solver, mode):
    options = {}
    if mode == "ift":
        options["gradient"] = get_gradient("ift", solver=solver, tol=TOL, max_iter=MAX_ITER, stop_mode="abs")  # as TorchDEQ's b_stop_mode
    elif mode == "phantom":
        options["gradient"] = get_gradient("phantom", k=PHANTOM_K, damping=PHANTOM_LAM)
    else:
        options["gradient"] = mode
    deq = DEQ(cell, solver=solver, tol=TOL, max_iter=MAX_ITER, on_fail="ignore", state_shape=(cell.W.shape[0],),
              **options)

    def run(x, z0):
        z = deq(x, z0)
        info = deq.info
        return z, lambda: (info.steps, info.residual)

    return run


def torchdeq(cell, solver, mode):
    from torchdeq import get_deq

    options = dict(f_solver=TORCHDEQ_SOLVER[solver], f_max_iter=MAX_ITER, f_tol=TOL, f_stop_mode="abs")
    if mode in ("ift", "shine", "broyden_reuse"):  # no SHINE / reuse in TorchDEQ: compare with its IFT
        options.update(ift=True, b_solver=TORCHDEQ_SOLVER[solver], b_tol=TOL, b_max_iter=MAX_ITER, b_stop_mode="abs")
    elif mode == "jfb":
        options.update(grad=1)
    elif mode == "phantom":
        options.update(grad=PHANTOM_K, tau=PHANTOM_LAM)
    deq = get_deq(**options)

    def run(x, z0):
        z_out, info = deq(lambda z: cell(z, x), z0)
        return z_out[-1], lambda: (info["nstep"], info["abs_lowest"])

    return run


# --------------------------------------------------------------------------- measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(run, cell, x, z0, w, device):
    """(forward ms, backward ms, stats, dL/dW) of one forward + backward."""
    cell.zero_grad(set_to_none=True)
    sync(device)
    t0 = time.perf_counter()
    z, stats = run(x, z0)
    sync(device)
    t1 = time.perf_counter()
    (z * w).sum().backward()
    sync(device)
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3, stats, cell.W.grad


def measure(make, ref, solver, mode, device, repeat):
    cell = Cell(ref, torch.float32, device)
    x = torch.as_tensor(ref["X"], dtype=torch.float32, device=device)
    w = torch.as_tensor(ref["w"], dtype=torch.float32, device=device) / x.shape[0]
    z0 = torch.zeros(x.shape[0], cell.W.shape[0], dtype=torch.float32, device=device)
    run = make(cell, solver, mode)
    fwd, bwd = [], []
    for i in range(repeat + 2):  # two warm-up steps
        f_ms, b_ms, stats, gW = training_step(run, cell, x, z0, w, device)
        if i >= 2:
            fwd.append(f_ms)
            bwd.append(b_ms)
    steps, residual = (t.detach().float().cpu() for t in stats())
    with PeakMemory(device) as memory:
        training_step(run, cell, x, z0, w, device)
    return {
        "forward_ms": statistics.median(fwd),
        "backward_ms": statistics.median(bwd),
        "steps_max": float(steps.max()),
        "steps_mean": float(steps.mean()),
        "residual": float(residual.max()),
        "peak_mb": memory.peak / 2**20,
        "grad_W": gW.detach().cpu().numpy().astype(np.float64),
    }


# --------------------------------------------------------------------------- report
COLUMNS = [
    ("forward ms", "forward_ms", "{:.1f}"),
    ("backward ms", "backward_ms", "{:.1f}"),
    ("steps max", "steps_max", "{:.0f}"),
    ("steps mean", "steps_mean", "{:.1f}"),
    ("residual", "residual", "{:.1e}"),
    ("peak MiB", "peak_mb", "{:.1f}"),
    ("cosine", "cosine", "{:.4f}"),
]


def table(rows):
    """One row per case; each cell ``ours / TorchDEQ (ratio)``."""
    head = ["solver", "gradient"] + [title for title, _, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for solver, mode, a, b in rows:
        cells = [solver, mode if mode not in ("shine", "broyden_reuse") else f"{mode} (vs IFT)"]
        for _, key, fmt in COLUMNS:
            ratio = a[key] / b[key] if b[key] else float("nan")
            cells.append(f"{fmt.format(a[key])} / {fmt.format(b[key])} (**{ratio:.2f}**)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure_table(device="cpu", repeat=10, cases=None, echo=print):
    """Run every case on both libraries; return ``(title, markdown table)``."""
    device = torch.device(device)
    ref = reference_arrays()
    reference = exact_ift_grad_W(ref, device)
    rows = []
    for solver, mode in cases or CASES:
        a = measure(ours, ref, solver, mode, device, repeat)
        b = measure(torchdeq, ref, solver, mode, device, repeat)
        for r in (a, b):
            r["cosine"] = cosine(r.pop("grad_W"), reference)
        rows.append((solver, mode, a, b))
        echo(f"{solver:12s} {mode:14s} forward {a['forward_ms']:7.1f} / {b['forward_ms']:7.1f} ms  "
             f"backward {a['backward_ms']:7.1f} / {b['backward_ms']:7.1f} ms  steps {a['steps_max']:.0f} / "
             f"{b['steps_max']:.0f}  peak {a['peak_mb']:.1f} / {b['peak_mb']:.1f} MiB  "
             f"cosine {a['cosine']:.4f} / {b['cosine']:.4f}")
    title = (f"torch {torch.__version__} on {device.type}"
             f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
             f"{torch.get_num_threads()} threads; ours / TorchDEQ")
    return title, table(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--cases", nargs="*", help="solver:gradient pairs to run (default: all)")
    opts = parser.parse_args(argv)
    cases = [tuple(c.split(":")) for c in opts.cases] if opts.cases else None
    title, body = measure_table(opts.device, opts.repeat, cases, echo=lambda line: print(line, flush=True))
    report(title, body, opts.markdown)


if __name__ == "__main__":
    main()
