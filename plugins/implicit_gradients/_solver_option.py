"""A backward solver given by name or instance (shared by the estimators that solve)."""

from __future__ import annotations

from typing import Any

from implicit_core import Solver, get_solver
from implicit_core.plugin import ConfigurationError


def resolve_solver(owner: str, spec: Any) -> Solver:
    if isinstance(spec, Solver):
        return spec
    if isinstance(spec, str):
        return get_solver(spec)
    raise ConfigurationError(f"{owner}: solver must be a registered name or a Solver instance, got {spec!r}")
