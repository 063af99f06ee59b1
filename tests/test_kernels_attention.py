"""tinyllama_kernels.attention_prefill / attention_decode (causal GQA, split-KV decode) against NumPy float64.

Tolerance, per output element of query t, head h (L keys, head_dim D, E = sum_j p_j |v_j| with p the exact softmax):
a score q.k_j / sqrt(D) is an fp32 dot of D exact products (fp32 inputs: rounded products) and a scaling, so it is
off by at most d_j = (D + 2) a (|q|.|k_j|) / sqrt(D) + 2^-23 |s_j|; exp2 adds FP32_TRANSCENDENTAL; so each p_j is
within 2 max_j d_j + FP32_TRANSCENDENTAL relatively, which moves the normalised output by twice that times E. The
kernels round p to the dtype before the p @ v dot (u, numerator only), sum L terms in fp32 ((L + 4) a, rescalings
included) and round the output once (u):
|o - ref| <= u |ref| + (1 + u) (u + 2 (2 max d_j + FP32_TRANSCENDENTAL) + (L + 4) a) E + one subnormal spacing,
a = 2^-24 (IEEE fp32 accumulation; 2^-22 for 16-bit tensor-core dots on a GPU).
"""

import math

import numpy as np
import pytest

from tests.kernel_support import (DEVICE, FP32_TRANSCENDENTAL, FP32_U, assert_within, f64, subnormal_spacing, torch,
                                  unit_roundoff)  # first: sets TRITON_INTERPRET
from tinyllama_kernels._common import interpreting
from tinyllama_kernels.attention_decode import decode_attention
from tinyllama_kernels.attention_prefill import prefill_attention


HEADS = [(4, 4), (4, 2), (8, 2), (4, 1)]  # (n_heads, n_kv_heads): GQA ratios 1, 2, 4 and MQA


def _tensor(a, dtype):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dtype).to(DEVICE)


def _ref_attention(q, k, v, positions, dtype):
    """q (T, H, D), k/v (Hkv, L, D) float64; query t attends to cache positions <= positions[t].

    Returns (reference output, elementwise bound of the kernel's error) per the derivation above."""
    T, H, D = q.shape
    group = H // k.shape[0]
    u = unit_roundoff(dtype)
    a = FP32_U if dtype == torch.float32 or interpreting() else 4 * FP32_U
    out, bound = np.zeros_like(q), np.zeros_like(q)
    for t in range(T):
        n = positions[t] + 1
        for h in range(H):
            keys, values = k[h // group, :n], v[h // group, :n]
            s = keys @ q[t, h] / math.sqrt(D)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[t, h] = p @ values
            d = (D + 2) * a * (np.abs(keys) @ np.abs(q[t, h])) / math.sqrt(D) + 2 * FP32_U * np.abs(s)
            spread = p @ np.abs(values)
            bound[t, h] = (u * np.abs(out[t, h]) + (1 + u) * (u + 2 * (2 * d.max() + FP32_TRANSCENDENTAL)
                                                             + (n + 4) * a) * spread + subnormal_spacing(dtype))
    return out, bound


def _assert_close(got, ref_and_bound, what):
    ref, bound = ref_and_bound
    assert_within(got, ref, bound, what)


def _cache(rng, n_kv, capacity, head_dim, used, dtype):
    """A (n_kv, capacity, head_dim) cache whose positions >= used hold NaN (must never be read)."""
    a = rng.standard_normal((n_kv, capacity, head_dim))
    a[:, used:] = np.nan
    return _tensor(a, dtype)


@pytest.mark.parametrize("n_heads,n_kv_heads", HEADS)
@pytest.mark.parametrize("T,start_pos,head_dim", [(1, 0, 8), (1, 9, 8), (5, 0, 8), (7, 11, 16), (19, 3, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prefill_attention(n_heads, n_kv_heads, T, start_pos, head_dim, dtype):
    rng = np.random.default_rng(T * 100 + start_pos * 10 + n_heads + n_kv_heads)
    used = start_pos + T
    q_scale = 3.0 if T % 2 else 1.0  # peaked softmaxes (scores up to ~10) and flat ones
    q = _tensor(q_scale * rng.standard_normal((T, n_heads, head_dim)), dtype)
    k = _cache(rng, n_kv_heads, used + 6, head_dim, used, dtype)
    v = _cache(rng, n_kv_heads, used + 6, head_dim, used, dtype)
    out = prefill_attention(q, k, v, start_pos)
    assert out.shape == q.shape and out.dtype == dtype
    _assert_close(out, _ref_attention(f64(q), f64(k), f64(v), np.arange(start_pos, used), dtype), f"prefill {dtype}")


def test_prefill_attention_long_chunk_crosses_blocks():
    """T > the 64-row query block and a context spanning several 64-key blocks."""
    rng = np.random.default_rng(7)
    T, start_pos, H, Hkv, D = 70, 40, 2, 1, 16
    q = _tensor(rng.standard_normal((T, H, D)), torch.float32)
    k = _cache(rng, Hkv, 128, D, start_pos + T, torch.float32)
    v = _cache(rng, Hkv, 128, D, start_pos + T, torch.float32)
    ref = _ref_attention(f64(q), f64(k), f64(v), np.arange(start_pos, start_pos + T), torch.float32)
    _assert_close(prefill_attention(q, k, v, start_pos), ref, "long chunk")


def test_prefill_attention_into_strided_q_and_out():
    """q taken as a view of a fused qkv buffer, result written into a caller's buffer."""
    rng = np.random.default_rng(8)
    T, H, Hkv, D = 3, 4, 2, 8
    qkv = _tensor(rng.standard_normal((T, (H + 2 * Hkv) * D)), torch.float32)
    q = qkv[:, : H * D].view(T, H, D)
    k = _cache(rng, Hkv, 8, D, T, torch.float32)
    v = _cache(rng, Hkv, 8, D, T, torch.float32)
    out = torch.empty(T, H, D, device=DEVICE)
    assert prefill_attention(q, k, v, 0, out=out) is out
    _assert_close(out, _ref_attention(f64(q), f64(k), f64(v), np.arange(T), torch.float32), "strided q")


@pytest.mark.parametrize("n_heads,n_kv_heads,dtype",
                         [(h, kv, dt) for h, kv in HEADS for dt in (torch.float32, torch.bfloat16)]
                         + [(4, 2, torch.float16), (4, 1, torch.float16)])
@pytest.mark.parametrize("head_dim,chunk", [(8, None), (8, 1), (16, 64), (12, 1)])
def test_decode_attention_batched_split_kv(n_heads, n_kv_heads, dtype, head_dim, chunk):
    rng = np.random.default_rng(n_heads * 10 + n_kv_heads + head_dim)
    lengths = np.array([1, 70, 150], dtype=np.int32)  # a single-token context, and ones spanning splits
    B, capacity = len(lengths), 160
    q = _tensor(rng.standard_normal((B, n_heads, head_dim)) * np.array([1.0, 3.0, 1.0])[:, None, None], dtype)
    k = torch.stack([_cache(rng, n_kv_heads, capacity, head_dim, n, dtype) for n in lengths])
    v = torch.stack([_cache(rng, n_kv_heads, capacity, head_dim, n, dtype) for n in lengths])
    out = decode_attention(q, k, v, torch.from_numpy(lengths).to(DEVICE), chunk=chunk)
    assert out.shape == q.shape and out.dtype == dtype
    for b, n in enumerate(lengths):
        ref = _ref_attention(f64(q[b : b + 1]), f64(k[b]), f64(v[b]), np.array([n - 1]), dtype)
        _assert_close(out[b : b + 1], ref, f"decode {dtype} sequence {b}")


def test_decode_matches_prefill_last_row():
    """Decoding the last token equals the last row of prefilling the whole sequence."""
    rng = np.random.default_rng(9)
    T, H, Hkv, D = 9, 4, 2, 8
    q = _tensor(rng.standard_normal((T, H, D)), torch.float32)
    k = _cache(rng, Hkv, 16, D, T, torch.float32)
    v = _cache(rng, Hkv, 16, D, T, torch.float32)
    full = prefill_attention(q, k, v, 0)
    last = decode_attention(q[-1:].contiguous(), k[None], v[None], torch.tensor([T], dtype=torch.int32, device=DEVICE),
                            max_length=T)
    np.testing.assert_allclose(f64(last[0]), f64(full[-1]), rtol=1e-5, atol=1e-6)


def test_decode_attention_rejects_bad_lengths():
    q = torch.zeros(2, 4, 8, device=DEVICE)
    k = torch.zeros(2, 2, 16, 8, device=DEVICE)
    with pytest.raises(ValueError):
        decode_attention(q, k, k, torch.tensor([1, 2, 3], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError):
        decode_attention(q, k, k, torch.tensor([1, 17], dtype=torch.int32, device=DEVICE))
