"""The ``implicit-core`` command."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ._errors import ImplicitError
from ._registry import REGISTRY, available_backends, plugins, require_available

#: ``demo``'s default backend: the first of these that is available here.
DEMO_BACKENDS = ("torch", "jax", "numpy")


def _rows() -> list[tuple[str, str, str, str, str]]:
    order = {"backend": 0, "solver": 1, "gradient": 2, "plugin": 3}
    rows = []
    for p in sorted(plugins(), key=lambda p: (order.get(p.kind, 9), p.name)):
        if p.kind == "plugin" or (not p.available and p.kind != "backend"):
            status = "broken"
        else:
            status = "available" if p.available else "unavailable"
        rows.append((p.kind, p.name, p.source, status, p.reason))
    return rows


def cmd_plugins(args: argparse.Namespace) -> int:
    rows = _rows()
    headers = ("kind", "name", "source", "status", "reason")
    if sys.stdout.isatty() and not args.plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # rich is optional: fall back to plain text
            pass
        else:
            table = Table(title="implicit-core plugins")
            for h in headers:
                table.add_column(h, overflow="fold")
            style = {"available": "green", "unavailable": "yellow", "broken": "red"}
            for row in rows:
                table.add_row(*row[:3], f"[{style[row[3]]}]{row[3]}[/]", row[4])
            Console().print(table)
            return 0
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:4])]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(line(headers[:4]) + "  reason")
    for row in rows:
        print(line(row[:4]) + ("  " + row[4] if row[4] else ""))
    return 0


def _default_backend() -> str:
    available = available_backends()
    return next((b for b in DEMO_BACKENDS if b in available), "numpy")


def _check_names(kind: str, names: Sequence[str]) -> None:
    """Unknown or unavailable names fail before any work, listing what exists."""
    for name in names:
        plugin = REGISTRY.get(kind, name)  # UnknownPluginError names the available ones
        if kind == "backend":
            require_available(plugin)


def _demo_config(args: argparse.Namespace, **override):
    from implicit_demo.model import DemoConfig

    fields = {k: getattr(args, k) for k in ("solver", "gradient", "epochs", "seed", "hidden") if getattr(args, k) is not None}
    fields.update(override)
    return DemoConfig(**fields)


def _threads(args: argparse.Namespace) -> None:
    from implicit_demo.threads import default_threads, limit_threads

    limit_threads(args.threads or default_threads())


def cmd_demo(args: argparse.Namespace) -> int:
    from implicit_demo.demo import run_demo

    _threads(args)
    backend = args.backend or _default_backend()
    _check_names("backend", [backend])
    config = _demo_config(args, backend=backend)
    from ._api import resolve_plugins

    resolve_plugins(config.solver, config.gradient)  # typed errors for bad names / pairs, before training
    run_demo(config, out=args.out, show_progress=not args.quiet)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from implicit_demo.bench import GRADIENTS, run_bench

    _threads(args)
    if args.workload != "digits":
        from implicit_demo.workloads import run_workload

        gradients = args.gradients.split(",") if args.gradients else list(GRADIENTS)
        _check_names("gradient", gradients)
        run_workload(args.workload, gradients, epochs=args.epochs, seed=args.seed or 0, out=args.out,
                     show_progress=not args.quiet)
        return 0
    backends = args.backends.split(",") if args.backends else [b for b in (*DEMO_BACKENDS, "cupy") if b in available_backends()]
    gradients = args.gradients.split(",") if args.gradients else list(GRADIENTS)
    _check_names("backend", backends)
    _check_names("gradient", gradients)
    config = _demo_config(args, solver=args.solver or "broyden")
    from ._api import resolve_plugins

    for gradient in gradients:
        resolve_plugins(config.solver, gradient)
    run_bench(backends, gradients, config, out=args.out, show_progress=not args.quiet)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _training_options(p: argparse.ArgumentParser, epochs_help: str) -> None:
    p.add_argument("--solver", help="forward solver (see `implicit-core plugins`)")
    p.add_argument("--epochs", type=_positive_int, help=epochs_help)
    p.add_argument("--seed", type=int, help="data split, initialisation and batch order (default 0)")
    p.add_argument("--hidden", type=_positive_int, help="width of the implicit layer (default 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=_positive_int,
                   help="math-library threads (default: $IMPLICIT_CORE_THREADS, else half the cores; more "
                        "threads than free cores slow small models down many times over)")


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line saying what is wrong (``--help`` shows the usage), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="implicit-core", description="Implicit layers on every array framework.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("plugins", help="list backends, solvers and gradient estimators and where they come from")
    p.add_argument("--plain", action="store_true", help="plain text even on a terminal")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("demo", help="train a DEQ classifier on scikit-learn's digits and plot its training curves")
    p.add_argument("--backend", help=f"array framework (default: the first available of {', '.join(DEMO_BACKENDS)})")
    p.add_argument("--gradient", help="gradient estimator (default ift)")
    _training_options(p, "training epochs (default 12)")
    p.add_argument("--out", default="implicit-core-demo", help="folder for the JSON summary and the PNG")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="every gradient estimator on a DEQ workload (default: the digits DEQ on every backend)")
    p.add_argument("--workload", default="digits", choices=("digits", "mdeq", "transformer", "hyperparameter"),
                   help="digits: the demo's MLP DEQ on every backend; mdeq: multiscale conv DEQ (torch); "
                        "transformer: character-level transformer DEQ (torch); hyperparameter: bi-level "
                        "logistic-regression penalties (numpy)")
    p.add_argument("--backends", help="comma-separated (default: every available backend; digits only)")
    p.add_argument("--gradients", help="comma-separated (default: ift,jfb,phantom,shine,broyden_reuse)")
    _training_options(p, "training epochs per run (default 12)")
    p.add_argument("--out", default="implicit-core-bench", help="folder for bench.csv, bench.md and bench.png")
    p.set_defaults(func=cmd_bench, gradient=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ImplicitError as exc:  # bad names, unavailable backends, missing extras: one line, no traceback
        print(f"implicit-core {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
