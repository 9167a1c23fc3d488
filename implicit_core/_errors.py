"""The error and warning types of implicit-core.

Every failure the library reports is an :class:`ImplicitError`; the subclasses also derive
from the closest built-in exception so that ``except ValueError`` keeps working.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class ImplicitError(Exception):
    """Base class of every error raised by implicit-core."""


class ConfigurationError(ImplicitError, ValueError):
    """An option, name or combination of settings is invalid."""


class UnknownPluginError(ConfigurationError, LookupError):
    """No solver, gradient estimator or backend is registered under the requested name."""


class ShapeError(ImplicitError, ValueError):
    """Arrays whose shapes do not fit together (state vs. ``f(state)``, VJP outputs, ...)."""


class DTypeError(ImplicitError, TypeError):
    """An unsupported dtype, or dtypes that do not match."""


class BackendMismatchError(ImplicitError, TypeError):
    """Arrays from different array libraries, or from a library other than the chosen backend."""


class DeviceMismatchError(ImplicitError, ValueError):
    """Arrays that live on different devices."""


class BackendUnavailableError(ImplicitError, RuntimeError):
    """The backend is registered but cannot run here (library missing, no device)."""


class PluginError(ImplicitError, RuntimeError):
    """A plugin failed to load, raised in a hook, or registered something invalid."""


class UserFunctionError(ImplicitError, RuntimeError):
    """The user's function raised on its first call (the original error is chained)."""


class NonFiniteError(ImplicitError, FloatingPointError):
    """NaN or Inf where finite values are required."""


class ConvergenceError(ImplicitError, RuntimeError):
    """Some samples did not converge and ``on_fail="raise"`` was requested.

    The :class:`~implicit_core.SolveInfo` of the failed solve is available as ``.info``.
    """

    def __init__(self, message: str, info=None):
        super().__init__(message)
        self.info = info


class ConvergenceWarning(UserWarning):
    """Some samples did not converge (``on_fail="warn"``)."""


class PluginWarning(UserWarning):
    """A plugin was skipped because it is broken; the others are loaded."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A " Did you mean 'x'?" suffix for error messages, or "" when nothing is close."""
    close = difflib.get_close_matches(str(name), sorted(choices), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


# Shown as ``implicit_core.ShapeError`` (where users import them from), not the private module.
for _cls in (ImplicitError, ConfigurationError, UnknownPluginError, ShapeError, DTypeError, BackendMismatchError,
             DeviceMismatchError, BackendUnavailableError, PluginError, UserFunctionError, NonFiniteError,
             ConvergenceError, ConvergenceWarning, PluginWarning):
    _cls.__module__ = "implicit_core"
del _cls
