"""The public API for plugin authors: everything the built-in solvers, gradient estimators and
backends use, and nothing else.

A third-party plugin imports from here (and from :mod:`implicit_core`) exactly what the
built-ins import; no plugin reaches into the private ``implicit_core._*`` modules. ::

    from implicit_core.plugin import Solver, bdot, check_positive_int, write_row

Contents:

* base classes: :class:`Solver`, :class:`GradientEstimator`, :class:`Backend`,
  :class:`ExplicitVJPBackend`;
* what they receive: :class:`Problem` (``F`` on flat ``(batch, n)`` arrays), :class:`BackwardContext`
  (an estimator's view of the backward pass), :class:`SolveResult`;
* the inverse-Jacobian protocol SHINE and Broyden reuse read: :class:`InverseJacobian`,
  :class:`LowRankInverse`;
* batched helpers written with ``xp`` only: :func:`bdot`, :func:`bnorm`, :func:`safe_divide`,
  :func:`finite_rows`, :func:`solve_small`, :func:`expand_mask`, :func:`select`,
  :func:`write_row`, :func:`history_columns`, :func:`history_block_widths`, :func:`with_history`;
* option validators that raise :class:`ConfigurationError` with the plugin's name:
  :func:`check_positive_int`, :func:`check_range`, :func:`check_choice`;
* the hook markers :data:`hookimpl` / :data:`hookspec`.
"""

from __future__ import annotations

from ._backend import Backend
from ._errors import ConfigurationError, PluginError
from ._explicit import ExplicitVJPBackend
from ._gradient_context import BackwardContext
from ._linear import InverseJacobian, LowRankInverse
from ._loop import SolveResult
from ._ops import bdot, bnorm, expand_mask, finite_rows, safe_divide, select, solve_small
from ._plugin_base import (
    GradientEstimator, Solver, check_choice, check_positive_int, check_range, history_block_widths, history_columns,
    with_history, write_row,
)
from ._problem import Problem
from .hookspecs import hookimpl, hookspec

__all__ = [
    "Backend", "ExplicitVJPBackend", "Solver", "GradientEstimator",
    "Problem", "BackwardContext", "SolveResult",
    "InverseJacobian", "LowRankInverse",
    "bdot", "bnorm", "safe_divide", "finite_rows", "solve_small", "expand_mask", "select",
    "write_row", "history_columns", "history_block_widths", "with_history",
    "check_positive_int", "check_range", "check_choice",
    "ConfigurationError", "PluginError", "hookimpl", "hookspec",
]
