"""The CuPy backend: the NumPy code path on a CUDA device. VJPs come from the user.

It registers everywhere; without CuPy or a CUDA device it reports itself unavailable with the
reason, and a solve on it raises ``BackendUnavailableError``.
"""

from __future__ import annotations

import functools
from typing import Any

import array_api_compat

from implicit_core import ExplicitVJPBackend, hookimpl


@functools.lru_cache(maxsize=1)
def _device_probe() -> tuple[bool, str]:
    import cupy

    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"no CUDA device ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if count < 1:
        return False, "no CUDA device"
    return True, ""


class CupyBackend(ExplicitVJPBackend):
    name = "cupy"
    requires = ("cupy",)
    install_hint = "pip install 'implicit-core[cupy]'"

    def available(self) -> tuple[bool, str]:
        ok, reason = super().available()  # importable?
        return _device_probe() if ok else (ok, reason)

    def owns(self, x: Any) -> bool:
        return array_api_compat.is_cupy_array(x)

    def namespace(self) -> Any:
        from array_api_compat import cupy as xp_cupy

        return xp_cupy

    def to_python(self, x: Any) -> Any:
        return x.get().tolist() if hasattr(x, "get") else x

    def all_on_host(self, mask: Any) -> bool:
        return False  # reading a device flag would stall the queue: always mask


@hookimpl
def implicit_core_backends(register):
    register(CupyBackend)
