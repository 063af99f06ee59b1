"""Giving freed memory back to the operating system: `release_free_memory`.

glibc's malloc keeps memory that a process freed (a parsed request body, a constraint's compiled grammar, a traced
slice's arrays) in its heaps and per-thread arenas for later use: the process's resident size only grows after a
burst, though nothing is held. `malloc_trim(0)` returns every free page of every arena. A long-running server calls it
when it goes idle, so its resident size after a load is what it still holds. A no-op where the C library is not
glibc.

A server also calls `map_large_blocks` once at start: glibc raises its mmap threshold after a large block is freed
(up to 32 MB), so after one 8 MB request body every later one lands in a heap arena, where the holes it leaves are
not always trimmed; a fixed threshold keeps every block of 4 MB or more in its own mapping, returned on free.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=None)
def _glibc_function(name: str, argtypes: tuple):
    """The C library's function `name` (argument types `argtypes`, returning int), None where there is none: looked
    up once (ctypes.util.find_library runs the linker's tools)."""
    library = ctypes.util.find_library("c")
    try:
        function = getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None
    if function is not None:
        function.argtypes, function.restype = list(argtypes), ctypes.c_int
    return function


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc's malloc_trim(0)) -> whether anything was released."""
    trim = _glibc_function("malloc_trim", (ctypes.c_size_t,))
    return bool(trim(0)) if trim is not None else False


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_blocks(threshold: int = 4 << 20) -> bool:
    """Serve blocks of `threshold` bytes or more from their own mappings, returned to the OS on free (glibc's
    mallopt(M_MMAP_THRESHOLD), which also stops the threshold from rising) -> whether it was set."""
    mallopt = _glibc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) if mallopt is not None else False
