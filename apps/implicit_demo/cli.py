"""``implicit-core demo`` and ``implicit-core compare``: commands added through the plugin hook.

The core's command line knows only ``plugins``; this module registers the demo's commands
through ``implicit_core_commands`` (an entry point of the ``implicit_core`` group), the way any
distribution adds its own.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import implicit_core as ic
from implicit_core.cli import positive_int

#: ``demo``'s default backend: the first of these that is available here.
DEMO_BACKENDS = ("torch", "jax", "numpy")
WORKLOADS = ("digits", "mdeq", "transformer", "hyperparameter")


def _default_backend() -> str:
    available = ic.available_backends()
    return next((b for b in DEMO_BACKENDS if b in available), "numpy")


def _check_names(kind: str, names: Sequence[str]) -> None:
    """Unknown or unavailable names fail before any work, listing what exists."""
    for name in names:
        if kind == "backend":
            ic.require_available(ic.get_backend(name))  # UnknownPluginError names the available ones
        else:
            ic.get_gradient(name)


def _demo_config(args: argparse.Namespace, **override):
    from .model import DemoConfig

    fields = {k: getattr(args, k) for k in ("solver", "gradient", "epochs", "seed", "hidden") if getattr(args, k) is not None}
    fields.update(override)
    return DemoConfig(**fields)


def _threads(args: argparse.Namespace) -> None:
    from .threads import default_threads, limit_threads

    limit_threads(args.threads or default_threads())


def run_demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _threads(args)
    backend = args.backend or _default_backend()
    _check_names("backend", [backend])
    config = _demo_config(args, backend=backend)
    ic.resolve_plugins(config.solver, config.gradient)  # typed errors for bad names / pairs, before training
    run_demo(config, out=args.out, show_progress=not args.quiet)
    return 0


def run_compare_command(args: argparse.Namespace) -> int:
    from .compare import GRADIENTS, run_comparison

    _threads(args)
    gradients = args.gradients.split(",") if args.gradients else list(GRADIENTS)
    _check_names("gradient", gradients)
    if args.workload != "digits":
        from .workloads import run_workload

        run_workload(args.workload, gradients, epochs=args.epochs, seed=args.seed or 0, out=args.out,
                     show_progress=not args.quiet)
        return 0
    available = ic.available_backends()
    backends = args.backends.split(",") if args.backends else [b for b in (*DEMO_BACKENDS, "cupy") if b in available]
    _check_names("backend", backends)
    config = _demo_config(args, solver=args.solver or "broyden")
    for gradient in gradients:
        ic.resolve_plugins(config.solver, gradient)
    run_comparison(backends, gradients, config, out=args.out, show_progress=not args.quiet)
    return 0


def run_bench_alias(args: argparse.Namespace) -> int:
    """``implicit-core bench``: the old name of ``compare`` (benchmarks against other tools are
    the scripts in ``benchmarks/``)."""
    print("implicit-core: 'bench' is now called 'compare'; 'bench' will be removed in the next release",
          file=sys.stderr)
    return run_compare_command(args)


def _training_options(p: argparse.ArgumentParser, epochs_help: str) -> None:
    p.add_argument("--solver", help="forward solver (see `implicit-core plugins`)")
    p.add_argument("--epochs", type=positive_int, help=epochs_help)
    p.add_argument("--seed", type=int, help="data split, initialisation and batch order (default 0)")
    p.add_argument("--hidden", type=positive_int, help="width of the implicit layer (default 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=positive_int,
                   help="math-library threads (default: $IMPLICIT_CORE_THREADS, else half the cores; more "
                        "threads than free cores slow small models down many times over)")


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", help=f"array framework (default: the first available of {', '.join(DEMO_BACKENDS)})")
    p.add_argument("--gradient", help="gradient estimator (default ift)")
    _training_options(p, "training epochs (default 12)")
    p.add_argument("--out", default="implicit-core-demo", help="folder for the JSON summary and the PNG")


def compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="digits", choices=WORKLOADS,
                   help="digits: the demo's MLP DEQ on every backend; mdeq: multiscale conv DEQ (torch); "
                        "transformer: character-level transformer DEQ (torch); hyperparameter: bi-level "
                        "logistic-regression penalties (numpy)")
    p.add_argument("--backends", help="comma-separated (default: every available backend; digits only)")
    p.add_argument("--gradients", help="comma-separated (default: ift,jfb,phantom,shine,broyden_reuse)")
    _training_options(p, "training epochs per run (default: 12 for digits, the workload's own otherwise)")
    p.add_argument("--out", default="implicit-core-compare", help="folder for the CSV, Markdown and PNG files")
    p.set_defaults(gradient=None)


@ic.hookimpl
def implicit_core_commands(register):
    register("demo", run_demo_command, add_arguments=demo_arguments,
             help="train a DEQ classifier on scikit-learn's digits and plot its training curves")
    register("compare", run_compare_command, add_arguments=compare_arguments,
             help="every gradient estimator on a DEQ workload (default: the digits DEQ on every backend)")
    register("bench", run_bench_alias, add_arguments=compare_arguments,
             help="deprecated name of 'compare' (kept for one release)")
