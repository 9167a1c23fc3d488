"""The ``implicit-core`` command."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from ._errors import ImplicitError, PluginWarning
from ._registry import REGISTRY, plugins

def _rows(check: bool = False) -> list[tuple[str, str, str, str, str]]:
    order = {"backend": 0, "solver": 1, "gradient": 2, "command": 3, "plugin": 4}
    rows = []
    for p in sorted(plugins(check), key=lambda p: (order.get(p.kind, 9), p.name)):
        if p.kind == "plugin" or (not p.available and p.kind != "backend"):
            status = "broken"
        elif not p.checked:
            status = "installed"
        else:
            status = "available" if p.available else "unavailable"
        rows.append((p.kind, p.name, p.source, status, p.reason))
    return rows


def cmd_plugins(args: argparse.Namespace) -> int:
    rows = _rows(args.check)
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
            style = {"available": "green", "installed": "cyan", "unavailable": "yellow", "broken": "red"}
            for row in rows:
                table.add_row(*row[:3], f"[{style[row[3]]}]{row[3]}[/]", row[4])
            if any(row[3] == "installed" for row in rows):
                table.caption = "installed: found on disk, not imported; --check imports and probes each backend"
            Console().print(table)
            return 0
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:4])]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(line(headers[:4]) + "  reason")
    for row in rows:
        print(line(row[:4]) + ("  " + row[4] if row[4] else ""))
    if any(row[3] == "installed" for row in rows):
        print("\n'installed': found on disk, not imported; --check imports each backend and probes it")
    return 0


def positive_int(text: str) -> int:
    """An ``argparse`` type: a whole number >= 1, with a one-line error otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line saying what is wrong (``--help`` shows the usage), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="implicit-core", description="Implicit layers on every array framework.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("plugins", help="list backends, solvers and gradient estimators and where they come from")
    p.add_argument("--plain", action="store_true", help="plain text even on a terminal")
    p.add_argument("--check", action="store_true",
                   help="import every backend's framework and probe it (a CUDA device for CuPy); slower")
    p.set_defaults(func=cmd_plugins)
    for command in sorted(REGISTRY.commands(), key=lambda c: c.name):  # added by plugins
        p = sub.add_parser(command.name, help=command.help)
        try:
            if command.add_arguments is not None:
                command.add_arguments(p)
        except Exception as exc:  # a broken command must not take the others down
            warnings.warn(f"implicit-core command {command.name!r} ({command.source}) is broken and was "
                          f"skipped: add_arguments raised {exc!r}", PluginWarning, stacklevel=2)
            sub.choices.pop(command.name, None)
            continue
        p.set_defaults(func=command.run)
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
