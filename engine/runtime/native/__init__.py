"""Our compiled CPU kernels (C beside this file), built with the system C compiler on first use.

Two kernels, every one in three instruction-set variants chosen at run time by the CPU's features:
- `matmul(x, w)`: y = x @ w.T for a step's float32 activations against a weight kept in its checkpoint's dtype
  (float32, bfloat16 as uint16 bits, float16), widened exactly in registers before fp32 FMAs (matmul.h). It reads
  each weight row from memory once per call whatever the number of rows of x, and serves every matmul of the NumPy
  backend: decode (1 row), batches and speculative verification (a few rows), prefill (hundreds).
- `attention(q, k, v, start)`: causal grouped-query attention of new queries over one sequence's float32 KV cache,
  one pass over the keys with an online softmax (attention.h), memory O(rows x block).
`DecoderLayers` runs every decoder layer of a pass in one call of these kernels (api.c), in the NumPy backend's order.
Variants: avx512 (x86-64 with AVX-512), avx2 (AVX2 + FMA + F16C: most x86 laptops and desktops), portable (C vector
extensions the compiler maps to NEON on ARM, SSE2 on x86). Threads come from our own pthread pool (pool.c), not
OpenMP, so it builds with Apple's clang too.

Built like Triton builds its kernels: compiled once into a cache folder keyed by the sources' hash, the compiler and
its flags, then loaded with ctypes (which releases the GIL during each call). Each source is its own object, so a
variant the compiler cannot build is left out (named in `status()`) and the others run. Where the kernels cannot be
used at all (no compiler, a compile error, a library that does not load, a CPU that runs no compiled variant,
TINYLLAMA_NATIVE=0) `status()` says why, `fallback_notice()` gives the one stderr line a model load prints, the loader
widens 16-bit weights to float32 and the backend uses NumPy's BLAS and NumPy attention, so results never depend on
it being there. `python -m engine.runtime.native.selftest` builds and runs selftest.c for any target (selftest.py).

Environment: TINYLLAMA_NATIVE=0 turns it off; TINYLLAMA_NATIVE_ISA=avx512|avx2|portable forces a variant (an error in
`status()` if this CPU cannot run it); CC picks the compiler (default `cc`, `gcc` on Windows); TINYLLAMA_CACHE the
cache folder (default $XDG_CACHE_HOME/tinyllama-engine or ~/.cache/tinyllama-engine); TINYLLAMA_NUM_THREADS (else
OMP_NUM_THREADS, else OPENBLAS_NUM_THREADS, else the CPUs this process may run on, on Apple Silicon its performance
cores) the kernels' threads.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
SOURCES = ["api.c", "pool.c", "quantize.c", "kquant_pack.c", "kquant_quantize.c", "variant_avx512.c", "variant_avx2.c", "variant_portable.c"]
HEADERS = ["kernels.h", "pool.h", "matmul.h", "attention.h", "quant.h", "simd_avx512.h", "simd_avx2.h",
           "simd_portable.h", "kquant.h", "kquant_layout.h", "kquant_simd.h"]
# Never -ffast-math / -Ofast: GCC then links code that sets flush-to-zero for the whole process (subnormal weights
# and activations would become 0), and it may reorder the sums that make results reproducible.
CFLAGS = ["-O3", "-std=gnu11", "-fPIC", "-pthread"]
# On Windows (MinGW-w64) the DLL takes winpthreads and libgcc in statically: Python does not search PATH for a DLL's
# own dependencies, so a libwinpthread-1.dll beside the compiler would not be found when it loads.
LDFLAGS_WINDOWS = ["-static"]
LDFLAGS = ["-shared", "-pthread"] + (LDFLAGS_WINDOWS if sys.platform == "win32" else [])
LIBS = ["-lm"]
ABI_VERSION = 8
ISAS = ("avx512", "avx2", "portable")  # the enum order of kernels.h, most preferred first
VARIANT_SOURCES = {isa: f"variant_{isa}.c" for isa in ISAS}
WEIGHT_TYPES = {np.dtype(np.float32): 0, np.dtype(np.uint16): 1, np.dtype(np.float16): 2}  # uint16: bf16 bits
# What the NumPy fallback costs, said once when a model loads without the kernels: a 16-bit checkpoint's weights
# are widened to float32 (docs/benchmarks.md: 2.51 vs 4.71 GB, 1.94x the batch-1 decode rate in 16 bits).
FALLBACK_COST = "using NumPy, fp32 weights, ~2x slower decode, 2x memory"
FALLBACK_COST_FP32 = "using NumPy (BLAS matmuls, NumPy attention; a float32 checkpoint's weights take no more memory)"
QUANT_TYPES = {"int8": 3, "int4": 4}  # quantized weights (engine.runtime.quant.QuantMatrix), kernels.h's W_Q8 / W_Q4
QMATMUL_BUILDS = ("portable", "avx2", "avx512 (vpmaddwd)", "avx512 VNNI (vpdpbusd)")
KMATMUL_BUILDS = ("portable", "avx2", "avx512 (vpmaddubsw)", "avx512 VNNI (vpdpbusd)")
# llama.cpp's block formats (engine.runtime.kquant.KQuantMatrix.kind), kernels.h's W_Q4_1 .. W_Q6_K
KQUANT_TYPES = {"q4_1": 5, "q5_0": 6, "q5_1": 7, "q2_k": 8, "q3_k": 9, "q4_k": 10, "q5_k": 11, "q6_k": 12}


@dataclass(frozen=True)
class NativeStatus:
    """Whether the compiled kernels are in use, and which variant or why not."""

    available: bool
    detail: str  # "avx512, 2 threads, <library path>" or the reason it is not used
    isa: str | None = None


def cache_dir() -> Path:
    """The folder compiled kernels are kept in."""
    if os.environ.get("TINYLLAMA_CACHE"):
        return Path(os.environ["TINYLLAMA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tinyllama-engine"


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


def compiler() -> list[str]:
    """The C compiler command: $CC, else `cc` (`gcc` on Windows, where MinGW-w64 has no `cc`)."""
    return shlex.split(os.environ.get("CC") or ("gcc" if sys.platform == "win32" else "cc"))


def library_path(folder: Path = HERE) -> Path:
    """Where build() puts (or finds) the library for the sources in `folder`, the compiler ($CC) and its flags."""
    compiler_ = compiler()
    digest = hashlib.sha256(repr((compiler_, CFLAGS, LDFLAGS, LIBS, platform.machine(), sys.platform)).encode())
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    suffix = ".dll" if sys.platform in ("win32", "cygwin") else ".so"
    return cache_dir() / f"tinyllama-kernels-{digest.hexdigest()[:16]}{suffix}"


def left_out(library: Path) -> dict[str, str]:
    """The variants build() left out of `library` because they did not compile -> {variant: compiler message}."""
    notes = library.with_suffix(".left-out")
    if not notes.exists():
        return {}
    lines = notes.read_text(encoding="utf-8").splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def _run(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(job: subprocess.Popen, compiler: list[str], what: str) -> str | None:
    """Wait for a compiler run -> None, or its failure with the end of its messages."""
    out, _ = job.communicate()
    if job.returncode == 0:
        return None
    message = out.strip()[-500:]
    return f"{' '.join(compiler)} failed on {what} (exit status {job.returncode}){': ' + message if message else ''}"


def compile_objects(compiler: list[str], folder: Path, work: str, flags: list[str] = ()) -> tuple[list[str], dict]:
    """Compile the library's sources in `folder` to objects in `work` (in parallel, `flags` added to CFLAGS) ->
    (object paths, {variant left out: compiler message}). A variant that does not compile is left out (api.c is told
    with -DTL_WITHOUT_<VARIANT>); RuntimeError when a shared source fails or no variant compiles, FileNotFoundError
    when there is no compiler."""
    def start(source: str, defines=()):
        obj = os.path.join(work, source.replace(".c", ".o"))
        return obj, _run(compiler + CFLAGS + list(flags) + list(defines) + ["-c", str(folder / source), "-o", obj])

    shared = [name for name in SOURCES if name != "api.c" and name not in VARIANT_SOURCES.values()]
    jobs = {name: start(name) for name in shared + list(VARIANT_SOURCES.values())}
    errors = {name: _finish(job, compiler, name) for name, (_, job) in jobs.items()}
    for name in shared:
        if errors[name]:
            raise RuntimeError(errors[name])
    skipped = {isa: errors[src] for isa, src in VARIANT_SOURCES.items() if errors[src]}
    if len(skipped) == len(ISAS):
        raise RuntimeError(skipped["portable"])
    api, job = start("api.c", [f"-DTL_WITHOUT_{isa.upper()}" for isa in skipped])
    if error := _finish(job, compiler, "api.c"):
        raise RuntimeError(error)
    left_out_sources = {VARIANT_SOURCES[isa] for isa in skipped}
    return [api] + [obj for name, (obj, _) in jobs.items() if name not in left_out_sources], skipped


def build(folder: Path = HERE) -> Path:
    """Compile the kernels in `folder` into the cache (once per source text, compiler and flags) -> the library path.

    Each source is its own object (compile_objects): a variant this compiler cannot build (an old compiler without a
    builtin or an instruction set) is left out, noted beside the library (left_out()), and the others stay.
    Raises RuntimeError with the compiler's message when nothing usable can be built."""
    cc = compiler()
    target = library_path(folder)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
        try:
            objects, skipped = compile_objects(cc, folder, work)
            tmp = os.path.join(work, "lib" + target.suffix)
            if error := _finish(_run(cc + LDFLAGS + ["-o", tmp] + objects + LIBS), cc, "linking"):
                raise RuntimeError(error)
        except FileNotFoundError as e:
            raise RuntimeError(f"no C compiler ({e.filename})") from None
        if skipped:  # before the library appears: whoever loads it finds the notes
            tmp_notes = os.path.join(work, "notes")
            Path(tmp_notes).write_text("".join(f"{isa}: {' '.join(msg.split())}\n" for isa, msg in skipped.items()),
                                       encoding="utf-8")
            os.replace(tmp_notes, target.with_suffix(".left-out"))
        os.replace(tmp, target)  # atomic: concurrent builders each write their own temp folder
    return target


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


_noticed = False


def fallback_notice(stored_dtype: str = "bfloat16") -> str | None:
    """The one line a model load prints on stderr when the kernels are unavailable, the first time only (None after,
    when they are available, or when TINYLLAMA_NATIVE=0 turned them off on purpose): why, and what it costs for a
    checkpoint stored as `stored_dtype` (a 16-bit one is widened to float32: twice the memory and the bytes read per
    decoded token)."""
    global _noticed
    s = status()
    if s.available or _noticed or os.environ.get("TINYLLAMA_NATIVE", "1") == "0":
        return None
    _noticed = True
    reason = " ".join(s.detail.split())
    reason = reason if len(reason) <= 300 else reason[:297] + "..."
    cost = FALLBACK_COST if stored_dtype != "float32" else FALLBACK_COST_FP32
    return f"tinyllama: compiled kernels unavailable ({reason}): {cost}"


def status() -> NativeStatus:
    """Whether the kernels are usable in this process, and which variant runs (builds them on first call)."""
    if _status is None:
        _load()
    return _status


def summary() -> dict:
    """The kernels' state as JSON-ready data for reports (`tinyllama check --json`, bench): available, the variant
    (None without), the reason they are not used ("" when they are), the detail line and the threads."""
    s = status()
    return {"available": s.available, "variant": s.isa, "reason": "" if s.available else s.detail,
            "detail": s.detail, "threads": thread_count()}


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


def _rows_contiguous(a: np.ndarray) -> bool:
    return a.ndim == 2 and (a.shape[1] <= 1 or a.strides[1] == a.itemsize) and a.strides[0] % a.itemsize == 0


def matmul_xwt(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T. x: (M, K) float32; w: (N, K) float32, uint16 (bfloat16 bits) or float16 -> (M, N) float32.

    Rows of x, w and out must be contiguous (any row stride); `status().available` must be true."""
    lib = _require()
    wtype = WEIGHT_TYPES.get(w.dtype)
    if x.dtype != np.float32 or wtype is None or x.ndim != 2 or w.ndim != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"matmul_xwt needs float32 x (M, K) and a float32/bfloat16/float16 w (N, K); got "
                         f"{x.dtype}{x.shape}, {w.dtype}{w.shape}")
    if not _rows_contiguous(x) or not _rows_contiguous(w):
        raise ValueError("matmul_xwt needs rows of x and w contiguous")
    (m, k), n = x.shape, w.shape[0]
    if out is None:
        out = np.empty((m, n), dtype=np.float32)
    elif out.shape != (m, n) or out.dtype != np.float32 or not _rows_contiguous(out):
        raise ValueError(f"matmul_xwt's out must be float32 ({m}, {n}) with contiguous rows")
    lib.lib.tl_matmul(lib.isa, x.ctypes.data, x.strides[0] // 4, w.ctypes.data, w.strides[0] // w.itemsize, wtype,
                      out.ctypes.data, out.strides[0] // 4, m, n, k, lib.threads)
    return out


def qmatmul_build() -> str:
    """Which build of the quantized matmul the variant in use runs (e.g. "avx512 VNNI (vpdpwssd)")."""
    lib = _require()
    return QMATMUL_BUILDS[lib.lib.tl_qmatmul_build(lib.isa)]


def quantize_into(m, start: int, w: np.ndarray) -> None:
    """Quantize the float32 rows w (n, K) into rows start..start+n of the QuantMatrix m (quantize.c: the arithmetic
    of engine.runtime.quant.quantize_groups), on the kernels' threads."""
    lib = _require()
    kind = QUANT_TYPES.get(m.kind)
    if w.dtype != np.float32 or w.ndim != 2 or w.shape[1] != m.shape[1] or not _rows_contiguous(w) \
            or start < 0 or start + w.shape[0] > m.shape[0] or not m.data.flags.c_contiguous:
        raise ValueError(f"quantize_into: rows {w.dtype}{w.shape} at {start} do not fit {m.kind}{m.shape}")
    lib.lib.tl_quantize(kind, w.ctypes.data, w.strides[0] // 4, w.shape[0], w.shape[1], start, m.data.ctypes.data,
                        m.scales.ctypes.data, m.groups, lib.threads)


GGML_BLOCK_BYTES = {"int8": 34, "int4": 18}  # Q8_0's and Q4_0's blocks of 32 weights


def repack_ggml_into(m, start: int, blocks: np.ndarray) -> None:
    """Rows start..start+n of the QuantMatrix m (int8 | int4) from a GGUF file's Q8_0 | Q4_0 rows: blocks uint8
    (n, groups * 34 | 18) with contiguous rows (quantize.c: the file's scales and integers moved into the layout,
    exactly), on the kernels' threads."""
    lib = _require()
    kind, row_bytes = QUANT_TYPES.get(m.kind), m.groups * GGML_BLOCK_BYTES.get(m.kind, 0)
    if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != row_bytes or blocks.strides[1] != 1 \
            or start < 0 or start + blocks.shape[0] > m.shape[0] or not m.data.flags.c_contiguous \
            or not m.scales.flags.c_contiguous or m.shape[1] != m.padded_cols:
        raise ValueError(f"repack_ggml_into: rows {blocks.dtype}{blocks.shape} at {start} do not fit "
                         f"{m.kind}{m.shape}")
    lib.lib.tl_repack_ggml(kind, blocks.ctypes.data, blocks.strides[0], blocks.shape[0], start, m.data.ctypes.data,
                           m.scales.ctypes.data, m.groups, lib.threads)


def qmatmul_xwt(x: np.ndarray, w, out: np.ndarray | None = None, build: str | None = None) -> np.ndarray:
    """y = x @ W.T for x (M, K) float32 (contiguous rows) and a quantized W (N, K) (engine.runtime.quant.QuantMatrix,
    int8 or int4) -> (M, N) float32. Activations are rounded to int16 per group of 32 inside (quant.h). build: one of
    QMATMUL_BUILDS to run instead of the variant's own (the tests compare them; ValueError where it cannot run)."""
    lib = _require()
    (n, k), kind = w.shape, QUANT_TYPES.get(w.kind)
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != k or not _rows_contiguous(x) or kind is None \
            or not w.data.flags.c_contiguous or not w.scales.flags.c_contiguous:
        raise ValueError(f"qmatmul_xwt needs float32 x (M, {k}) with contiguous rows; got {x.dtype}{x.shape}")
    m = x.shape[0]
    if out is None:
        out = np.empty((m, n), dtype=np.float32)
    elif out.shape != (m, n) or out.dtype != np.float32 or not _rows_contiguous(out):
        raise ValueError(f"qmatmul_xwt's out must be float32 ({m}, {n}) with contiguous rows")
    args = (x.ctypes.data, x.strides[0] // 4, w.data.ctypes.data, w.scales.ctypes.data, kind, out.ctypes.data,
            out.strides[0] // 4, m, n, k, lib.threads)
    if build is None:
        lib.lib.tl_qmatmul(lib.isa, *args)
    elif build not in QMATMUL_BUILDS or lib.lib.tl_qmatmul_on(QMATMUL_BUILDS.index(build), *args) != 0:
        raise ValueError(f"quantized matmul build {build!r} cannot run here (usable: {', '.join(qmatmul_builds())})")
    return out


def qmatmul_builds() -> list[str]:
    """The builds of the quantized matmul this CPU runs (QMATMUL_BUILDS' names), whichever the dispatch picks."""
    lib = _require()
    x, data, scales = np.zeros(32, np.float32), np.zeros(512, np.uint8), np.zeros(16, np.uint16)  # one int8 block
    out = np.empty(1, dtype=np.float32)
    return [name for i, name in enumerate(QMATMUL_BUILDS)
            if lib.lib.tl_qmatmul_on(i, x.ctypes.data, 32, data.ctypes.data, scales.ctypes.data, QUANT_TYPES["int8"],
                                     out.ctypes.data, 1, 1, 1, 32, 1) == 0]


def widen_into(w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (N, K) float32 = w (N, K) uint16 (bf16 bits) or float16, widened exactly on the kernels' threads."""
    lib = _require()
    wtype = WEIGHT_TYPES.get(w.dtype)
    if wtype not in (1, 2) or out.dtype != np.float32 or out.shape != w.shape or not _rows_contiguous(w) \
            or not _rows_contiguous(out):
        raise ValueError(f"widen_into needs a 16-bit w and a float32 out of its shape; got {w.dtype}{w.shape}, "
                         f"{out.dtype}{out.shape}")
    lib.lib.tl_widen(lib.isa, w.ctypes.data, w.strides[0] // w.itemsize, wtype, out.ctypes.data,
                     out.strides[0] // 4, w.shape[0], w.shape[1], lib.threads)
    return out


def swiglu(gate_up: np.ndarray) -> np.ndarray:
    """SwiGLU with the compiled kernel. gate_up: (N, 2 * I) float32, gate columns first -> (N, I) float32,
    silu(gate) * up with silu(x) = x / (1 + e^-x) (a vectorised exp within 2 ulp of NumPy's)."""
    lib = _require()
    if gate_up.dtype != np.float32 or gate_up.ndim != 2 or gate_up.shape[1] % 2 or not _rows_contiguous(gate_up):
        raise ValueError(f"swiglu needs a float32 (N, 2I) array with contiguous rows, got {gate_up.dtype}{gate_up.shape}")
    m, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = np.empty((m, inter), dtype=np.float32)
    lib.lib.tl_swiglu(lib.isa, gate_up.ctypes.data, gate_up.strides[0] // 4, out.ctypes.data, inter, m, inter,
                      lib.threads)
    return out


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, residual: np.ndarray | None = None):
    """RMSNorm with the compiled kernel, the operations of engine.runtime.layers.rms_norm. x, residual: (N, H)
    float32 with contiguous rows; weight: (H,) float32 -> h (N, H), or with `residual` (x + residual, h): the residual
    add and the norm in one pass."""
    lib = _require()
    m, hidden = x.shape
    if x.dtype != np.float32 or weight.dtype != np.float32 or weight.shape != (hidden,) or not _rows_contiguous(x) \
            or (residual is not None and (residual.shape != x.shape or residual.dtype != np.float32
                                          or not _rows_contiguous(residual))):
        raise ValueError("rms_norm needs float32 x (N, H), weight (H,) and residual like x, with contiguous rows")
    h = np.empty((m, hidden), dtype=np.float32)
    summed = np.empty((m, hidden), dtype=np.float32) if residual is not None else None
    lib.lib.tl_rms_norm(lib.isa, x.ctypes.data, x.strides[0] // 4, None if residual is None else residual.ctypes.data,
                        0 if residual is None else residual.strides[0] // 4, np.ascontiguousarray(weight).ctypes.data,
                        float(eps), None if summed is None else summed.ctypes.data, h.ctypes.data, hidden, m, hidden,
                        lib.threads)
    return h if residual is None else (summed, h)


def rotary_(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, heads: int,
            head_dim: int) -> None:
    """The rotary embedding in place on the first `heads` heads of each row of x (N, >= heads * head_dim) float32
    (rows contiguous), row n at positions[n]; cos, sin: (positions, head_dim) float32 tables (HF's halves)."""
    lib = _require()
    pos = np.ascontiguousarray(positions, dtype=np.int64)
    if (x.dtype != np.float32 or not _rows_contiguous(x) or x.shape[1] < heads * head_dim or head_dim % 2
            or cos.dtype != np.float32 or sin.dtype != np.float32 or not cos.flags.c_contiguous
            or not sin.flags.c_contiguous or cos.shape[1] != head_dim or pos.shape != (x.shape[0],)
            or (pos.size and (pos.min() < 0 or pos.max() >= cos.shape[0]))):
        raise ValueError("rotary_ needs a float32 x with contiguous rows, positions inside the tables")
    lib.lib.tl_rotary(lib.isa, x.ctypes.data, x.strides[0] // 4, pos.ctypes.data, cos.ctypes.data, sin.ctypes.data,
                      x.shape[0], heads, head_dim, lib.threads)


ATTENTION_MAX_HEAD_DIM = 512


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int, out: np.ndarray | None = None,
              return_probs: bool = False):
    """Causal GQA attention with the compiled kernel; the arguments and result of engine.runtime.layers.attention.

    q: (T, n_heads, head_dim) float32 at positions start_pos.. ; k, v: (n_kv_heads, L, head_dim) float32 views with
    contiguous rows (a KV cache layer), L == start_pos + T when return_probs, else >= -> (T, n_heads * head_dim)
    float32, and with return_probs the post-softmax probabilities (n_heads, T, start_pos + T) float32 (exact zeros
    above the diagonal; the output is the same bits either way)."""
    lib = _require()
    t, n_heads, head_dim = q.shape
    n_kv, length, kd = k.shape
    if (q.dtype != np.float32 or k.dtype != np.float32 or v.dtype != np.float32 or k.shape != v.shape
            or kd != head_dim or n_heads % n_kv or length < start_pos + t or head_dim > ATTENTION_MAX_HEAD_DIM):
        raise ValueError(f"attention: q {q.dtype}{q.shape}, k {k.dtype}{k.shape}, v {v.dtype}{v.shape}, "
                         f"start {start_pos} do not fit")
    if k.strides != v.strides or k.strides[2] != 4 or k.strides[1] % 4 or k.strides[0] % 4:
        raise ValueError("attention: k and v need contiguous rows and the same strides")
    if q.strides[2] != 4 or q.strides[1] != 4 * head_dim:
        q = np.ascontiguousarray(q)
    if out is None:
        out = np.empty((t, n_heads * head_dim), dtype=np.float32)
    probs = np.empty((n_heads, t, start_pos + t), dtype=np.float32) if return_probs else None
    lib.lib.tl_attention(lib.isa, q.ctypes.data, q.strides[0] // 4, t, n_heads, head_dim, k.ctypes.data,
                         v.ctypes.data, k.strides[0] // 4, k.strides[1] // 4, n_kv, start_pos,
                         float(1.0 / np.sqrt(head_dim)), out.ctypes.data, out.strides[0] // 4,
                         None if probs is None else probs.ctypes.data, lib.threads)
    return (out, probs) if return_probs else out


def kmatmul_build() -> str:
    """Which build of the block-format matmul (kquant.h) the variant in use runs (e.g. "avx512 VNNI (vpdpbusd)")."""
    lib = _require()
    return KMATMUL_BUILDS[lib.lib.tl_kmatmul_build(lib.isa)]


def kpack(kind: str, rows: np.ndarray, k: int, start: int, dst: np.ndarray) -> None:
    """Rows start..start+n of a block-format matrix of `kind` and k columns, held in the kernel layout `dst` (uint8,
    C-contiguous, sized and zeroed for all its rows), from ggml's blocks of those rows: `rows` uint8 (n, ggml's row
    bytes), C-contiguous (kquant_pack.c's tl_kpack)."""
    lib = _require()
    code = KQUANT_TYPES[kind]
    n = rows.shape[0]
    if (rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != lib.lib.tl_kggml_row_bytes(code, k)
            or not rows.flags.c_contiguous or dst.dtype != np.uint8 or not dst.flags.c_contiguous or start < 0
            or (start + n + 15) // 16 > dst.shape[0]):
        raise ValueError(f"kpack: {rows.dtype}{rows.shape} at row {start} does not fit {kind} of {k} columns")
    lib.lib.tl_kpack(code, rows.ctypes.data, n, k, start, dst.ctypes.data, lib.threads)


def kdequant(kind: str, data: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """Rows idx of a block-format matrix held in the kernel layout `data` -> float32 (len(idx), k): the file's values,
    computed as gguf.quants.dequantize computes them."""
    lib = _require()
    rows = np.ascontiguousarray(idx, dtype=np.int64)
    if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() // 16 >= data.shape[0])) \
            or not data.flags.c_contiguous:
        raise ValueError(f"kdequant: rows out of range for a {kind} matrix of {data.shape[0]} row blocks")
    out = np.empty((rows.size, k), dtype=np.float32)
    lib.lib.tl_kdequant(KQUANT_TYPES[kind], data.ctypes.data, k, rows.ctypes.data, rows.size, out.ctypes.data,
                        lib.threads)
    return out


def kquantize(kind: str, w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows w (n, K), K whole blocks of `kind` ("q4_k", "q5_k", "q6_k", "q5_0") -> ggml's blocks as uint8
    (n, row bytes): our quantizer (kquant_quantize.c), weighted by `importance` (K,) float32 > 0 per column."""
    lib = _require()
    n, k = w.shape
    code = KQUANT_TYPES[kind]
    if w.dtype != np.float32 or not _rows_contiguous(w):
        raise ValueError(f"kquantize: {w.dtype}{w.shape} is not float32 rows")
    iw = None
    if importance is not None:
        iw = np.ascontiguousarray(importance, dtype=np.float32)
        if iw.shape != (k,):
            raise ValueError(f"kquantize: importance of shape {iw.shape}, expected ({k},)")
    out = np.empty((n, lib.lib.tl_kggml_row_bytes(code, k)), dtype=np.uint8)
    if lib.lib.tl_kquantize(code, w.ctypes.data, w.strides[0] // 4, n, k, None if iw is None else iw.ctypes.data,
                            out.ctypes.data, lib.threads) != 0:
        raise ValueError(f"kquantize: no quantizer for {kind}")
    return out


class _WPart(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_longlong), ("rows", ctypes.c_longlong), ("data", ctypes.c_void_p),
                ("scales", ctypes.c_void_p)]


def weight_parts(w) -> tuple[ctypes.Array, list]:
    """A weight matrix as kernels.h's tl_wpart array -> (the array, the arrays it points into: keep them alive).
    w: a block-format matrix (engine.runtime.kquant.KQuantMatrix in the kernel layout), rows of parts (an object with
    `parts`: engine.runtime.ggml_formats.RowStack), a QuantMatrix (int8 / int4) or an ndarray (float32, uint16 bf16
    bits, float16) with C-contiguous rows. ValueError for anything else."""
    pieces = list(w.parts) if hasattr(w, "parts") else [w]
    parts, keep = [], []
    for p in pieces:
        kind = getattr(p, "kind", None)
        if kind in KQUANT_TYPES:
            if getattr(p, "layout", None) != "kernel" or not p.data.flags.c_contiguous:
                raise ValueError(f"a {kind} matrix not in the kernel layout")
            parts.append(_WPart(KQUANT_TYPES[kind], p.shape[0], p.data.ctypes.data, None))
            keep.append(p.data)
        elif kind in QUANT_TYPES:
            if not p.data.flags.c_contiguous or not p.scales.flags.c_contiguous:
                raise ValueError(f"a {kind} matrix with non-contiguous arrays")
            parts.append(_WPart(QUANT_TYPES[kind], p.shape[0], p.data.ctypes.data, p.scales.ctypes.data))
            keep += [p.data, p.scales]
        elif isinstance(p, np.ndarray) and p.ndim == 2 and p.dtype in WEIGHT_TYPES and p.flags.c_contiguous:
            parts.append(_WPart(WEIGHT_TYPES[p.dtype], p.shape[0], p.ctypes.data, None))
            keep.append(p)
        else:
            raise ValueError(f"weight_parts: cannot take a part {type(p).__name__} {getattr(p, 'dtype', '')}")
    return (_WPart * len(parts))(*parts), keep


def matmul_parts(x: np.ndarray, w, out: np.ndarray | None = None) -> np.ndarray:
    """y = x @ W.T for x (M, K) float32 (contiguous rows) and W (N, K) as weight_parts takes it -> (M, N) float32:
    every block-format part on kquant.h's kernel (activations rounded to int16 per group of 32, once per run of such
    parts), the others on their own kernels, in one call."""
    lib = _require()
    n, k = w.shape
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != k or not _rows_contiguous(x):
        raise ValueError(f"matmul_parts needs float32 x (M, {k}) with contiguous rows; got {x.dtype}{x.shape}")
    m = x.shape[0]
    if out is None:
        out = np.empty((m, n), dtype=np.float32)
    elif out.shape != (m, n) or out.dtype != np.float32 or not _rows_contiguous(out):
        raise ValueError(f"matmul_parts's out must be float32 ({m}, {n}) with contiguous rows")
    cached = getattr(w, "_cparts", None)  # built once per matrix (the arrays it points into never change)
    if cached is None:
        cached = weight_parts(w)
        try:
            object.__setattr__(w, "_cparts", cached)
        except AttributeError:
            pass
    parts, keep = cached
    lib.lib.tl_matmul_parts(lib.isa, x.ctypes.data, x.strides[0] // 4, parts, len(parts), out.ctypes.data,
                            out.strides[0] // 4, m, k, lib.threads)
    return out


class StepAttention:
    """The attention of one forward pass's sequences, one kernel call per layer for all of them (rather than a call
    per sequence): each sequence's new keys and values are stored in its cache and its queries attend over it.

    caches: per sequence its KVCache-like storage k, v: (layers, n_kv_heads, capacity, head_dim) float32, C-contiguous
    (room reserved for the new tokens); starts: positions of each sequence's first new token; counts: its new tokens,
    stacked in that order in the pass's rows. The arrays the kernel reads are built once here, for every layer."""

    def __init__(self, caches, starts: list[int], counts: list[int], n_heads: int, head_dim: int):
        self.lib = _require()
        ks, vs = [c.k for c in caches], [c.v for c in caches]
        for k, v in zip(ks, vs):
            if (k.dtype != np.float32 or v.shape != k.shape or k.ndim != 4 or k.shape[3] != head_dim
                    or not k.flags.c_contiguous or not v.flags.c_contiguous or n_heads % k.shape[1]
                    or head_dim > ATTENTION_MAX_HEAD_DIM):
                raise ValueError(f"StepAttention: a cache of {k.dtype}{k.shape} does not fit {n_heads} heads of "
                                 f"{head_dim}")
        self.n_heads, self.head_dim, self.n_kv = n_heads, head_dim, ks[0].shape[1]
        self.rows = np.cumsum([0] + list(counts[:-1]), dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.asarray(starts, dtype=np.int64)
        if np.any(self.starts + self.counts > [k.shape[2] for k in ks]):
            raise ValueError("StepAttention: a cache has no room reserved for its new tokens")
        self.capacity = np.asarray([k.shape[2] for k in ks], dtype=np.int64)
        self.k_ptrs = (ctypes.c_void_p * len(ks))(*[k.ctypes.data for k in ks])
        self.v_ptrs = (ctypes.c_void_p * len(vs))(*[v.ctypes.data for v in vs])
        self._keep = (ks, vs)  # the storage the pointers point into stays alive with this object
        self.total = int(self.counts.sum())
        self.scale = float(np.float32(1.0 / np.sqrt(head_dim)))

    def __call__(self, qkv: np.ndarray, layer: int) -> np.ndarray:
        """qkv: (rows, (n_heads + 2 n_kv) * head_dim) float32, rotated, contiguous rows -> (rows, n_heads * head_dim)
        float32, after storing the rows' keys and values at `layer`."""
        width = (self.n_heads + 2 * self.n_kv) * self.head_dim
        if qkv.dtype != np.float32 or qkv.shape != (self.total, width) or not _rows_contiguous(qkv):
            raise ValueError(f"StepAttention: qkv {qkv.dtype}{qkv.shape}, expected ({self.total}, {width}) float32")
        out = np.empty((self.total, self.n_heads * self.head_dim), dtype=np.float32)
        self.lib.lib.tl_attention_seqs(self.lib.isa, qkv.ctypes.data, qkv.strides[0] // 4, self.n_heads, self.n_kv,
                                       self.head_dim, len(self.counts), self.rows.ctypes.data, self.counts.ctypes.data,
                                       self.starts.ctypes.data, self.k_ptrs, self.v_ptrs, self.capacity.ctypes.data,
                                       layer, self.scale, out.ctypes.data, out.strides[0] // 4, self.lib.threads)
        return out


class _Layer(ctypes.Structure):
    _fields_ = [("wqkv", ctypes.c_void_p), ("wo", ctypes.c_void_p), ("w_gate_up", ctypes.c_void_p),
                ("w_down", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("next_norm", ctypes.c_void_p),
                ("wqkv_s", ctypes.c_void_p), ("wo_s", ctypes.c_void_p), ("w_gate_up_s", ctypes.c_void_p),
                ("w_down_s", ctypes.c_void_p), ("parts", ctypes.c_void_p * 4), ("n_parts", ctypes.c_longlong * 4)]


class _Stack(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_longlong), ("inter", ctypes.c_longlong), ("n_heads", ctypes.c_longlong),
                ("n_kv_heads", ctypes.c_longlong), ("head_dim", ctypes.c_longlong), ("wtype", ctypes.c_longlong),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p)]


class DecoderLayers:
    """Every decoder layer of a forward pass in ONE kernel call (tl_decoder_layers in api.c): the same kernels in the
    same order as the NumPy backend's layer loop, so the same bits, without ~9 Python calls per layer (about 2-3 ms
    of a TinyLlama batch-1 step). For passes whose every matmul runs on the kernels.

    layers: per layer (wqkv, wo, w_gate_up, w_down, mlp_norm, next_norm): matrices (out, in) with contiguous rows in
    one dtype (float32, uint16 bf16 bits or float16), or QuantMatrix of one kind (int8, int4), norms (H,) float32,
    next_norm the next layer's input norm (the final norm after the last); cos, sin: (positions, head_dim) float32
    tables."""

    def __init__(self, layers: list[tuple], hidden: int, inter: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 eps: float, cos: np.ndarray, sin: np.ndarray):
        self.lib = _require()
        q, kv = n_heads * head_dim, n_kv_heads * head_dim
        shapes = [(q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter), (hidden,), (hidden,)]
        if self._mixed(layers):  # matrices in llama.cpp's block formats, or of more than one format: as parts
            self._parts_stack(layers, shapes)
        else:
            self._uniform_stack(layers, shapes)
        if cos.dtype != np.float32 or sin.dtype != np.float32 or not cos.flags.c_contiguous \
                or not sin.flags.c_contiguous or cos.shape[1] != head_dim or head_dim > ATTENTION_MAX_HEAD_DIM:
            raise ValueError("DecoderLayers: unsupported rotary tables")
        self.stack = _Stack(hidden, inter, n_heads, n_kv_heads, head_dim, self.wtype, float(eps),
                            float(np.float32(1.0 / np.sqrt(head_dim))), cos.ctypes.data, sin.ctypes.data)
        self._keep = (layers, cos, sin, self._keep_parts)  # what the pointers point into stays alive with this object
        self.width = q + 2 * kv + q + hidden + 3 * inter  # scratch floats per row
        self.positions = cos.shape[0]

    @staticmethod
    def _mixed(layers: list[tuple]) -> bool:
        """Whether the stack's matrices need the parts path: a block format (or rows of parts), or not one kind."""
        matrices = [a for layer in layers for a in layer[:4]]
        if any(hasattr(a, "parts") or getattr(a, "kind", None) in KQUANT_TYPES for a in matrices):
            return True
        kinds = {getattr(a, "kind", None) if not isinstance(a, np.ndarray) else a.dtype for a in matrices}
        return len(kinds) > 1

    def _parts_stack(self, layers: list[tuple], shapes: list[tuple]) -> None:
        """Every matrix as parts (kernels.h's tl_wpart; api.c's tl_matmul_parts runs them), norms as pointers."""
        built, self._keep_parts = [], []
        for layer in layers:
            for a, shape in zip(layer, shapes):
                if tuple(a.shape) != shape or (len(shape) == 1 and (a.dtype != np.float32 or not a.flags.c_contiguous)):
                    raise ValueError(f"DecoderLayers: a weight of shape {tuple(a.shape)} does not fit {shape}")
            arrays = [weight_parts(a) for a in layer[:4]]
            self._keep_parts += arrays
            parts = (ctypes.c_void_p * 4)(*[ctypes.cast(arr, ctypes.c_void_p).value for arr, _ in arrays])
            counts = (ctypes.c_longlong * 4)(*[len(arr) for arr, _ in arrays])
            built.append(_Layer(None, None, None, None, layer[4].ctypes.data, layer[5].ctypes.data, None, None, None,
                                None, parts, counts))
        self.layers = (_Layer * len(layers))(*built)
        self.wtype = 0

    def _uniform_stack(self, layers: list[tuple], shapes: list[tuple]) -> None:
        """Every matrix of one dtype (float32, bf16 bits, float16) or one quantized kind (int8, int4)."""
        quantized = getattr(layers[0][0], "kind", None)  # an engine.runtime.quant.QuantMatrix stack
        wtype = QUANT_TYPES.get(quantized) if quantized else WEIGHT_TYPES.get(layers[0][0].dtype)
        self._keep_parts = []
        for layer in layers:
            for a, shape in zip(layer, shapes):
                if quantized and len(shape) == 2:
                    if getattr(a, "kind", None) != quantized or tuple(a.shape) != shape \
                            or not a.data.flags.c_contiguous or not a.scales.flags.c_contiguous:
                        raise ValueError(f"DecoderLayers: a weight {type(a).__name__} {getattr(a, 'shape', '')} "
                                         f"does not fit {quantized} {shape}")
                    continue
                dtype = np.float32 if len(shape) == 1 else layer[0].dtype
                if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype or not a.flags.c_contiguous:
                    raise ValueError(f"DecoderLayers: a weight of {getattr(a, 'dtype', type(a))}"
                                     f"{getattr(a, 'shape', '')} does not fit {shape}")
        if wtype is None:
            raise ValueError("DecoderLayers: unsupported weight dtype")

        def pointers(layer) -> list:
            if not quantized:
                return [a.ctypes.data for a in layer]
            return ([a.data.ctypes.data for a in layer[:4]] + [a.ctypes.data for a in layer[4:]]
                    + [a.scales.ctypes.data for a in layer[:4]])

        self.layers = (_Layer * len(layers))(*[_Layer(*pointers(layer)) for layer in layers])
        self.wtype = wtype

    def __call__(self, x: np.ndarray, h: np.ndarray, positions: np.ndarray, attention: StepAttention) -> None:
        """Run every layer on x, h: (N, H) float32 C-contiguous (the residual stream and its input-normed copy),
        updated in place; positions (N,) of the rows; attention: the pass's StepAttention (its caches get the keys
        and values). After the call h holds the final norm's output, as after the NumPy loop."""
        n, hidden = x.shape
        pos = np.ascontiguousarray(positions, dtype=np.int64)
        if (x.dtype != np.float32 or h.dtype != np.float32 or h.shape != x.shape or not x.flags.c_contiguous
                or not h.flags.c_contiguous or hidden != self.stack.hidden or attention.total != n
                or pos.shape != (n,) or (n and (pos.min() < 0 or pos.max() >= self.positions))):
            raise ValueError("DecoderLayers: x, h, positions or the attention's rows do not fit")
        scratch = np.empty(n * self.width, dtype=np.float32)
        a = attention
        self.lib.lib.tl_decoder_layers(self.lib.isa, ctypes.byref(self.stack), self.layers, len(self.layers),
                                       x.ctypes.data, h.ctypes.data, n, pos.ctypes.data, len(a.counts),
                                       a.rows.ctypes.data, a.counts.ctypes.data, a.starts.ctypes.data, a.k_ptrs,
                                       a.v_ptrs, a.capacity.ctypes.data, scratch.ctypes.data, self.lib.threads)
