"""Giving freed memory back to the operating system: `release_free_memory`.

glibc's malloc keeps memory that a process freed (a parsed request body, a constraint's compiled grammar, a traced
slice's arrays) in its heaps and per-thread arenas for later use: the process's resident size only grows after a
burst, though nothing is held. `malloc_trim(0)` returns every free page of every arena. A long-running server calls it
when it goes idle, so its resident size after a load is what it still holds. A no-op where the C library is not
glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        trim = getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc's malloc_trim(0)) -> whether anything was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
