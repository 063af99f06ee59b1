"""Rotary position embedding, Hugging Face `rotate_half` convention.

out = x * cos[pos] + rotate_half(x) * sin[pos], rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]),
computed in fp32 and rounded once to x's dtype.
"""

import torch
import triton
import triton.language as tl

from ._common import check_float, check_last_contiguous, next_pow2
from .launch import LaunchPlan, launch


@triton.jit
def _rotary_kernel(
    x_ptr, y_ptr, cos_ptr, sin_ptr, pos_ptr,
    n_heads, half,
    stride_xt, stride_xh, stride_yt, stride_yh, stride_cs,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # Program (t, head-block) rotates heads [hb*BLOCK_H, ...) of token t; x and y may alias.
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_ok = cols < half
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos_lo = tl.load(cos_ptr + pos * stride_cs + cols, mask=col_ok, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_ptr + pos * stride_cs + half + cols, mask=col_ok, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_ptr + pos * stride_cs + cols, mask=col_ok, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_ptr + pos * stride_cs + half + cols, mask=col_ok, other=0.0).to(tl.float32)

    ok = (heads[:, None] < n_heads) & col_ok[None, :]
    x_lo_ptrs = x_ptr + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    x_lo = tl.load(x_lo_ptrs, mask=ok, other=0.0).to(tl.float32)
    x_hi = tl.load(x_lo_ptrs + half, mask=ok, other=0.0).to(tl.float32)
    y_lo = x_lo * cos_lo[None, :] - x_hi * sin_lo[None, :]
    y_hi = x_hi * cos_hi[None, :] + x_lo * sin_hi[None, :]
    y_lo_ptrs = y_ptr + t * stride_yt + heads[:, None] * stride_yh + cols[None, :]
    tl.store(y_lo_ptrs, y_lo.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(y_lo_ptrs + half, y_hi.to(y_ptr.dtype.element_ty), mask=ok)


def _check_tables(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, T: int, head_dim: int) -> None:
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != head_dim:
        raise ValueError(f"rotary: cos/sin must both be (max_pos, {head_dim}), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if cos.stride() != sin.stride():
        raise ValueError("rotary: cos and sin must have the same strides")
    check_float("rotary cos", cos)
    check_float("rotary sin", sin)
    check_last_contiguous("rotary cos", cos)
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rotary: positions must be ({T},) int32/int64, got {tuple(positions.shape)} {positions.dtype}")
    if head_dim % 2:
        raise ValueError(f"rotary: head_dim must be even, got {head_dim}")


def _launch(x3: torch.Tensor, y3: torch.Tensor, n_heads: int, cos, sin, positions) -> None:
    """Rotate heads 0..n_heads-1 of x3 (T, >=n_heads, head_dim) into y3 (same layout)."""
    T, _, head_dim = x3.shape
    if T == 0 or n_heads == 0:
        return
    block_half = next_pow2(head_dim // 2)
    block_h = min(next_pow2(n_heads), max(1, 4096 // block_half))
    plan = LaunchPlan(_rotary_kernel, (T, triton.cdiv(n_heads, block_h)), dict(BLOCK_H=block_h, BLOCK_HALF=block_half))
    launch(plan, x3, y3, cos, sin, positions, n_heads, head_dim // 2,
           x3.stride(0), x3.stride(1), y3.stride(0), y3.stride(1), cos.stride(0))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 inplace: bool = False) -> torch.Tensor:
    """Rotate x (T, n_heads, head_dim) fp32/fp16/bf16 by cos/sin (max_pos, head_dim) rows at positions (T,) int.

    Returns a new tensor, or x itself when `inplace`.
    """
    if x.dim() != 3:
        raise ValueError(f"apply_rotary: x must be (T, n_heads, head_dim), got {tuple(x.shape)}")
    check_float("apply_rotary x", x)
    check_last_contiguous("apply_rotary x", x)
    T, n_heads, head_dim = x.shape
    _check_tables(cos, sin, positions, T, head_dim)
    y = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, y, n_heads, cos, sin, positions)
    return y


def apply_rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                     n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """In place on the fused qkv (T, (n_heads + 2*n_kv_heads)*head_dim): rotate the q and k heads, leave v.

    One kernel launch covers the n_heads + n_kv_heads heads that precede v. Returns qkv.
    """
    width = (n_heads + 2 * n_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(f"apply_rotary_qkv: qkv must be (T, {width}), got {tuple(qkv.shape)}")
    check_float("apply_rotary_qkv qkv", qkv)
    check_last_contiguous("apply_rotary_qkv qkv", qkv)
    T = qkv.shape[0]
    _check_tables(cos, sin, positions, T, head_dim)
    x3 = qkv.view(T, n_heads + 2 * n_kv_heads, head_dim) if qkv.is_contiguous() else \
        qkv.as_strided((T, n_heads + 2 * n_kv_heads, head_dim), (qkv.stride(0), head_dim, 1))
    _launch(x3, x3, n_heads + n_kv_heads, cos, sin, positions)
    return qkv
