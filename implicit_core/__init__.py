"""implicit-core: implicit layers (deep equilibrium models) on every array framework.

One engine: solvers and gradient estimators written once against a backend contract, and
backends, solvers and estimators discovered as plugins through the ``implicit_core``
entry-point group.
"""

from ._backend import Backend
from ._errors import (
    BackendMismatchError,
    BackendUnavailableError,
    ConfigurationError,
    ConvergenceError,
    ConvergenceWarning,
    DeviceMismatchError,
    DTypeError,
    ImplicitError,
    NonFiniteError,
    PluginError,
    PluginWarning,
    ShapeError,
    UnknownPluginError,
    UserFunctionError,
)
from ._explicit import ExplicitVJPBackend
from ._gradient_context import BackwardContext
from ._info import SolveInfo
from ._linear import InverseJacobian, LowRankInverse
from ._plugin_base import GradientEstimator, Solver
from ._problem import Problem
from ._registry import (
    PluginInfo,
    available_backends,
    get_backend,
    get_gradient,
    get_solver,
    plugins,
    register,
    register_plugin,
    reload_plugins,
    require_available,
    unregister,
)
from .hookspecs import hookimpl, hookspec
from ._api import check_stopping_rule, fixed_point, resolve_plugins, root  # noqa: E402  (after the names plugins import)
from ._diagnostics import jacobian_regularisation, spectral_radius  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "fixed_point", "root", "resolve_plugins", "check_stopping_rule", "SolveInfo",
    "get_solver", "get_gradient", "get_backend", "available_backends", "require_available",
    "plugins", "PluginInfo", "register", "register_plugin", "unregister", "reload_plugins", "hookimpl", "hookspec",
    "Backend", "ExplicitVJPBackend", "Solver", "GradientEstimator", "BackwardContext", "Problem",
    "InverseJacobian", "LowRankInverse",
    "jacobian_regularisation", "spectral_radius",
    "ImplicitError", "ConfigurationError", "UnknownPluginError", "ShapeError", "DTypeError",
    "BackendMismatchError", "DeviceMismatchError", "BackendUnavailableError", "PluginError",
    "NonFiniteError", "UserFunctionError", "ConvergenceError", "ConvergenceWarning", "PluginWarning",
]
