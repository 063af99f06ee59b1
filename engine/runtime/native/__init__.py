"""Our compiled CPU matmul for few rows (engine/runtime/native/matmul.c), built with the system C compiler on first use.

`y = x @ w.T` at 1-64 rows of x is every decode, batched-decode and speculative-verify matmul. OpenBLAS's GEMM
there reads the weight far below memory bandwidth, so the NumPy backend hands those shapes to `matmul_xwt`, an
AVX-512 kernel that reads every weight row from memory once per call (see matmul.c). It is built like Triton builds
its kernels: compiled once with `cc -O3 -fopenmp` into a cache folder keyed by the source's hash, then loaded with
ctypes. Where it cannot be used (no AVX-512, no compiler, TINYLLAMA_NATIVE=0) `status()` says why and the backend
uses NumPy's BLAS, so results never depend on it being there.

Environment: TINYLLAMA_NATIVE=0 turns it off; CC picks the compiler (default `cc`); TINYLLAMA_CACHE the cache
folder (default $XDG_CACHE_HOME/tinyllama-engine or ~/.cache/tinyllama-engine); TINYLLAMA_NUM_THREADS (else
OMP_NUM_THREADS, else OPENBLAS_NUM_THREADS, else the CPUs this process may run on) the kernel's threads.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("matmul.c")
CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp"]


@dataclass(frozen=True)
class NativeStatus:
    """Whether the compiled kernel is in use, and what it is or why not."""

    available: bool
    detail: str  # "avx512, 2 threads, <library path>" or the reason it is not used


def cache_dir() -> Path:
    """The folder compiled kernels are kept in."""
    if os.environ.get("TINYLLAMA_CACHE"):
        return Path(os.environ["TINYLLAMA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tinyllama-engine"


def thread_count() -> int:
    """Threads the kernel runs on: TINYLLAMA_NUM_THREADS, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, else usable CPUs."""
    for var in ("TINYLLAMA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build(source: Path = SOURCE) -> Path:
    """Compile `source` into the cache (once per source text, compiler and flags); returns the library's path.

    Raises RuntimeError with the compiler's message when it fails."""
    compiler = shlex.split(os.environ.get("CC", "cc"))
    text = source.read_bytes()
    key = hashlib.sha256(text + repr((compiler, CFLAGS, os.uname().machine)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(compiler + CFLAGS + ["-o", tmp, str(source)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: concurrent builders each write their own temp file
    except FileNotFoundError as e:
        raise RuntimeError(f"no C compiler ({e.filename})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class _Kernel:
    """The loaded library: matmul_xwt with its argument types."""

    def __init__(self, path: Path, threads: int):
        lib = ctypes.CDLL(str(path))
        size, ptr = ctypes.c_ssize_t, ctypes.c_void_p
        lib.matmul_xwt.argtypes = [ptr, size, ptr, size, ptr, size, size, size, size, ctypes.c_int]
        lib.matmul_xwt.restype = None
        lib.matmul_supported.restype = ctypes.c_int
        self.lib, self.path, self.threads = lib, path, threads


_kernel: _Kernel | None = None
_status: NativeStatus | None = None


def _load() -> None:
    """Build and load the kernel once per process, recording why not where it cannot be used."""
    global _kernel, _status
    if os.environ.get("TINYLLAMA_NATIVE", "1") == "0":
        _status = NativeStatus(False, "off (TINYLLAMA_NATIVE=0)")
        return
    try:
        kernel = _Kernel(build(), thread_count())
    except (RuntimeError, OSError) as e:
        _status = NativeStatus(False, f"not built: {e}")
        return
    if not kernel.lib.matmul_supported():
        _status = NativeStatus(False, "this CPU has no AVX-512")
        return
    _kernel = kernel
    _status = NativeStatus(True, f"avx512, {kernel.threads} threads, {kernel.path}")


def status() -> NativeStatus:
    """Whether `matmul_xwt` is usable in this process (builds the kernel on first call)."""
    if _status is None:
        _load()
    return _status


def kernel_name() -> str:
    """What runs the NumPy backend's matmuls, for logs and benchmark tables: e.g. "native avx512 + openblas SkylakeX"."""
    from engine.runtime.blas import blas_info

    info = blas_info()
    blas = f"{info.get('library') or 'BLAS'} {info.get('kernel') or ''}".strip()
    return f"native avx512 + {blas}" if status().available else blas


def matmul_xwt(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T with the compiled kernel. x: (M, K) float32, w: (N, K) float32 -> (M, N) float32.

    Rows of x and w must be contiguous (any row stride); `status().available` must be true."""
    if not status().available:
        raise RuntimeError(f"native matmul unavailable: {status().detail}")
    (m, k), n = x.shape, w.shape[0]
    if w.shape[1] != k or x.dtype != np.float32 or w.dtype != np.float32:
        raise ValueError(f"matmul_xwt needs float32 x (M, K) and w (N, K); got {x.dtype}{x.shape}, {w.dtype}{w.shape}")
    if x.strides[1] != 4 or w.strides[1] != 4:
        raise ValueError("matmul_xwt needs rows of x and w contiguous")
    if out is None:
        out = np.empty((m, n), dtype=np.float32)
    elif out.shape != (m, n) or out.dtype != np.float32 or out.strides[1] != 4:
        raise ValueError(f"matmul_xwt's out must be float32 ({m}, {n}) with contiguous rows")
    _kernel.lib.matmul_xwt(x.ctypes.data, x.strides[0] // 4, w.ctypes.data, w.strides[0] // 4,
                           out.ctypes.data, out.strides[0] // 4, m, n, k, _kernel.threads)
    return out
