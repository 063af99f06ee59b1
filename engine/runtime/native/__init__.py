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

Modules, one job each: build.py (compile into the cache), library.py (the ctypes signatures, the probe, the process's
state: status, set_isa), kernels.py (each kernel one call at a time), decoder_layers.py (every layer of a pass in one
call), selftest.py (selftest.c for any target); this file re-exports them and says what the fallback costs.

Environment: TINYLLAMA_NATIVE=0 turns it off; TINYLLAMA_NATIVE_ISA=avx512|avx2|portable forces a variant (an error in
`status()` if this CPU cannot run it); CC picks the compiler (default `cc`, `gcc` on Windows); TINYLLAMA_CACHE the
cache folder (default $XDG_CACHE_HOME/tinyllama-engine or ~/.cache/tinyllama-engine); TINYLLAMA_NUM_THREADS (else
OMP_NUM_THREADS, else OPENBLAS_NUM_THREADS, else the CPUs this process may run on, on Apple Silicon its performance
cores) the kernels' threads.
"""
from __future__ import annotations

import os

from .build import (ABI_VERSION, CFLAGS, HEADERS, HERE, ISAS, LDFLAGS, LDFLAGS_WINDOWS, LIBS, SOURCES,  # noqa: F401
                    VARIANT_SOURCES, build, cache_dir, compile_objects, compiler, left_out, library_path)
from .decoder_layers import DecoderLayers  # noqa: F401
from .kernels import (ATTENTION_MAX_HEAD_DIM, GGML_BLOCK_BYTES, KMATMUL_BUILDS, KQUANT_TYPES,  # noqa: F401
                      QMATMUL_BUILDS, QUANT_TYPES, WEIGHT_TYPES, StepAttention, attention, kdequant, kmatmul_build,
                      kpack, kquantize, matmul_parts, matmul_xwt, qmatmul_build, qmatmul_builds, qmatmul_xwt,
                      quantize_into, repack_ggml_into, rms_norm, rotary_, swiglu, weight_parts, widen_into)
from .library import NativeStatus, set_isa, status, thread_count, usable_isas  # noqa: F401

# What the NumPy fallback costs, said once when a model loads without the kernels: a 16-bit checkpoint's weights
# are widened to float32 (docs/benchmarks.md: 2.51 vs 4.71 GB, 1.94x the batch-1 decode rate in 16 bits).
FALLBACK_COST = "using NumPy, fp32 weights, ~2x slower decode, 2x memory"
FALLBACK_COST_FP32 = "using NumPy (BLAS matmuls, NumPy attention; a float32 checkpoint's weights take no more memory)"


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


def summary() -> dict:
    """The kernels' state as JSON-ready data for reports (`tinyllama check --json`, bench): available, the variant
    (None without), the reason they are not used ("" when they are), the detail line and the threads."""
    s = status()
    return {"available": s.available, "variant": s.isa, "reason": "" if s.available else s.detail,
            "detail": s.detail, "threads": thread_count()}
