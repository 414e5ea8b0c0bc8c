"""The C allocator's policy for long CPU runs.

A training or search step allocates and frees the same large tensors every step (activations
of tens of MB at 256x256). glibc's malloc serves blocks above its mmap threshold (which it
raises by itself to 32 MiB at most) with fresh mappings and returns them to the system when
freed, so every step faults those pages in again and the kernel zero-fills them: thousands of
page faults per step, a large part of a CPU step's time (docs/performance.md, "The allocator and the garbage collector"). Keeping freed
memory in the heap for reuse removes them.

`keep_freed_memory()` is process-wide, so oes_fast never calls it behind a user's back: the
`oes-fast` command and the scripts call it at startup; a Python user calls it once if they want it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
DEFAULT_LIMIT = 1 << 30


def keep_freed_memory(limit: int = DEFAULT_LIMIT) -> bool:
    """Ask glibc's malloc to serve allocations below `limit` bytes from its heap and to keep up
    to `limit` bytes of freed memory for reuse (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD).
    The process's resident set then stays near its peak instead of shrinking between steps.
    Returns whether the allocator took both settings: False, changing nothing, off Linux/glibc."""
    if not 0 < int(limit) < 2**31:
        raise ValueError(f"limit must be in (0, 2**31) bytes (an int for mallopt), got {limit}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(limit))) and bool(mallopt(_M_TRIM_THRESHOLD, int(limit)))
