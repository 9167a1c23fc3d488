"""The hooks a plugin implements; built-ins use exactly these.

Each hook receives a ``register`` callback, so that one plugin may contribute several
objects and a failure in one registration is reported without losing the others::

    import implicit_core

    @implicit_core.hookimpl
    def implicit_core_solvers(register):
        register(MySolver)

and, in the plugin's ``pyproject.toml``::

    [project.entry-points.implicit_core]
    my_solver = "my_package.plugin"
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "implicit_core"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def implicit_core_backends(register: Callable[[Any], None]) -> None:
    """Register :class:`~implicit_core.Backend` subclasses or instances."""


@hookspec
def implicit_core_solvers(register: Callable[[Any], None]) -> None:
    """Register :class:`~implicit_core.Solver` subclasses."""


@hookspec
def implicit_core_gradients(register: Callable[[Any], None]) -> None:
    """Register :class:`~implicit_core.GradientEstimator` subclasses."""


@hookspec
def implicit_core_commands(register: Callable[..., None]) -> None:
    """Add ``implicit-core`` sub-commands: ``register(name, run, *, help, add_arguments=None)``.

    ``add_arguments(parser)`` declares the command's options on its ``argparse`` parser;
    ``run(args) -> int`` executes it and returns the exit status. A command raising an
    :class:`~implicit_core.ImplicitError` gets the one-line error treatment of the built-in
    ones. The demo's ``demo`` and ``bench`` are registered this way.
    """
