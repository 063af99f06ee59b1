"""The Llama building blocks as pure NumPy functions on float32 arrays (no state, no caches).

Every function keeps float32: constants are cast to np.float32 so no Python or NumPy float64 scalar promotes the data.
"""
from __future__ import annotations

import numpy as np

from engine.runtime import native
from engine.runtime.quant import QuantMatrix, linear_dequantized


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
    """RMSNorm. x: (N, hidden) float32, weight: (hidden,) float32 -> (N, hidden) float32 (HF LlamaRMSNorm):
    weight * (x * (1 / sqrt(mean(x^2) + eps))), on the compiled kernels where available (the same operations)."""
    if native.status().available and x.ndim == 2 and x.strides[-1] == 4:
        return native.rms_norm(x, weight, eps)
    return rms_norm_numpy(x, weight, eps)


def rms_norm_numpy(x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
    """RMSNorm in NumPy; arguments and result as in `rms_norm`."""
    variance = np.mean(np.square(x), axis=-1, keepdims=True)
    return weight * (x * (np.float32(1.0) / np.sqrt(variance + np.float32(eps))))


def add_rms_norm(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: np.float32):
    """The residual add and the next RMSNorm: (x + residual, rms_norm(x + residual)), both (N, hidden) float32; one
    pass on the compiled kernels."""
    if native.status().available:
        return native.rms_norm(x, weight, eps, residual=residual)
    summed = x + residual
    return summed, rms_norm_numpy(summed, weight, eps)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding, HF `rotate_half` convention. x: (N, heads, head_dim), cos/sin: (N, head_dim) -> like x.

    out = x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x2, x1); cos and sin repeat their first half.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :half], sin[:, None, :half]
    out = np.empty_like(x)
    out[..., :half] = x1 * c - x2 * s
    out[..., half:] = x2 * c + x1 * s
    return out


def rotate_heads(qkv: np.ndarray, positions: np.ndarray, cos_table: np.ndarray, sin_table: np.ndarray, heads: int,
                 head_dim: int) -> None:
    """The rotary embedding in place on the first `heads` heads of each row of qkv (N, >= heads * head_dim) float32,
    row n at positions[n] (the query and key heads of a fused q/k/v projection); cos/sin_table: (P, head_dim)."""
    if native.status().available:
        native.rotary_(qkv, positions, cos_table, sin_table, heads, head_dim)
        return
    n = qkv.shape[0]
    view = qkv[:, : heads * head_dim].reshape(n, heads, head_dim)
    view[:] = apply_rotary(view, cos_table[positions], sin_table[positions])


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32, stable (masked entries are -inf)."""
    scores = scores - np.max(scores, axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= np.sum(scores, axis=-1, keepdims=True)
    return scores


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int, return_probs: bool = False):
    """Causal grouped-query attention: the compiled kernel (one pass over the keys, online softmax) where available,
    else `attention_numpy`; arguments and result as in `attention_numpy`. With return_probs the kernel also writes the
    probabilities (a trace) and computes the output exactly as without them."""
    if native.status().available:
        return native.attention(q, k, v, start_pos, return_probs=return_probs)
    return attention_numpy(q, k, v, start_pos, return_probs)


def attention_numpy(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int, return_probs: bool = False):
    """Causal grouped-query attention of T new queries over a sequence's cached keys/values, in NumPy.

    q: (T, n_heads, head_dim) at absolute positions start_pos..start_pos+T-1;
    k, v: (n_kv_heads, L, head_dim) with L = start_pos + T (the new tokens already appended);
    returns (T, n_heads * head_dim) float32. K/V heads are shared by the group of query heads that use them
    (head h reads kv head h // group), never repeated in memory.
    return_probs: also return the post-softmax probabilities (n_heads, T, L) float32 (a trace; exact zeros masked).
    """
    t, n_heads, head_dim = q.shape
    n_kv, length, _ = k.shape
    group = n_heads // n_kv
    scale = np.float32(1.0 / np.sqrt(head_dim))
    # (n_kv, group * T, head_dim): the queries of each KV head's group stacked, so one matmul per KV head.
    qg = q.reshape(t, n_kv, group, head_dim).transpose(1, 2, 0, 3).reshape(n_kv, group * t, head_dim)
    scores = np.matmul(qg, k.transpose(0, 2, 1))  # (n_kv, group*T, L)
    scores *= scale
    if t > 1:
        # Query i (absolute position start_pos + i) sees cache positions <= start_pos + i.
        future = np.arange(length)[None, :] > (start_pos + np.arange(t))[:, None]  # (T, L)
        scores.reshape(n_kv, group, t, length)[:, :, future] = -np.inf
    probs = softmax(scores)
    out = np.matmul(probs, v)  # (n_kv, group*T, head_dim)
    out = out.reshape(n_kv, group, t, head_dim).transpose(2, 0, 1, 3).reshape(t, n_heads * head_dim)
    return (out, probs.reshape(n_heads, t, length)) if return_probs else out


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU x * sigmoid(x), float32, without overflow warnings for large negative x."""
    with np.errstate(over="ignore"):
        return x / (np.float32(1.0) + np.exp(-x))


def swiglu(gate_up: np.ndarray) -> np.ndarray:
    """SwiGLU activation. gate_up: (N, 2 * intermediate), gate columns first -> (N, intermediate) float32
    (the compiled kernel where available: one pass, a vectorised exp; NumPy otherwise)."""
    if native.status().available:
        return native.swiglu(gate_up)
    inter = gate_up.shape[-1] // 2
    return silu(gate_up[:, :inter]) * gate_up[:, inter:]


# From how many rows of x a matmul leaves our kernel for OpenBLAS, per kernel variant (None: never), for float32
# weights (OpenBLAS's GEMM) and 16-bit ones (OpenBLAS's GEMM on blocks the kernels widen to float32). Measured on the
# development machine (Zen 4) in one process, TinyLlama's shape: the avx512 kernel prefilled 128 and 512 tokens at
# 95-104 tok/s where OpenBLAS (SkylakeX) gave 74-90, for bf16 and float32 weights alike, so it takes every row; the
# avx2 kernel was level with OpenBLAS on bf16 and slower on float32 (69 against 72-88 tok/s), the portable one
# 2-3x slower, so long prompts still go to OpenBLAS there.
BLAS_FROM_ROWS = {"avx512": None, "avx2": 65, "portable": 65}
WIDENED_BLAS_FROM_ROWS = {"avx512": None, "avx2": 256, "portable": 256}
NEVER = 1 << 62  # a row count no step reaches
SMALL_M_ROWS = 12  # without the kernels, up to this many rows `linear` walks the weight in cached blocks (1.5-3x at 2-8 rows)
BLOCK_BYTES = 4 << 20  # weight rows per block: a few MB, read from memory once, then re-used from cache M times
WIDEN_BLOCK_BYTES = 8 << 20  # float32 bytes of one widened block
_widened = np.empty(0, dtype=np.float32)  # the scratch block, kept between calls


def matmul_kernel_name(weights_dtype: str | None = None) -> str:
    """What runs the NumPy backend's matmuls, for logs and benchmark tables: "native avx512" (every row),
    "native avx2 + openblas Haswell (float32 weights, 65+ rows)" (the prompts OpenBLAS takes), or "openblas
    SkylakeX" without the kernels. weights_dtype: the model's ("bfloat16", "float16", "float32"); None names the
    kernels alone."""
    from engine.runtime.blas import blas_info

    info = blas_info()
    blas = f"{info.get('library') or 'BLAS'} {info.get('kernel') or ''}".strip()
    status = native.status()
    if not status.available:
        return blas
    if weights_dtype is None:
        return f"native {status.isa}"
    if weights_dtype == "float32":
        rows = BLAS_FROM_ROWS.get(status.isa)
        return f"native {status.isa}" + (f" + {blas} (float32 weights, {rows}+ rows)" if rows else "")
    rows = WIDENED_BLAS_FROM_ROWS.get(status.isa)
    return f"native {status.isa}" + (f" + {blas} ({rows}+-token prompts, on widened blocks)" if rows else "")


def widened_blas_from_rows() -> int:
    """Prompt rows from which matmuls with 16-bit weights go to OpenBLAS on widened blocks, for the kernel variant in
    use (NEVER where the kernel takes every row). The backend stacks chunks this long after the others."""
    return WIDENED_BLAS_FROM_ROWS.get(native.status().isa) or NEVER


def runs_on_kernels(rows: int, prompt_from: int, weight_dtype) -> bool:
    """Whether `linear` gives every one of `rows` rows (those from `prompt_from` on: long prompt chunks) to the
    compiled kernels for a weight of `weight_dtype`, rather than some or all of them to OpenBLAS."""
    if not native.status().available:
        return False
    if weight_dtype != np.float32:
        return rows - prompt_from < widened_blas_from_rows()
    return rows < (BLAS_FROM_ROWS.get(native.status().isa) or NEVER)


def linear(x: np.ndarray, w: np.ndarray, prompt_from: int = 0) -> np.ndarray:
    """y = x @ w.T. x: (M, in) float32, w: (out, in) float32 | uint16 (bf16 bits) | float16 (HF layout) -> (M, out)
    float32; w may also be a QuantMatrix or any weight object of engine.runtime.ggml_formats' protocol (its own
    `linear`). prompt_from: rows from there on belong to long prompt chunks (the backend stacks those last).

    With the compiled kernels (engine.runtime.native), which widen 16-bit weights exactly in registers, every row
    runs on the kernel, whose sums do not depend on the batch, except where the variant in use hands long prompts to
    OpenBLAS (BLAS_FROM_ROWS, WIDENED_BLAS_FROM_ROWS): float32 weights from that many rows go to OpenBLAS's GEMM;
    16-bit weights, when the prompt rows number that many, are widened a block at a time into float32 for OpenBLAS's
    GEMM on those rows (the same products: widening is exact) while the other rows (decoding sequences) stay on the
    kernel, so a decoding sequence's logits are the same bits whether or not a prompt joined its step. Without the
    kernels (16-bit weights are then widened at load), OpenBLAS multiplies, and 2 to SMALL_M_ROWS rows walk the
    weight in blocks that stay in cache while each row of x takes one GEMV over the block (OpenBLAS's GEMM at a
    handful of rows reads the weight far below memory bandwidth).
    """
    m = x.shape[0]
    if isinstance(w, QuantMatrix):
        return linear_quantized(x, w)
    if not isinstance(w, np.ndarray):  # a weight object of another format (engine.runtime.ggml_formats' protocol)
        return w.linear(np.ascontiguousarray(x, dtype=np.float32))
    if runs_on_kernels(m, prompt_from, w.dtype):
        return native.matmul_xwt(np.ascontiguousarray(x), w)
    if w.dtype != np.float32:
        out = np.empty((m, w.shape[0]), dtype=np.float32)
        if prompt_from:
            native.matmul_xwt(np.ascontiguousarray(x[:prompt_from]), w, out=out[:prompt_from])
        widened_blas(x[prompt_from:], w, out=out[prompt_from:])
        return out
    if m < 2 or m > SMALL_M_ROWS:
        return x @ w.T
    out = np.empty((m, w.shape[0]), dtype=np.float32)
    rows = max(1, BLOCK_BYTES // (w.shape[1] * w.itemsize))
    for start in range(0, w.shape[0], rows):
        block = w[start : start + rows]
        for i in range(m):
            np.matmul(block, x[i], out=out[i, start : start + rows])
    return out


def linear_quantized(x: np.ndarray, w: QuantMatrix) -> np.ndarray:
    """y = x @ dequantize(w).T for x (M, in) float32 and a quantized w (out, in) -> (M, out) float32: the compiled
    kernels' quantized matmul where available (every row: activations rounded to int16 per group of 32, exact integer
    group sums), else blocks of w dequantized for OpenBLAS (activations float32)."""
    if native.status().available:
        return native.qmatmul_xwt(np.ascontiguousarray(x, dtype=np.float32), w)
    return linear_dequantized(np.ascontiguousarray(x, dtype=np.float32), w)


def widened_blas(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x @ w.T for a 16-bit w: blocks of w widened to float32 by the kernels, each multiplied by OpenBLAS's GEMM.
    x: (M, in) float32, w: (out, in) uint16 (bf16 bits) | float16 -> (M, out) float32 (into `out` if given)."""
    global _widened
    m, k = x.shape
    rows = max(1, WIDEN_BLOCK_BYTES // (4 * k))
    if _widened.size < rows * k:
        _widened = np.empty(rows * k, dtype=np.float32)
    if out is None:
        out = np.empty((m, w.shape[0]), dtype=np.float32)
    for start in range(0, w.shape[0], rows):
        block = w[start : start + rows]
        wide = native.widen_into(block, _widened[: block.size].reshape(block.shape))
        np.matmul(x, wide.T, out=out[:, start : start + rows])
    return out
