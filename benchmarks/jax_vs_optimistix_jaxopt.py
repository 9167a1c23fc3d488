"""implicit-core's JAX backend against optimistix and jaxopt, side by side in one run.

The reference work (``benchmarks/_reference.py``): ``f(z, x) = tanh(W z + U x + b)``, n = 256,
batch 512, digits features, ||W||_2 = 0.9, float32, tol 1e-4, max 40 iterations; loss
``sum(w * z*) / batch``; parameters ``(W, U, b)``. Everything is jitted. Per sample, the
reference tools stop on the 2-norm of ``f(z) - z`` (optimistix: ``atol = tol``, ``rtol = 0``,
``norm = two_norm``; jaxopt: ``tol``), each sample solved by ``vmap`` as its own system, which
matches implicit-core's per-sample stopping. Their gradients use their implicit
differentiation (optimistix ``ImplicitAdjoint``, jaxopt ``implicit_diff=True``).

Printed per pairing: compile time (first call minus a steady call), forward ms, value-and-grad
ms (medians), the steps of the slowest sample, and ours / theirs ratios.

    pip install optimistix jaxopt          # benchmark dependencies only
    python benchmarks/jax_vs_optimistix_jaxopt.py [--repeat 10] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _reference import require

require("jax", "optimistix", "jaxopt", install="pip install jax optimistix jaxopt")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from _reference import BATCH, MAX_ITER, N, TOL, reference_arrays, report  # noqa: E402
import implicit_core as ic  # noqa: E402


def cell(z, params, x):
    W, U, b = params
    return jnp.tanh(z @ W.T + x @ U.T + b)


# --------------------------------------------------------------------------- the solvers
def ours(solver, gradient="ift"):
    grad_obj = ic.get_gradient("ift", solver=solver) if gradient == "ift" else gradient

    def solve(params, X):
        z, info = ic.fixed_point(lambda z, a: cell(z, a[0], a[1]), jnp.zeros((X.shape[0], N), X.dtype), (params, X),
                                 solver=solver, gradient=grad_obj, tol=TOL, max_iter=MAX_ITER, on_fail="ignore")
        return z, info.steps

    return solve


def optimistix(kind):
    import optimistix as optx

    def solve_one(params, x):
        x = x[None]
        if kind == "fixed_point":
            solver = optx.FixedPointIteration(rtol=0.0, atol=TOL, norm=optx.two_norm)
            sol = optx.fixed_point(lambda z, p: cell(z[None], p, x)[0], solver, jnp.zeros(N, x.dtype), params,
                                   max_steps=MAX_ITER, throw=False)
        else:  # Newton on g(z) = f(z) - z
            solver = optx.Newton(rtol=0.0, atol=TOL, norm=optx.two_norm)
            sol = optx.root_find(lambda z, p: cell(z[None], p, x)[0] - z, solver, jnp.zeros(N, x.dtype), params,
                                 max_steps=MAX_ITER, throw=False)
        return sol.value, sol.stats["num_steps"]

    return jax.vmap(solve_one, in_axes=(None, 0))


def jaxopt_solver(kind):
    import jaxopt

    def solve_one(params, x):
        fun = lambda z, p, x: cell(z[None], p, x[None])[0]  # noqa: E731
        if kind == "fixed_point":
            solver = jaxopt.FixedPointIteration(fixed_point_fun=fun, maxiter=MAX_ITER, tol=TOL)
        else:
            solver = jaxopt.AndersonAcceleration(fixed_point_fun=fun, history_size=5, ridge=1e-4, maxiter=MAX_ITER,
                                                 tol=TOL)
        out = solver.run(jnp.zeros(N, x.dtype), params, x)
        return out.params, out.state.iter_num

    return jax.vmap(solve_one, in_axes=(None, 0))


PAIRINGS = [
    # (row label, ours, [(tool label, solve), ...])
    ("fixed-point iteration", ours("fixed_point"),
     [("optimistix FixedPointIteration", lambda: optimistix("fixed_point")),
      ("jaxopt FixedPointIteration", lambda: jaxopt_solver("fixed_point"))]),
    ("Anderson", ours("anderson"), [("jaxopt AndersonAcceleration", lambda: jaxopt_solver("anderson"))]),
    ("Broyden (ours) / Newton root_find", ours("broyden"),
     [("optimistix root_find Newton", lambda: optimistix("newton"))]),
]
EXTRA_GRADIENTS = [("Broyden + SHINE", ours("broyden", "shine")), ("Broyden + JFB", ours("broyden", "jfb"))]


# --------------------------------------------------------------------------- measuring
def measure(solve, params, X, w, repeat):
    forward = jax.jit(solve)

    def loss(params):
        z, _ = solve(params, X)
        return jnp.sum(z * w) / X.shape[0]

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    out = {}
    for name, fn, args in (("forward", forward, (params, X)), ("value_and_grad", value_and_grad, (params,))):
        t0 = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        out[f"{name}_ms"] = statistics.median(times) * 1e3
        out[f"{name}_compile_s"] = max(first - statistics.median(times), 0.0)
        if name == "forward":
            out["steps"] = int(jnp.max(result[1]))
    return out


def measure_table(repeat=10, echo=print):
    """Every pairing on every library; return ``(title, markdown table)``."""
    ref = reference_arrays()
    params = tuple(jnp.asarray(ref[k], jnp.float32) for k in ("W", "U", "b"))
    X = jnp.asarray(ref["X"], jnp.float32)
    w = jnp.asarray(ref["w"], jnp.float32)
    assert X.shape[0] == BATCH
    lines = ["| solver | tool | compile s (fwd / v&g) | forward ms | value-and-grad ms | steps max | ratio forward | ratio v&g |",
             "|---|---|---|---|---|---|---|---|"]
    for label, mine, others in PAIRINGS:
        a = measure(mine, params, X, w, repeat)
        lines.append(f"| {label} | implicit-core | {a['forward_compile_s']:.2f} / {a['value_and_grad_compile_s']:.2f} | "
                     f"{a['forward_ms']:.1f} | {a['value_and_grad_ms']:.1f} | {a['steps']} | | |")
        echo(lines[-1])
        for tool, make in others:
            b = measure(make(), params, X, w, repeat)
            lines.append(f"| | {tool} | {b['forward_compile_s']:.2f} / {b['value_and_grad_compile_s']:.2f} | "
                         f"{b['forward_ms']:.1f} | {b['value_and_grad_ms']:.1f} | {b['steps']} | "
                         f"**{a['forward_ms'] / b['forward_ms']:.2f}** | **{a['value_and_grad_ms'] / b['value_and_grad_ms']:.2f}** |")
            echo(lines[-1])
    ift = measure(PAIRINGS[2][1], params, X, w, repeat)
    for label, mine in EXTRA_GRADIENTS:
        a = measure(mine, params, X, w, repeat)
        lines.append(f"| {label} | implicit-core | {a['forward_compile_s']:.2f} / {a['value_and_grad_compile_s']:.2f} | "
                     f"{a['forward_ms']:.1f} | {a['value_and_grad_ms']:.1f} | {a['steps']} | | "
                     f"{a['value_and_grad_ms'] / ift['value_and_grad_ms']:.2f} of our IFT |")
        echo(lines[-1])
    title = f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); ours / theirs"
    return title, "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--markdown")
    opts = parser.parse_args(argv)
    title, body = measure_table(opts.repeat, echo=lambda line: print(line, flush=True))
    report(title, body, opts.markdown)


if __name__ == "__main__":
    main()
