"""Scatter new keys/values into a stacked KV cache: token t goes to cache row slots[t], position positions[t].

One launch per layer writes every token of a batch (prefill chunks and decode tokens alike), reading slots and
positions from device tensors, so it has no host-dependent arguments beyond shapes (CUDA-graph friendly).
"""

import torch
import triton
import triton.language as tl

from ._common import check_float, check_last_contiguous, next_pow2
from .launch import LaunchPlan, launch


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr,
    n_kv_heads, head_dim,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kch, stride_kcp, stride_vcb, stride_vch, stride_vcp,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program t copies token t's (n_kv_heads, head_dim) keys and values.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (heads[:, None] < n_kv_heads) & (offs_d[None, :] < head_dim)
    k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=ok)
    v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=ok)
    kc = kc_ptr + slot * stride_kcb + pos * stride_kcp + heads[:, None] * stride_kch + offs_d[None, :]
    vc = vc_ptr + slot * stride_vcb + pos * stride_vcp + heads[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, k.to(kc_ptr.dtype.element_ty), mask=ok)
    tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=ok)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor, positions: torch.Tensor) -> None:
    """k, v (T, n_kv_heads, head_dim) -> k_cache/v_cache[slots[t], :, positions[t]] for every token t.

    k_cache, v_cache: (S, n_kv_heads, capacity, head_dim); slots, positions: (T,) int32/int64 device tensors
    (not checked against S / capacity: that would need a host sync). k/v may be strided views (a fused qkv).
    """
    if k.dim() != 3 or k.shape != v.shape or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"store_kv: need k/v (T, Hkv, D) and k/v_cache (S, Hkv, cap, D), got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    T, n_kv_heads, head_dim = k.shape
    if k_cache.shape[1] != n_kv_heads or k_cache.shape[3] != head_dim:
        raise ValueError(f"store_kv: cache {tuple(k_cache.shape)} does not fit k {tuple(k.shape)}")
    for name, t in (("slots", slots), ("positions", positions)):
        if t.shape != (T,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"store_kv: {name} must be ({T},) int32/int64, got {tuple(t.shape)} {t.dtype}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_float(f"store_kv {name}", t)
        check_last_contiguous(f"store_kv {name}", t)
    if T == 0:
        return
    plan = LaunchPlan(_store_kv_kernel, (T,), dict(BLOCK_H=next_pow2(n_kv_heads), BLOCK_D=next_pow2(head_dim)),
                      num_warps=1)
    launch(plan, k, v, k_cache, v_cache, slots, positions, n_kv_heads, head_dim,
           k.stride(0), k.stride(1), v.stride(0), v.stride(1),
           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
           v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
