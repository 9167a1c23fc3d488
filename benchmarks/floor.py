"""Where the forward time goes: each solver's forward against the f-evaluations it needs.

For every backend and solver, on the reference work (``benchmarks/_reference.py``: tanh cell,
n 256, batch 512, float32, tol 1e-4, at most 40 steps), it prints the number of evaluations of
``f`` the forward solve made, the *floor* (the time of that many back-to-back evaluations of
``f`` on the same arrays, nothing else), the forward time, and their ratio: 1.0 would be a
solver whose bookkeeping costs nothing. With ``--peers`` it measures TorchDEQ (torch) and
jaxopt (JAX) in the same run, on the same arrays, the same way.

Evaluations are counted by wrapping ``f`` on eager backends; under ``jax.jit`` they are
``2 + steps`` (the initial evaluation, one per step, and the final re-check), which is what the
traced loop runs. The forward is an inference solve (no gradient recorded); times are medians.

    python benchmarks/floor.py [--backends torch,jax,numpy] [--solvers fixed_point,anderson,broyden]
                               [--n 256] [--batch 512] [--repeat 15] [--peers] [--markdown out.md]
    python benchmarks/floor.py --scaling docs/images/floor_scaling.png   # n 64-4096, batch 32-4096
"""

from __future__ import annotations

import abc
import argparse
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
from _reference import MAX_ITER, TOL, reference_arrays, report, require

import implicit_core as ic

SOLVERS = ("fixed_point", "anderson", "broyden")
BACKENDS = ("torch", "jax", "numpy")


def median_time(run: Callable[[], Any], repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- one backend each
class Workload(abc.ABC):
    """The reference cell on one backend: ``solve(solver) -> evaluations`` and ``floor(count)``."""

    def __init__(self, ref: dict[str, np.ndarray]):
        self.ref = ref

    @abc.abstractmethod
    def solve(self, solver: str) -> int:
        """Run the forward solve once; return how many times it evaluated ``f``."""

    @abc.abstractmethod
    def floor(self, count: int) -> None:
        """Evaluate ``f`` ``count`` times back to back, nothing else."""

    @abc.abstractmethod
    def handwritten(self) -> int:
        """A fixed-point loop written directly in the framework, to the solve loop's contract
        (each sample's residual measured every step, its lowest-residual iterate kept, each
        sample stopped at tol, one final evaluation on the returned batch); returns its
        evaluations of ``f``. What is left between it and the floor is the contract's own cost."""


class Counted:
    """``f`` with a call counter (eager backends)."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z, args):
        self.calls += 1
        return self.f(z, args)


class NumpyWork(Workload):
    def __init__(self, ref):
        super().__init__(ref)
        f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
        self.args = (f32(ref["W"]), f32(ref["U"]), f32(ref["X"]), f32(ref["b"]))
        self.z0 = np.zeros((ref["X"].shape[0], ref["W"].shape[0]), np.float32)

    @staticmethod
    def cell(z, a):
        W, U, X, b = a
        return np.tanh(z @ W.T + X @ U.T + b)

    def solve(self, solver):
        f = Counted(self.cell)
        ic.fixed_point(f, self.z0, self.args, solver=solver, tol=TOL, max_iter=MAX_ITER, on_fail="ignore")
        return f.calls

    def floor(self, count):
        z = self.z0
        for _ in range(count):
            z = self.cell(z, self.args)

    def handwritten(self):
        z = self.z0
        fz, evals = self.cell(z, self.args), 1
        best, bz, running = np.full(z.shape[0], np.inf, np.float32), z, np.ones(z.shape[0], bool)
        for k in range(MAX_ITER + 1):
            r = np.sqrt(np.vecdot(fz - z, fz - z))
            better = running & (r < best)
            best = np.where(better, r, best)
            bz = z if better.all() else np.where(better[:, None], z, bz)
            running &= r > TOL
            if k == MAX_ITER or not running.any():
                break
            z = fz
            fz, evals = self.cell(z, self.args), evals + 1
        self.cell(bz, self.args)
        return evals + 1


class TorchWork(Workload):
    def __init__(self, ref, device="cpu"):
        super().__init__(ref)
        import torch

        self.torch = torch
        t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        self.args = (t(ref["W"]), t(ref["U"]), t(ref["X"]), t(ref["b"]))
        self.z0 = torch.zeros(ref["X"].shape[0], ref["W"].shape[0], dtype=torch.float32, device=device)
        self.device = torch.device(device)

    @staticmethod
    def cell(z, a):
        W, U, X, b = a
        return (z @ W.T + X @ U.T + b).tanh()

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def solve(self, solver):
        f = Counted(self.cell)
        with self.torch.no_grad():
            ic.fixed_point(f, self.z0, self.args, solver=solver, tol=TOL, max_iter=MAX_ITER, on_fail="ignore")
        self.sync()
        return f.calls

    def floor(self, count):
        with self.torch.no_grad():
            z = self.z0
            for _ in range(count):
                z = self.cell(z, self.args)
        self.sync()

    def handwritten(self):
        torch = self.torch
        with torch.no_grad():
            z = self.z0
            fz, evals = self.cell(z, self.args), 1
            best = torch.full((z.shape[0],), float("inf"), device=z.device)
            bz, running = z, torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
            for k in range(MAX_ITER + 1):
                r = torch.linalg.vector_norm(fz - z, dim=1)
                better = running & (r < best)
                best = torch.where(better, r, best)
                bz = z if bool(better.all()) else torch.where(better[:, None], z, bz)
                running &= r > TOL
                if k == MAX_ITER or not bool(running.any()):
                    break
                z = fz
                fz, evals = self.cell(z, self.args), evals + 1
            self.cell(bz, self.args)
        self.sync()
        return evals + 1

    def peer(self, solver):
        """TorchDEQ's forward on the same cell; returns its evaluation count."""
        from torchdeq import get_deq

        names = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}
        deq = get_deq(f_solver=names[solver], f_max_iter=MAX_ITER, f_tol=TOL, f_stop_mode="abs", ift=True)
        f = Counted(self.cell)
        with self.torch.no_grad():
            deq(lambda z: f(z, self.args), self.z0)
        self.sync()
        return f.calls


class JaxWork(Workload):
    def __init__(self, ref):
        super().__init__(ref)
        import jax
        import jax.numpy as jnp

        self.jax = jax
        t = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
        self.args = (t(ref["W"]), t(ref["U"]), t(ref["X"]), t(ref["b"]))
        self.z0 = jnp.zeros((ref["X"].shape[0], ref["W"].shape[0]), jnp.float32)
        self._solves: dict[str, Any] = {}
        self._floors: dict[int, Any] = {}
        self._peers: dict[str, Any] = {}

    @staticmethod
    def cell(z, a):
        import jax.numpy as jnp

        W, U, X, b = a
        return jnp.tanh(z @ W.T + X @ U.T + b)

    def solve(self, solver):
        if solver not in self._solves:
            def run(z0, args):
                z, info = ic.fixed_point(self.cell, z0, args, solver=solver, tol=TOL, max_iter=MAX_ITER, on_fail="ignore")
                return z, info.steps

            self._solves[solver] = self.jax.jit(run)
        z, steps = self._solves[solver](self.z0, self.args)
        z.block_until_ready()
        return 2 + int(steps.max())

    def floor(self, count):
        if count not in self._floors:
            lax = self.jax.lax
            self._floors[count] = self.jax.jit(lambda z, a: lax.fori_loop(0, count, lambda i, z: self.cell(z, a), z))
        self._floors[count](self.z0, self.args).block_until_ready()

    def handwritten(self):
        if "handwritten" not in self._solves:
            jnp, lax, cell = self.jax.numpy, self.jax.lax, self.cell

            def run(z0, args):
                def measure(k, z, fz, best, bz, running):
                    r = jnp.linalg.vector_norm(fz - z, axis=1)
                    better = running & (r < best)
                    return k, z, fz, jnp.where(better, r, best), jnp.where(better[:, None], z, bz), running & (r > TOL)

                def body(c):
                    k, z, fz, best, bz, running = c
                    return measure(k + 1, fz, cell(fz, args), best, bz, running)

                init = measure(0, z0, cell(z0, args), jnp.full(z0.shape[0], jnp.inf, z0.dtype), z0,
                               jnp.ones(z0.shape[0], bool))
                k, _, _, _, bz, _ = lax.while_loop(lambda c: (c[0] < MAX_ITER) & c[5].any(), body, init)
                return cell(bz, args), k

            self._solves["handwritten"] = self.jax.jit(run)
        z, k = self._solves["handwritten"](self.z0, self.args)
        z.block_until_ready()
        return int(k) + 2

    def peer(self, solver):
        """jaxopt's forward (FixedPointIteration, AndersonAcceleration, Broyden on f(z) - z)."""
        import jaxopt

        if solver not in self._peers:
            fun = lambda z, a: self.cell(z, a)  # noqa: E731
            if solver == "fixed_point":
                s = jaxopt.FixedPointIteration(fixed_point_fun=fun, maxiter=MAX_ITER, tol=TOL)
            elif solver == "anderson":
                s = jaxopt.AndersonAcceleration(fixed_point_fun=fun, history_size=5, ridge=1e-4, maxiter=MAX_ITER, tol=TOL)
            else:
                s = jaxopt.Broyden(fun=lambda z, a: fun(z, a) - z, maxiter=MAX_ITER, tol=TOL, history_size=30)
            self._peers[solver] = self.jax.jit(lambda z0, a: s.run(z0, a))
        params, state = self._peers[solver](self.z0, self.args)
        params.block_until_ready()
        return None  # jaxopt does not report its evaluations in a comparable way


WORKLOADS = {"numpy": NumpyWork, "torch": TorchWork, "jax": JaxWork}


# --------------------------------------------------------------------------- measuring
def measure(work: Workload, solver: str, repeat: int) -> dict[str, float]:
    """Forward and floor timed in alternation (a slow spell of a shared machine hits both), and
    the ratio as the median of the per-pair ratios."""
    evals = work.solve(solver)
    # Fixed point: the hand-written loop of the same contract in the same alternation
    hand_evals = work.handwritten() if solver == "fixed_point" else None
    for _ in range(2):
        work.solve(solver)
        work.floor(evals)
    forward, floor, hand = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        work.solve(solver)
        t1 = time.perf_counter()
        work.floor(evals)
        t2 = time.perf_counter()
        if hand_evals is not None:
            work.handwritten()
            hand.append(time.perf_counter() - t2)
        forward.append(t1 - t0)
        floor.append(t2 - t1)
    ratio = statistics.median(f / g for f, g in zip(forward, floor))
    out = {"evals": evals, "floor_ms": statistics.median(floor) * 1e3,
           "forward_ms": statistics.median(forward) * 1e3, "ratio": ratio, "hand_ratio": None}
    if hand:  # (against the floor of the loop's own evaluation count)
        out["hand_ratio"] = statistics.median(h / (g * hand_evals / evals) for h, g in zip(hand, floor))
    return out


def measure_peer(work: Workload, solver: str, repeat: int, floor_ms: float, evals_ours: int) -> dict[str, float]:
    evals = work.peer(solver)
    forward = median_time(lambda: work.peer(solver), repeat) * 1e3
    out = {"peer_ms": forward, "vs_peer": None, "peer_evals": evals, "peer_ratio": None}
    if evals:  # the peer's own bookkeeping ratio, against its own evaluation count
        out["peer_ratio"] = forward / (floor_ms / evals_ours * evals)
    return out


def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]], peers: bool) -> str:
    head = ["backend", "solver", "f-evals", "floor ms", "forward ms", "**forward / floor**", "hand-written loop / floor"]
    if peers:
        head += ["peer", "peer f-evals", "peer forward ms", "peer forward / floor", "ours / peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["backend"], r["solver"], str(r["evals"]), f"{r['floor_ms']:.1f}", f"{r['forward_ms']:.1f}",
                 f"**{r['ratio']:.2f}**", fmt(r.get("hand_ratio"), ".2f")]
        if peers:
            cells += [r.get("peer", "–"), fmt(r.get("peer_evals"), "d"), fmt(r.get("peer_ms"), ".1f"),
                      fmt(r.get("peer_ratio"), ".2f"), fmt(r.get("vs_peer"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure_all(backends, solvers, n: int, batch: int, repeat: int, peers: bool, echo=print) -> list[dict[str, Any]]:
    """One row per backend and solver (and its peer's figures with ``peers``)."""
    ref = reference_arrays(n=n, batch=batch)
    rows = []
    for backend in backends:
        work = WORKLOADS[backend](ref)
        for solver in solvers:
            row = {"backend": backend, "solver": solver, **measure(work, solver, repeat)}
            if peers and hasattr(work, "peer"):
                row["peer"] = "TorchDEQ" if backend == "torch" else "jaxopt"
                row.update(measure_peer(work, solver, repeat, row["floor_ms"], row["evals"]))
                row["vs_peer"] = row["forward_ms"] / row["peer_ms"]
            rows.append(row)
            echo(f"  {backend:6s} {solver:12s} evals {row['evals']:3d}  floor {row['floor_ms']:8.2f} ms  "
                 f"forward {row['forward_ms']:8.2f} ms  ratio {row['ratio']:.2f}"
                 + ("" if row["hand_ratio"] is None else f"  hand-written loop {row['hand_ratio']:.2f}"))
    return rows


def title(n: int, batch: int, repeat: int) -> str:
    return (f"Forward time / f-evaluation floor: tanh cell, n {n}, batch {batch}, float32, tol {TOL:g}, "
            f"median of {repeat} alternating runs")


def run_table(opts) -> None:
    if opts.peers:
        needed = {"torch": "torchdeq", "jax": "jaxopt"}
        require(*(needed[b] for b in opts.backends if b in needed), install="pip install torchdeq jaxopt")
    rows = measure_all(opts.backends, opts.solvers, opts.n, opts.batch, opts.repeat, opts.peers,
                       echo=lambda line: print(line, flush=True))
    report(title(opts.n, opts.batch, opts.repeat), table(rows, opts.peers), opts.markdown)


def run_scaling(opts) -> None:
    """Ratio against n (batch 256) and against batch (n 256), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = {"n": [(n, 256) for n in (64, 256, 1024, 4096)], "batch": [(256, b) for b in (32, 256, 1024, 4096)]}
    results: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for axis, points in sweeps.items():
        for n, batch in points:
            ref = reference_arrays(n=n, batch=batch)
            for backend in opts.backends:
                work = WORKLOADS[backend](ref)
                for solver in opts.solvers:
                    r = measure(work, solver, max(3, opts.repeat // 3))
                    results.setdefault((axis, backend, solver), []).append((n if axis == "n" else batch, r["ratio"]))
                    print(f"  n {n:5d} batch {batch:5d} {backend:6s} {solver:12s} ratio {r['ratio']:.2f}", flush=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = {"fixed_point": "tab:blue", "anderson": "tab:orange", "broyden": "tab:green"}
    styles = {"torch": "-", "jax": "--", "numpy": ":"}
    for ax, axis in zip(axes, sweeps):
        for (a, backend, solver), pts in results.items():
            if a == axis:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, styles[backend], marker="o", color=colours[solver], label=f"{backend} {solver}")
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("state size n (batch 256)" if axis == "n" else "batch (n 256)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("forward / f-evaluation floor")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.suptitle("Bookkeeping overhead of the forward solve (tanh cell, float32, tol 1e-4)")
    fig.tight_layout()
    fig.savefig(opts.scaling, dpi=110)
    print(f"wrote {opts.scaling}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS), type=lambda s: s.split(","))
    parser.add_argument("--solvers", default=",".join(SOLVERS), type=lambda s: s.split(","))
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--peers", action="store_true", help="also measure TorchDEQ (torch) and jaxopt (JAX)")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--scaling", metavar="PNG", help="sweep n and batch and plot the ratio instead")
    opts = parser.parse_args(argv)
    unknown = sorted(set(opts.backends) - set(WORKLOADS)) + sorted(set(opts.solvers) - set(SOLVERS))
    if unknown:
        sys.exit(f"floor.py: unknown backend or solver {unknown}; backends {BACKENDS}, solvers {SOLVERS}")
    run_scaling(opts) if opts.scaling else run_table(opts)


if __name__ == "__main__":
    main()
