"""The ``implicit-core`` command."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ._registry import plugins


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="implicit-core", description="Implicit layers on every array framework.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list backends, solvers and gradient estimators and where they come from")
    p.add_argument("--plain", action="store_true", help="plain text even on a terminal")
    p.set_defaults(func=cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
