"""A backend plugin for ``array_api_strict``: the array API standard and nothing more.

``array_api_strict`` implements the standard with every extension the standard lists and
refuses anything beyond it, so a solve that runs here uses only standard operations: the
same solvers and gradient estimators then run on any conforming library. It has no autodiff,
so gradients come from the user's ``vjp=``, as on NumPy (:class:`ExplicitVJPBackend`).

Written only against public names (:mod:`implicit_core.plugin`), as any third party would.
"""

from __future__ import annotations

from typing import Any

from implicit_core.plugin import ExplicitVJPBackend, hookimpl


class StrictBackend(ExplicitVJPBackend):
    name = "strict"
    requires = ("array_api_strict",)
    install_hint = "pip install array-api-strict"

    def owns(self, x: Any) -> bool:
        # (by the array's module: importing array_api_strict to ask would defeat lazy discovery)
        return type(x).__module__.startswith("array_api_strict.")

    def namespace(self) -> Any:
        import array_api_strict

        return array_api_strict

    def while_loop(self, cond: Any, body: Any, carry: Any) -> Any:
        # array_api_strict computes with NumPy: its floating-point warnings about a sample going
        # non-finite would only bury the solve's own per-sample report of it.
        import numpy as np

        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return super().while_loop(cond, body, carry)

    def at_set(self, buffer: Any, index: Any, value: Any) -> Any:
        # The standard indexes with integers and slices; solvers also pass their step counter,
        # a 0-d integer array: read it as the integer it is (a host array: no device to wait for).
        index = tuple(int(i) if hasattr(i, "__array_namespace__") else i for i in index)
        buffer[index] = value
        return buffer

    def to_python(self, x: Any) -> Any:
        # (no .tolist() in the standard: go through NumPy, which reads the DLPack protocol)
        import numpy as np

        return np.from_dlpack(x).tolist() if hasattr(x, "__dlpack__") else x

    def random_normal(self, like: Any, seed: int) -> Any:
        import numpy as np

        host = np.random.default_rng(seed).standard_normal(tuple(like.shape))
        return self.xp.asarray(host.astype(np.float64), dtype=like.dtype)


@hookimpl
def implicit_core_backends(register):
    register(StrictBackend)
