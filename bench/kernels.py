"""The compiled kernels alone on TinyLlama-1.1B's matrices: what each variant reads and computes per second.

    python -m bench.kernels [--isa avx512,avx2,portable] [--dtype bfloat16,float32,int8,int4] [--rows 1,8,32,128,512]
                            [--layers 22] [--repeats 3] [--out FILE.json]

A sweep is one matmul with every weight a decoded token reads (22 layers of wqkv, wo, gate/up, down, then the
lm_head: 2.07 GB in bf16), each a distinct array so nothing is re-read from cache. For each variant, weight dtype and
number of rows of x it reports the best sweep time over --repeats, the weight bytes read per second (the batch-1
figure to hold against the memory read rate measured in the same process), the arithmetic rate, and the tokens/s
those matmuls alone would allow. int8 / int4 are the quantized formats (engine.runtime.quant: their bytes are the
integers and the float16 scales; --layers 4 keeps their quantization short). Also OpenBLAS's float32 GEMM on the
same shapes (the fallback, and the prefill path of float32 checkpoints), and the attention kernel at a short and a
long context. All in one process, so the figures
compare within a run (this machine's memory bandwidth drifts between runs).
"""
from __future__ import annotations

import argparse
import json
import time

TINYLLAMA_MATRICES = [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]  # wqkv, wo, gate/up, down
LM_HEAD = (32000, 2048)


def make_weights(layers: int, dtype: str):
    """The matrices a token reads, as the engine holds them (random values in the normal range of the weights)."""
    import numpy as np

    rng = np.random.default_rng(0)
    shapes = [s for _ in range(layers) for s in TINYLLAMA_MATRICES] + [LM_HEAD]
    out = []
    for n, k in shapes:
        w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02)
        if dtype in ("int8", "int4"):
            from engine.runtime import quant

            w = quant.quantize(w, dtype)
        elif dtype == "bfloat16":
            w = (w.view(np.uint32) >> 16).astype(np.uint16)
        elif dtype == "float16":
            w = w.astype(np.float16)
        out.append(w)
    return out


def sweep_seconds(weights, rows: int, matmul, repeats: int) -> float:
    import numpy as np

    xs = {k: np.random.default_rng(1).standard_normal((rows, k), dtype=np.float32) for k in {w.shape[1] for w in weights}}
    for w in weights[:4]:
        matmul(xs[w.shape[1]], w)  # warm-up: threads, buffers
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            matmul(xs[w.shape[1]], w)
        best = min(best, time.perf_counter() - t0)
    return best


def attention_rates(context_lengths, repeats: int) -> list[dict]:
    """One decode step's attention over all 22 layers of TinyLlama's cache shape (32 query heads, 4 KV heads, 64
    dims) at each context length: ms per token."""
    import numpy as np

    from engine.runtime import native

    rng = np.random.default_rng(2)
    rows = []
    for length in context_lengths:
        k = rng.standard_normal((22, 4, length, 64), dtype=np.float32)
        v = rng.standard_normal((22, 4, length, 64), dtype=np.float32)
        q = rng.standard_normal((1, 32, 64), dtype=np.float32)
        best = float("inf")
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for layer in range(22):
                native.attention(q, k[layer], v[layer], length - 1)
            best = min(best, time.perf_counter() - t0)
        rows.append({"context": length, "ms_per_token": best * 1e3, "kv_gbs": 2 * k.nbytes / best / 1e9})
    return rows


def main(argv=None) -> int:
    import engine  # noqa: F401  (chooses OpenBLAS's kernel before NumPy loads)
    from bench.roofline import read_bandwidth
    from engine.runtime import native
    from engine.runtime.blas import blas_info

    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--isa", default=",".join(native.usable_isas()))
    p.add_argument("--dtype", default="bfloat16,float32")
    p.add_argument("--rows", default="1,8,32,128,512")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--blas", action="store_true", help="also OpenBLAS's float32 GEMM")
    p.add_argument("--attention", default="128,2000", help="context lengths for the attention kernel ('' skips)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not native.status().available:
        print(f"the compiled kernels are not available: {native.status().detail}")
        return 1
    rows_list = [int(r) for r in args.rows.split(",")]
    read = read_bandwidth(512 << 20, native.thread_count(), trials=3)
    print(f"memory read {read['read_gbs']:.1f} GB/s (NumPy, best of 1 and {native.thread_count()} threads); "
          f"BLAS {blas_info().get('library')} {blas_info().get('kernel')}", flush=True)
    results = {"read_gbs": read["read_gbs"], "threads": native.thread_count(), "rows": []}
    for dtype in args.dtype.split(","):
        weights = make_weights(args.layers, dtype)
        nbytes = sum(w.nbytes for w in weights)
        flops_per_row = 2 * sum(w.shape[0] * w.shape[1] for w in weights)
        systems = [(f"native {isa}", isa) for isa in args.isa.split(",") if isa]
        if args.blas and dtype == "float32":
            systems.append(("openblas", None))
        for label, isa in systems:
            if isa:
                native.set_isa(isa)
                fn = native.qmatmul_xwt if dtype in ("int8", "int4") else native.matmul_xwt
            else:
                def fn(x, w):
                    return x @ w.T
            for rows in rows_list:
                t = sweep_seconds(weights, rows, fn, args.repeats)
                row = {"kernel": label, "dtype": dtype, "rows": rows, "sweep_ms": t * 1e3, "weight_gbs": nbytes / t / 1e9,
                       "gflops": rows * flops_per_row / t / 1e9, "tok_s": rows / t,
                       "pct_of_read": 100 * nbytes / t / 1e9 / read["read_gbs"]}
                results["rows"].append(row)
                print(f"{label:<16} {dtype:<9} M={rows:<4} {t * 1e3:8.1f} ms  {row['weight_gbs']:6.1f} GB/s "
                      f"({row['pct_of_read']:3.0f}% of read)  {row['gflops']:6.1f} GFLOP/s  {row['tok_s']:7.2f} tok/s",
                      flush=True)
        del weights
    if args.attention:
        native.set_isa(native.usable_isas()[0])
        results["attention"] = attention_rates([int(c) for c in args.attention.split(",")], args.repeats)
        for a in results["attention"]:
            print(f"attention, 22 layers, context {a['context']}: {a['ms_per_token']:.2f} ms per token "
                  f"({a['kv_gbs']:.1f} GB/s of K/V)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
