"""The NumPy backend: the CPU reference. VJPs come from the user (``vjp=``)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

import array_api_compat
from array_api_compat import numpy as xp_numpy

from implicit_core import ExplicitVJPBackend, hookimpl


class NumpyBackend(ExplicitVJPBackend):
    name = "numpy"
    requires = ("numpy",)

    def owns(self, x: Any) -> bool:
        return array_api_compat.is_numpy_array(x)

    def namespace(self) -> Any:
        return xp_numpy

    def host_view(self, x: Any) -> Any:
        return x

    def from_host(self, a: Any, like: Any) -> Any:
        return a

    def while_loop(self, cond: Callable[[Any], Any], body: Callable[[Any], Any], carry: Any) -> Any:
        # The loop detects non-finite values and reports them per sample; NumPy's floating-point
        # warnings about the same values (one per kernel) would only bury that report.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return super().while_loop(cond, body, carry)


@hookimpl
def implicit_core_backends(register):
    register(NumpyBackend)
