"""The NumPy backend: the CPU reference. VJPs come from the user (``vjp=``)."""

from __future__ import annotations

from typing import Any

import array_api_compat
from array_api_compat import numpy as xp_numpy

from implicit_core import ExplicitVJPBackend, hookimpl


class NumpyBackend(ExplicitVJPBackend):
    name = "numpy"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def owns(self, x: Any) -> bool:
        return array_api_compat.is_numpy_array(x)

    def namespace(self) -> Any:
        return xp_numpy


@hookimpl
def implicit_core_backends(register):
    register(NumpyBackend)
