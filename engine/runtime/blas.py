"""Which BLAS NumPy runs on, and choosing OpenBLAS's kernel before NumPy loads it.

NumPy's OpenBLAS picks its CPU kernel once, when it is loaded, from OPENBLAS_CORETYPE or its own detection. On
AVX-512 machines the SkylakeX kernels read [out, in] weights ~1.5x faster than Haswell's, so `engine` asks for them
unless told otherwise: TINYLLAMA_BLAS_KERNEL=auto (default) | keep (leave OPENBLAS_CORETYPE alone) | NAME.
This module must not import NumPy.
"""
from __future__ import annotations

import os
import sys

AVX512_FLAGS = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_openblas_kernel() -> str | None:
    """Set OPENBLAS_CORETYPE for the OpenBLAS NumPy is about to load; returns the kernel asked for (None: left alone)."""
    wish = os.environ.get("TINYLLAMA_BLAS_KERNEL", "auto")
    if "numpy" in sys.modules:
        return None
    # OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) after each call by default, taking the cores the compiled
    # decode kernel (engine.runtime.native) runs on next; 2^4 cycles makes them sleep at once. The user's setting wins.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    if wish == "keep":
        return None
    if wish == "auto":
        if not AVX512_FLAGS <= cpu_flags():
            return None
        wish = "SkylakeX"
    os.environ["OPENBLAS_CORETYPE"] = wish
    return wish


def blas_info() -> dict:
    """The BLAS NumPy uses: library, version, kernel (OpenBLAS 'architecture'), threads."""
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib.get("user_api") == "blas":
            return {
                "library": lib.get("internal_api"),
                "version": lib.get("version"),
                "kernel": lib.get("architecture"),
                "threads": lib.get("num_threads"),
                "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            }
    return {"library": None, "version": None, "kernel": None, "threads": None}
