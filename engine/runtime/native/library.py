"""Loading the kernels: the library's ctypes signatures (`_Library`), the probe of what this CPU runs, and the
process's one state (`status()`, `set_isa`, `require()` for the kernel calls)."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .build import ABI_VERSION, ISAS, build, left_out


@dataclass(frozen=True)
class NativeStatus:
    """Whether the compiled kernels are in use, and which variant or why not."""

    available: bool
    detail: str  # "avx512, 2 threads, <library path>" or the reason it is not used
    isa: str | None = None


def _performance_cores() -> int | None:
    """The performance cores of an Apple Silicon Mac (sysctl hw.perflevel0.physicalcpu), None elsewhere: a split
    matmul waits for its slowest thread, so efficiency cores would set the pace."""
    if sys.platform != "darwin":
        return None
    try:
        done = subprocess.run(["sysctl", "-n", "hw.perflevel0.physicalcpu"], capture_output=True, text=True, timeout=5)
        value = done.stdout.strip()
        return int(value) if done.returncode == 0 and value.isdigit() and int(value) > 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def thread_count() -> int:
    """Threads the kernels run on: TINYLLAMA_NUM_THREADS, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, else the performance
    cores on Apple Silicon, else the CPUs this process may run on."""
    for var in ("TINYLLAMA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(usable, _performance_cores() or usable)


class _Library:
    """The loaded library with its argument types, the variant in use and the thread count."""

    def __init__(self, path: Path, threads: int):
        lib = ctypes.CDLL(str(path))
        size, ptr, i32 = ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_int
        lib.tl_abi_version.restype = i32
        lib.tl_isa_usable.argtypes = [i32]
        lib.tl_isa_usable.restype = i32
        lib.tl_matmul.argtypes = [i32, ptr, size, ptr, size, i32, ptr, size, size, size, size, i32]
        lib.tl_matmul.restype = None
        lib.tl_attention.argtypes = [i32, ptr, size, size, size, size, ptr, ptr, size, size, size, size,
                                     ctypes.c_float, ptr, size, ptr, i32]
        lib.tl_attention.restype = None
        lib.tl_widen.argtypes = [i32, ptr, size, i32, ptr, size, size, size, i32]
        lib.tl_widen.restype = None
        lib.tl_swiglu.argtypes = [i32, ptr, size, ptr, size, size, size, i32]
        lib.tl_swiglu.restype = None
        lib.tl_rms_norm.argtypes = [i32, ptr, size, ptr, size, ptr, ctypes.c_float, ptr, ptr, size, size, size, i32]
        lib.tl_rms_norm.restype = None
        lib.tl_rotary.argtypes = [i32, ptr, size, ptr, ptr, ptr, size, size, size, i32]
        lib.tl_rotary.restype = None
        lib.tl_attention_seqs.argtypes = [i32, ptr, size, size, size, size, size, ptr, ptr, ptr, ptr, ptr, ptr, size,
                                          ctypes.c_float, ptr, size, i32]
        lib.tl_attention_seqs.restype = None
        lib.tl_decoder_layers.argtypes = [i32, ptr, ptr, size, ptr, ptr, size, ptr, size, ptr, ptr, ptr, ptr, ptr,
                                          ptr, ptr, i32]
        lib.tl_decoder_layers.restype = None
        lib.tl_isa_compiled.argtypes = [i32]
        lib.tl_isa_compiled.restype = i32
        lib.tl_qmatmul.argtypes = [i32, ptr, size, ptr, ptr, i32, ptr, size, size, size, size, i32]
        lib.tl_qmatmul.restype = None
        lib.tl_qmatmul_build.argtypes = [i32]
        lib.tl_qmatmul_build.restype = i32
        lib.tl_qmatmul_on.argtypes = [i32, ptr, size, ptr, ptr, i32, ptr, size, size, size, size, i32]
        lib.tl_qmatmul_on.restype = i32
        lib.tl_quantize.argtypes = [i32, ptr, size, size, size, size, ptr, ptr, size, i32]
        lib.tl_quantize.restype = None
        lib.tl_repack_ggml.argtypes = [i32, ptr, size, size, size, ptr, ptr, size, i32]
        lib.tl_repack_ggml.restype = None
        lib.tl_kmatmul_build.argtypes = [i32]
        lib.tl_kmatmul_build.restype = i32
        lib.tl_matmul_parts.argtypes = [i32, ptr, size, ptr, size, ptr, size, size, size, i32]
        lib.tl_matmul_parts.restype = None
        lib.tl_kpack.argtypes = [i32, ptr, size, size, size, ptr, i32]
        lib.tl_kpack.restype = None
        lib.tl_kdequant.argtypes = [i32, ptr, size, ptr, size, ptr, i32]
        lib.tl_kdequant.restype = None
        lib.tl_kquantize.argtypes = [i32, ptr, size, size, size, ptr, ptr, i32]
        lib.tl_kquantize.restype = i32
        lib.tl_kggml_row_bytes.argtypes = [i32, size]
        lib.tl_kggml_row_bytes.restype = size
        self.lib, self.path, self.threads = lib, path, threads
        self.isa = 0
        self.left_out = left_out(path)

    def usable(self) -> list[str]:
        """The variants this CPU can run, most preferred first."""
        return [name for i, name in enumerate(ISAS) if self.lib.tl_isa_usable(i)]


_library: _Library | None = None
_status: NativeStatus | None = None


def _describe(lib: _Library) -> NativeStatus:
    name = ISAS[lib.isa]
    notes = "".join(f"; {isa} left out: {why[:200]}" for isa, why in lib.left_out.items())
    return NativeStatus(True, f"{name}, {lib.threads} threads, {lib.path}{notes}", name)


def _platform_problem() -> str | None:
    """Why this platform cannot build or load the kernels at all, None where it may."""
    if sys.platform in ("emscripten", "wasi"):
        return f"no C compiler can run on this platform ({sys.platform})"
    return None


def _load() -> None:
    """Build and load the kernels once per process, recording why not where they cannot be used: every failure (no
    compiler, a compile error, an unknown platform, a CPU without the features, a library that does not load) ends
    in a status with the reason, never an exception."""
    global _library, _status
    if os.environ.get("TINYLLAMA_NATIVE", "1") == "0":
        _status = NativeStatus(False, "off (TINYLLAMA_NATIVE=0)")
        return
    if problem := _platform_problem():
        _status = NativeStatus(False, problem)
        return
    try:
        path = build()
    except Exception as e:  # noqa: BLE001 -- RuntimeError from the compiler, OSError from the cache, anything else
        _status = NativeStatus(False, f"not built: {e}")
        return
    try:
        lib = _Library(path, thread_count())
        version = lib.lib.tl_abi_version()
        usable = lib.usable()
    except Exception as e:  # noqa: BLE001 -- OSError (not a library for this machine), AttributeError (a symbol)
        _status = NativeStatus(False, f"not loaded: {path}: {e}")
        return
    if version != ABI_VERSION:
        _status = NativeStatus(False, f"{lib.path}: ABI {version}, expected {ABI_VERSION}")
        return
    wish = os.environ.get("TINYLLAMA_NATIVE_ISA", "").strip().lower()
    if wish and wish not in ISAS:
        _status = NativeStatus(False, f"TINYLLAMA_NATIVE_ISA={wish!r} is not one of {', '.join(ISAS)}")
        return
    if wish and wish not in usable:
        _status = NativeStatus(False, f"TINYLLAMA_NATIVE_ISA={wish}: this CPU cannot run it "
                                      f"(usable: {', '.join(usable) or 'none'})")
        return
    if not usable:
        compiled = [isa for i, isa in enumerate(ISAS) if lib.lib.tl_isa_compiled(i)]
        _status = NativeStatus(False, f"this CPU runs none of the compiled variants ({', '.join(compiled) or 'none'})"
                                      + "".join(f"; {isa} left out: {why[:200]}" for isa, why in lib.left_out.items()))
        return
    lib.isa = ISAS.index(wish or usable[0])
    _library, _status = lib, _describe(lib)


def status() -> NativeStatus:
    """Whether the kernels are usable in this process, and which variant runs (builds them on first call)."""
    if _status is None:
        _load()
    return _status


def usable_isas() -> list[str]:
    """The variants this CPU can run (most preferred first); [] where the kernels are not available."""
    return _library.usable() if status().available else []


def set_isa(name: str) -> NativeStatus:
    """Switch this process to variant `name` (avx512, avx2, portable): for tests and benchmarks; returns status()."""
    global _status
    if not status().available:
        raise RuntimeError(f"native kernels unavailable: {status().detail}")
    if name not in _library.usable():
        raise ValueError(f"this CPU cannot run the {name!r} variant (usable: {', '.join(_library.usable())})")
    _library.isa = ISAS.index(name)
    _status = _describe(_library)
    return _status


def _require() -> _Library:
    if not status().available:
        raise RuntimeError(f"native kernels unavailable: {status().detail}")
    return _library
