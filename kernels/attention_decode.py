"""Split-KV (flash-decoding) attention for one new token per sequence, batched, with GQA.

Cache layout (stacked): k_cache/v_cache (S, n_kv_heads, capacity, head_dim), sequence b owning row b, or row
slots[b] when a (B,) int `slots` tensor is given (a slot pool shared by every sequence: one launch for the whole
batch, whatever rows the sequences hold); lengths (B,) int gives how many cache positions of each sequence are
valid, the new token's included (its K/V already written at position lengths[b]-1). Each sequence's context is cut into chunks of
`chunk` positions; program (split, kv_head, b) runs an online softmax over one chunk for all the
query heads that share kv_head (packed as the rows of one tl.dot tile, so K/V are read once per group),
and writes its partial (max, sum, unnormalised output). A second kernel combines the splits.
"""

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import check_qkv, dot_mode, next_pow2, online_softmax_step, output_like, tile_dot
from .launch import LaunchPlan, Target, launch, target_of


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, slot_ptr, part_o_ptr, part_ml_ptr,
    head_dim, group, chunk, qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kp, stride_vb, stride_vh, stride_vp,
    stride_pob, stride_poh, stride_pos, stride_mlb, stride_mlh, stride_mls,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
):
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.program_id(2)
    length = tl.load(len_ptr + b).to(tl.int32)
    if HAS_SLOTS:
        row = tl.load(slot_ptr + b).to(tl.int64)  # the cache row (pool slot) of sequence b
    else:
        row = b.to(tl.int64)
    start = split * chunk
    end = min(start + chunk, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < group
    d_ok = offs_d < head_dim
    heads = kv_head * group + offs_g  # the query heads sharing this kv head
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + row * stride_kb + kv_head * stride_kh
    v_base = v_ptr + row * stride_vb + kv_head * stride_vh

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):  # empty when the chunk lies past this sequence's end
        k_pos = n0 + offs_n
        kv_ok = k_pos < end
        kt = tl.load(k_base + k_pos[None, :] * stride_kp + offs_d[:, None],
                     mask=kv_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tile_dot(q, kt, DOT_MODE) * qk_scale  # log2-domain scores (BLOCK_G, BLOCK_N)
        s = tl.where(kv_ok[None, :], s, float("-inf"))
        v = tl.load(v_base + k_pos[:, None] * stride_vp + offs_d[None, :],
                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_MODE)

    po = part_o_ptr + b * stride_pob + heads[:, None] * stride_poh + split * stride_pos + offs_d[None, :]
    tl.store(po, acc, mask=g_ok[:, None] & d_ok[None, :])
    pml = part_ml_ptr + b * stride_mlb + heads * stride_mlh + split * stride_mls
    tl.store(pml, m_i, mask=g_ok)
    tl.store(pml + 1, l_i, mask=g_ok)


@triton.jit
def _decode_combine_kernel(
    part_o_ptr, part_ml_ptr, o_ptr,
    n_splits, head_dim,
    stride_pob, stride_poh, stride_pos, stride_mlb, stride_mlh, stride_mls, stride_ob, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (head, b): out = sum_s 2^(m_s - M) * acc_s / sum_s 2^(m_s - M) * l_s, M = max_s m_s.
    head = tl.program_id(0)
    b = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    pml = part_ml_ptr + b * stride_mlb + head * stride_mlh + offs_s * stride_mls
    m_s = tl.load(pml, mask=s_ok, other=float("-inf"))
    l_s = tl.load(pml + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m_s, axis=0)
    w = tl.where(m_s > float("-inf"), tl.exp2(m_s - m_max), 0.0)  # empty splits weigh 0
    denom = tl.sum(w * l_s, axis=0)
    acc = tl.load(part_o_ptr + b * stride_pob + head * stride_poh + offs_s[:, None] * stride_pos + offs_d[None, :],
                  mask=s_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(o_ptr + b * stride_ob + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < head_dim)


def _check(q, k_cache, v_cache, lengths, slots):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: need q (B, H, D) and k/v_cache (B or slots, Hkv, cap, D), got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, n_heads, head_dim = q.shape
    kb, n_kv_heads, _, kd = k_cache.shape
    if (slots is None and kb != B) or kd != head_dim or n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(f"decode_attention: cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)}")
    if lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: lengths must be ({B},) int32/int64, "
                         f"got {tuple(lengths.shape)} {lengths.dtype}")
    if slots is not None and (slots.shape != (B,) or slots.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"decode_attention: slots must be ({B},) int32/int64, got {tuple(slots.shape)} {slots.dtype}")
    check_qkv("decode_attention", q, k_cache, v_cache)


class DecodePlan(NamedTuple):
    """The two launches of decode attention: `partial` over (n_splits, n_kv_heads, B) programs, each an online
    softmax over `chunk` positions, then `combine` over (n_heads, B)."""

    partial: LaunchPlan
    combine: LaunchPlan
    chunk: int
    n_splits: int


def plan_decode(B: int, n_heads: int, n_kv_heads: int, head_dim: int, max_length: int, chunk: int | None,
                has_slots: bool, dtype: torch.dtype, target: Target) -> DecodePlan:
    """The launches for B one-token queries against up to `max_length` cached positions, in `dtype` on `target`;
    `chunk` None: enough splits for ~2 programs per SM."""
    group = n_heads // n_kv_heads
    block_g = max(16, next_pow2(group))
    block_d = max(16, next_pow2(head_dim))
    block_n = 64 if block_d <= 64 else 32
    n_blocks = triton.cdiv(max_length, block_n)
    if chunk is None:  # enough splits for ~2 programs per SM, at least one key block each
        want = triton.cdiv(2 * target.sm_count, B * n_kv_heads)
        chunk = triton.cdiv(n_blocks, max(1, min(want, n_blocks))) * block_n
    chunk = triton.cdiv(max(int(chunk), 1), block_n) * block_n
    n_splits = triton.cdiv(max_length, chunk)
    # fp32 tiles are multiplied on the FMA units with every operand in registers: 8 warps share them (with 4, ptxas
    # spilled on sm_80 for head_dim 128, tinyllama_kernels.aot)
    partial = LaunchPlan(_decode_partial_kernel, (n_splits, n_kv_heads, B),
                         dict(BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
                              DOT_MODE=dot_mode(dtype, target.interpret), HAS_SLOTS=has_slots),
                         num_warps=8 if dtype == torch.float32 else 4, num_stages=2)
    combine = LaunchPlan(_decode_combine_kernel, (n_heads, B),
                         dict(BLOCK_S=max(2, next_pow2(n_splits)), BLOCK_D=max(2, next_pow2(head_dim))), num_warps=1)
    return DecodePlan(partial, combine, chunk, n_splits)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     max_length: int | None = None, out: torch.Tensor | None = None,
                     chunk: int | None = None, slots: torch.Tensor | None = None,
                     target: Target | None = None) -> torch.Tensor:
    """One-token GQA attention: q (B, n_heads, head_dim), k/v_cache (B, n_kv_heads, capacity, head_dim),
    lengths (B,) int32 (valid positions per sequence, >= 1) -> (B, n_heads, head_dim) in q's dtype.

    `max_length` (host int >= max(lengths)) sizes the split grid; when omitted it is read from
    `lengths` (a device sync). Passing the cache capacity gives a grid that depends on shapes only (what a
    CUDA graph needs; splits past a sequence's end exit at once). `chunk` overrides the positions per split
    (rounded up to the key block). `slots` (B,) int: sequence b's cache is k/v_cache[slots[b]] (a slot pool,
    any number of rows) instead of row b. `target`: the device facts the launch is planned for (default: q's
    device's own).
    """
    _check(q, k_cache, v_cache, lengths, slots)
    B, n_heads, head_dim = q.shape
    n_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    o = output_like("decode_attention", q, out, name="q")
    if B == 0:
        return o
    if max_length is None:
        max_length = int(lengths.max().item())
    if not 1 <= max_length <= capacity:
        raise ValueError(f"decode_attention: max_length {max_length} outside 1..{capacity}")
    target = target if target is not None else target_of(q.device)
    plan = plan_decode(B, n_heads, n_kv_heads, head_dim, max_length, chunk, slots is not None, q.dtype, target)

    part_o = torch.empty((B, n_heads, plan.n_splits, head_dim), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((B, n_heads, plan.n_splits, 2), dtype=torch.float32, device=q.device)
    qk_scale = (1.0 / math.sqrt(head_dim)) * 1.4426950408889634
    launch(plan.partial,
           q, k_cache, v_cache, lengths, lengths if slots is None else slots, part_o, part_ml,
           head_dim, n_heads // n_kv_heads, plan.chunk, qk_scale,
           q.stride(0), q.stride(1),
           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
           v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
           part_o.stride(0), part_o.stride(1), part_o.stride(2),
           part_ml.stride(0), part_ml.stride(1), part_ml.stride(2))
    launch(plan.combine,
           part_o, part_ml, o, plan.n_splits, head_dim,
           part_o.stride(0), part_o.stride(1), part_o.stride(2),
           part_ml.stride(0), part_ml.stride(1), part_ml.stride(2), o.stride(0), o.stride(1))
    return o
