"""Keep freed tensor memory in the process heap on a CPU, so a training or attack step does not page in fresh
memory for every large activation.

torch's CPU allocator is plain ``malloc``/``free``. glibc serves a block above its mmap threshold (128 KiB,
rising to at most 32 MiB as it sees frees) with a fresh ``mmap`` and hands it back to the system on free, so a
step that allocates a 16 MiB activation and its gradient pays the kernel to zero and map those pages again,
every step (a §4.2 convnet step at batch 128: BatchNorm's backward ran 2.7x slower for it, the whole step
1.1-1.3x; ``docs/training.md``). :func:`keep_freed_memory` raises the mmap threshold to its maximum and stops
the heap from shrinking: blocks up to 32 MiB are reused from the heap. Memory freed stays with the process
(its peak, as with CUDA's caching allocator). Linux with glibc only; elsewhere, or with
``KAPIFY_KEEP_HEAP=0``, it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit systems
_NEVER_TRIM = 2**31 - 1


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB for reuse (once per process); True if it took the settings.

    Example:
        >>> keep_freed_memory() in (True, False)
        True
    """
    if os.environ.get("KAPIFY_KEEP_HEAP", "1") == "0" or platform.system() != "Linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
