"""Returning freed memory to the OS: glibc keeps freed heap pages mapped (resident) until trimmed, so a
long CPU job's resident set otherwise grows to the sum of its phases' transients."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

try:  # glibc only; elsewhere both calls below do nothing but collect
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _LIBC = None


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (cheap: no garbage collection)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def release_memory() -> None:
    """Collect garbage, then trim the heap."""
    gc.collect()
    trim_heap()
