"""Causal flash attention for a prefill chunk over a per-layer KV cache, with grouped-query attention.

The T new tokens sit at absolute positions start_pos .. start_pos+T-1 and their K/V are already in
the cache; query at position p attends to cache positions 0..p. K/V heads are shared by index
(kv_head = q_head // (n_heads // n_kv_heads)); they are never repeated in memory.
"""

import math

import torch
import triton
import triton.language as tl

from ._common import check_qkv, dot_mode, next_pow2, online_softmax_step, output_like, tile_dot
from .launch import LaunchPlan, Target, launch, target_of


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    T, start_pos, head_dim, group, qk_scale,
    stride_qt, stride_qh, stride_kh, stride_kp, stride_vh, stride_vp, stride_ot, stride_oh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr,
):
    # Program (query block, q head): online softmax over key blocks 0 .. last causal position.
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < T
    q_pos = start_pos + offs_m  # absolute positions

    q = tl.load(q_ptr + offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # Keys up to the last valid query's position in this block (key 0 is in the first block,
    # so every row has a finite running max after it and no row ever sees exp(-inf - -inf)).
    kv_end = start_pos + min((pid_m + 1) * BLOCK_M, T)
    for n0 in range(0, kv_end, BLOCK_N):
        k_pos = n0 + offs_n
        kv_ok = k_pos < kv_end
        kt = tl.load(k_base + k_pos[None, :] * stride_kp + offs_d[:, None],
                     mask=kv_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tile_dot(q, kt, DOT_MODE) * qk_scale  # log2-domain scores
        causal = (k_pos[None, :] <= q_pos[:, None]) & kv_ok[None, :]
        s = tl.where(causal, s, float("-inf"))
        v = tl.load(v_base + k_pos[:, None] * stride_vp + offs_d[None, :],
                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_MODE)

    out = acc / l_i[:, None]
    tl.store(o_ptr + offs_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def plan_prefill(T: int, n_heads: int, head_dim: int, dtype: torch.dtype, target: Target) -> LaunchPlan:
    """The launch for T causal queries of n_heads heads in `dtype` on `target`: one program per (query block, head).

    fp32 tiles are multiplied without tensor cores (DOT_IEEE), every product in registers: key blocks of 32 and 8
    warps for 32-64 query rows keep them there (64x64 tiles spilled 2-13 KB per thread on sm_80/sm_90, tinyllama_kernels.aot).
    """
    block_d = max(16, next_pow2(head_dim))
    block_m = 64 if T > 32 else max(16, next_pow2(T))
    warps = 4
    if dtype == torch.float32:
        block_n = 32
        warps = 8 if block_m >= 32 else 4
    else:
        block_n = 64 if block_d <= 64 else 32
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_MODE=dot_mode(dtype, target.interpret))
    return LaunchPlan(_prefill_attention_kernel, (triton.cdiv(T, block_m), n_heads), constexprs,
                      num_warps=warps, num_stages=2)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start_pos: int,
                      out: torch.Tensor | None = None, target: Target | None = None) -> torch.Tensor:
    """Causal GQA attention: q (T, n_heads, head_dim), k/v_cache (n_kv_heads, capacity, head_dim) -> (T, n_heads, head_dim).

    Queries sit at absolute positions start_pos..start_pos+T-1 and attend to cache positions <= their own;
    the cache must already hold the new tokens' K/V. Same dtype (fp32/fp16/bf16) everywhere; scale = 1/sqrt(head_dim).
    `target`: the device facts the launch is planned for (default: q's device's own).
    """
    if q.dim() != 3 or k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"prefill_attention: need q (T, H, D) and k/v_cache (Hkv, cap, D), got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    T, n_heads, head_dim = q.shape
    n_kv_heads, capacity, kd = k_cache.shape
    if kd != head_dim or n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(f"prefill_attention: head_dim {kd} vs {head_dim}, or n_heads {n_heads} not a multiple of n_kv_heads {n_kv_heads}")
    if start_pos < 0 or start_pos + T > capacity:
        raise ValueError(f"prefill_attention: positions {start_pos}..{start_pos + T - 1} exceed the cache capacity {capacity}")
    check_qkv("prefill_attention", q, k_cache, v_cache)
    o = output_like("prefill_attention", q, out, name="q")
    if T == 0:
        return o
    target = target if target is not None else target_of(q.device)
    qk_scale = (1.0 / math.sqrt(head_dim)) * 1.4426950408889634  # fold log2(e) in: exp2 below
    launch(plan_prefill(T, n_heads, head_dim, q.dtype, target),
           q, k_cache, v_cache, o,
           T, int(start_pos), head_dim, n_heads // n_kv_heads, qk_scale,
           q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
           v_cache.stride(0), v_cache.stride(1), o.stride(0), o.stride(1))
    return o
