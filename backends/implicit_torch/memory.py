"""Peak tensor memory of a block of torch code, on CPU as on CUDA."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveStorageCounter(TorchDispatchMode):
    """Counts the bytes of every tensor storage created by an op, until it is freed.

    Every op's outputs pass through ``__torch_dispatch__``; each new storage adds its size
    and a finaliser subtracts it when the storage dies. Storages are counted once however
    many views share them; storages that existed before the block are not counted, nor are
    views of them made inside it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output sharing an input's storage (a view, an in-place op) allocated nothing: a
        # transposed parameter is not a new copy of the parameter.
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu":
                storage = leaf.untyped_storage()
                key = id(storage)
                if key in self._tracked or key in inputs:
                    continue
                nbytes = storage.nbytes()
                self._tracked.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, nbytes)
        return out


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak``: peak bytes allocated in the block.

    On CUDA this is ``torch.cuda.max_memory_allocated`` minus what was allocated on entry. On
    CPU, where torch keeps no allocator statistics, every tensor storage the block's ops create
    is counted from its creation to its release (a ``TorchDispatchMode``), which includes the
    tensors autograd saves for backward and those of the backward pass itself. Tensors that
    existed before the block (parameters, inputs), and views of them, are not counted. The
    CPU counter adds a little Python work per op: measure time separately.
    """

    def __init__(self, device: Any = "cpu") -> None:
        self.device = torch.device(device)
        self.peak = 0
        self._counter: _LiveStorageCounter | None = None
        self._base = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._counter = _LiveStorageCounter()
            self._counter.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            assert self._counter is not None
            self._counter.__exit__(*exc)
            self.peak = self._counter.peak
