"""implicit-core on PyTorch.

* :mod:`implicit_torch.backend` — the backend plugin (:class:`TorchBackend`): what differs on
  torch from every other framework (its namespace, VJPs by ``torch.autograd``, how a solution
  is connected to autograd).
* :mod:`implicit_torch.module` — :class:`DEQ`, an implicit layer as a ``torch.nn.Module``.
* :mod:`implicit_torch.memory` — :class:`PeakMemory`, the peak tensor memory of a block of
  torch code on CPU as on CUDA (PyTorch only counts CUDA's), which the benchmarks and the demo
  report and which measures a user's own DEQ the same way.

``DEQ`` and ``PeakMemory`` subclass torch types: they import torch when first asked for, so
that the backend registers (and says why it is unavailable) on machines without torch.
"""

from __future__ import annotations

from typing import Any

from .backend import TorchBackend, implicit_core_backends

_LAZY = {"DEQ": "module", "PeakMemory": "memory"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TorchBackend", "DEQ", "PeakMemory", "implicit_core_backends"]
