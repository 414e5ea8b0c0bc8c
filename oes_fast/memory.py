"""Memory of a computation, measured by the package itself: the peak of live tensor bytes while
some code runs (`LiveBytes`), and what this process holds and this machine has left (Linux)."""
from __future__ import annotations

import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveBytes", "resident_bytes", "available_bytes"]


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create, while they live; `peak` is the most at once.

    Counts the outputs of every op run inside the `with` block (on any device, "meta" included);
    buffers an op allocates and frees inside its own kernel are not seen.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage):
        key = storage._cdata
        if key in self.tracked:
            return
        self.tracked.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key, nbytes):
        self.tracked.discard(key)
        self.live -= nbytes


def _meminfo_kib(path: str, field: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def resident_bytes() -> int | None:
    """This process's resident set now (VmRSS), or None where /proc is not there."""
    kib = _meminfo_kib(f"/proc/{os.getpid()}/status", "VmRSS")
    return None if kib is None else kib * 1024


def available_bytes() -> int | None:
    """Memory the machine can still give without swapping (MemAvailable), or None where unknown."""
    kib = _meminfo_kib("/proc/meminfo", "MemAvailable")
    return None if kib is None else kib * 1024
