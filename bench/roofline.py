"""This machine's ceilings as NumPy sees them: memory read bandwidth and fp32 matmul throughput.

Run inside a worker that imported `engine` first (so NumPy's OpenBLAS has the engine's kernel). The batch-1 decode
floor of a model is the bytes it reads per generated token / read bandwidth: every weight matrix and the lm_head are
read whole once per token; the embedding table is read whole only when it is the lm_head (tied embeddings): an
untied model gathers one row of it per token (8 KB of TinyLlama's 262 MB fp32 table).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor


def _best(fn, trials: int) -> float:
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth(nbytes: int, threads: int, trials: int = 5) -> dict:
    """GB/s reading a float32 array of `nbytes` (far beyond the caches): one thread, and `threads` threads each
    summing its own slice (NumPy releases the GIL in reductions); best of `trials`."""
    import numpy as np

    a = np.ones(nbytes // 4, dtype=np.float32)  # touched, so every page is resident
    one = _best(lambda: float(np.add.reduce(a)), trials)
    result = {"array_bytes": int(a.nbytes), "read_gbs_1thread": a.nbytes / one / 1e9}
    if threads > 1:
        parts = np.array_split(a, threads)
        with ThreadPoolExecutor(threads) as pool:
            many = _best(lambda: list(pool.map(lambda p: float(np.add.reduce(p)), parts)), trials)
        result[f"read_gbs_{threads}threads"] = a.nbytes / many / 1e9
    result["read_gbs"] = max(v for k, v in result.items() if k.startswith("read_gbs_"))
    return result


def matmul_throughput(m: int = 128, k: int = 2048, n: int = 5632, trials: int = 5) -> dict:
    """fp32 GFLOP/s of x[m, k] @ W.T with W[n, k] (Hugging Face's [out, in] layout, as the engine runs it)."""
    import numpy as np

    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k), dtype=np.float32)
    x = rng.standard_normal((m, k), dtype=np.float32)
    x @ w.T  # warm-up: BLAS threads, buffers
    t = _best(lambda: x @ w.T, trials)
    return {"matmul_shape": [m, k, n], "matmul_gflops": 2 * m * k * n / t / 1e9}


def gemv_bandwidth(rows: int = 131072, k: int = 2048, trials: int = 5) -> dict:
    """GB/s of a batch-1 GEMV x[1, k] @ W.T over W[rows, k] (1 GiB: four times the 260 MB L3 of a current Xeon, where
    the 262 MB of an lm_head, measured before, partly stayed in cache and read 37 GB/s against 31 from DRAM): the
    read rate a decode step's BLAS calls reach, with BLAS's own threads."""
    import numpy as np

    w = np.ones((rows, k), dtype=np.float32)
    x = np.ones((1, k), dtype=np.float32)
    x @ w.T
    return {"gemv_shape": [1, k, rows], "gemv_gbs": w.nbytes / _best(lambda: x @ w.T, trials) / 1e9}


def measure(threads: int, quick: bool = False) -> dict:
    """Both ceilings (a few seconds). read_gbs is the best read rate seen: NumPy reductions over one or `threads`
    threads, or a BLAS GEMV, each streaming far more memory than the caches hold."""
    trials = 3 if quick else 5
    out = read_bandwidth((256 if quick else 1024) << 20, threads, trials=trials)
    out.update(gemv_bandwidth(rows=32000 if quick else 131072, trials=trials))
    out["read_gbs"] = max(out["read_gbs"], out["gemv_gbs"])
    out.update(matmul_throughput(trials=trials))
    return out


def decode_floor(weight_bytes: int, read_gbs: float) -> float:
    """Batch-1 decode tokens/s if every weight byte is read once per token at `read_gbs` and nothing else costs."""
    return read_gbs * 1e9 / weight_bytes if weight_bytes else 0.0


def decode_bytes(weight_bytes: int, embed_bytes: int, tied: bool) -> int:
    """Bytes read per decoded token of a model whose weights take `weight_bytes` (the tied table counted once) and
    whose embedding table takes `embed_bytes`: everything, less the table when it is not also the lm_head."""
    return int(weight_bytes) if tied else int(weight_bytes) - int(embed_bytes)
