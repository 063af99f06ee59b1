"""y = x @ w.T for weights in Hugging Face [out_features, in_features] layout.

Two paths, picked by the number of rows M of x:
  * M > DECODE_MAX_M (prefill): a tiled GEMM with tl.dot, fixed configs and grouped
    tile ordering (GROUP_M row-tiles share column tiles, so w tiles stay in L2);
  * M <= DECODE_MAX_M (decode): a GEMV-style kernel that streams every weight once
    (each program owns BLOCK_N output columns and multiplies them against all M rows),
    split over K when there are too few column tiles to fill the GPU; the fp32 partial
    sums are then added by a tiny reduction kernel.
Both accumulate in fp32 and write the result in x's dtype.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import check_float, dot_mode, next_pow2, tile_dot
from .launch import LaunchPlan, Target, launch, target_of

DECODE_MAX_M = 8


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_MODE: tl.constexpr,
):
    # Grouped ordering: consecutive programs walk down GROUP_M row tiles before moving right.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    group_id = pid // pids_per_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wt_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BLOCK_K, BLOCK_N) tile of w.T
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(x_ptrs, mask=m_ok & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(wt_ptrs, mask=(offs_k[:, None] < k_left) & n_ok, other=0.0)
        acc += tile_dot(a, b, DOT_MODE)
        x_ptrs += BLOCK_K * stride_xk
        wt_ptrs += BLOCK_K * stride_wk

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_os, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (pid_n, pid_k) computes out[pid_k, :, n-tile] = x[:, k-range] @ w[n-tile, k-range].T
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_start = pid_k * k_per_split
    k_end = min(k_start + k_per_split, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = (k0 + offs_k) < k_end
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)

    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _splitk_reduce_kernel(
    part_ptr, y_ptr, MN, SPLIT_K,
    BLOCK: tl.constexpr,
):
    # y.flat[i] = sum_s part[s].flat[i]   (part: (SPLIT_K, M, N) fp32 contiguous, y contiguous)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def _check_inputs(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"matmul: x must be (M, K) and w (N, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"matmul: inner sizes differ: x {tuple(x.shape)} vs w {tuple(w.shape)}")
    check_float("matmul x", x)
    check_float("matmul w", w)
    if x.dtype != w.dtype:
        raise TypeError(f"matmul: x and w dtypes differ ({x.dtype} vs {w.dtype})")
    if x.device != w.device:
        raise ValueError("matmul: x and w are on different devices")
    shape = (x.shape[0], w.shape[0])
    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != shape or out.dtype != x.dtype:
        raise ValueError(f"matmul: out must be {shape} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    return out


def plan_gemm(M: int, N: int, dtype: torch.dtype, target: Target) -> LaunchPlan:
    """The tiled-GEMM launch for y (M, N) = x (M, K) @ w (N, K).T in `dtype` on `target`."""
    if dtype == torch.float32:  # fp32 tiles are twice as big in shared memory
        block_m, block_n, block_k, warps, stages = 64, 64, 32, 4, 3
    elif M >= 128:
        block_m, block_n, block_k, warps, stages = 128, 128, 64, 8, 3
    else:
        block_m, block_n, block_k, warps, stages = 64, 64, 64, 4, 4
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                      DOT_MODE=dot_mode(dtype, target.interpret))
    return LaunchPlan(_gemm_kernel, grid, constexprs, num_warps=warps, num_stages=stages)


class GemvPlan(NamedTuple):
    """The decode path's launches: `gemv` over (n_tiles, split_k) programs, each summing k_per_split of K; when
    split_k > 1 it writes fp32 partials (split_k, M, N) that `reduce` adds up (None when split_k == 1)."""

    gemv: LaunchPlan
    split_k: int
    k_per_split: int
    reduce: LaunchPlan | None


def plan_gemv(M: int, N: int, K: int, split_k: int | None, target: Target) -> GemvPlan:
    """The weight-streaming launches for y (M, N) = x (M, K) @ w (N, K).T, M <= DECODE_MAX_M; `split_k` None: ~4
    programs per SM of `target`."""
    block_m = next_pow2(M)
    block_n = max(16, 64 // block_m)  # keep the (BLOCK_M, BLOCK_N, BLOCK_K) product tile at 8K elements
    block_k = 128
    n_tiles = triton.cdiv(N, block_n)
    k_blocks = triton.cdiv(K, block_k)
    if split_k is None:  # aim for ~4 programs per SM
        split_k = triton.cdiv(4 * target.sm_count, n_tiles)
    split_k = max(1, min(int(split_k), k_blocks))
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    # 8 warps: 32-64 product elements per thread, 64-123 registers on sm_80/sm_90 (4 warps took 96-168 and spilled
    # in fp32 on sm_80 with BLOCK_M=4, tinyllama_kernels.aot)
    gemv = LaunchPlan(_gemv_kernel, (n_tiles, split_k), dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k),
                      num_warps=8)
    reduce = None
    if split_k > 1:
        block = 1024
        reduce = LaunchPlan(_splitk_reduce_kernel, (triton.cdiv(M * N, block),), dict(BLOCK=block))
    return GemvPlan(gemv, split_k, k_per_split, reduce)


def _gemm(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, target: Target) -> None:
    M, K = x.shape
    N = w.shape[0]
    launch(plan_gemm(M, N, x.dtype, target), x, w, y, M, N, K,
           x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1))


def _gemv(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, split_k: int | None, target: Target) -> None:
    M, K = x.shape
    N = w.shape[0]
    plan = plan_gemv(M, N, K, split_k, target)
    if plan.split_k == 1:
        part, strides = y, (0, y.stride(0), y.stride(1))
    else:
        part = torch.empty((plan.split_k, M, N), dtype=torch.float32, device=x.device)
        strides = part.stride()
    launch(plan.gemv, x, w, part, M, N, K, plan.k_per_split,
           x.stride(0), x.stride(1), w.stride(0), w.stride(1), *strides)
    if plan.reduce is not None:
        dest = y if y.is_contiguous() else torch.empty((M, N), dtype=y.dtype, device=y.device)
        launch(plan.reduce, part, dest, M * N, plan.split_k)
        if dest is not y:
            y.copy_(dest)


def matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
           split_k: int | None = None, target: Target | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) @ w (N, K).T; fp32/fp16/bf16 (same for x and w), fp32 accumulation, y in x's dtype.

    Uses the decode path (weight-streaming GEMV, split over K) for M <= DECODE_MAX_M,
    the tiled GEMM otherwise. `split_k` overrides the decode path's K split (tests/tuning). `target`: the device
    facts the launch is planned for (default: x's device's own).
    """
    y = _check_inputs(x, w, out)
    target = target if target is not None else target_of(x.device)
    M, K = x.shape
    if M == 0 or y.shape[1] == 0:
        return y
    if K == 0:
        return y.zero_()
    if M <= DECODE_MAX_M:
        _gemv(x, w, y, split_k, target)
    else:
        _gemm(x, w, y, target)
    return y
