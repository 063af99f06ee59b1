"""Fused RMSNorm (Hugging Face LlamaRMSNorm semantics), optionally fused with the residual add."""

import torch
import triton
import triton.language as tl

from ._common import check_float, check_last_contiguous, check_like, next_pow2, output_like
from .launch import LaunchPlan, launch


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, h_ptr,
    N, eps,
    stride_x, stride_r, stride_y, stride_h,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per row: h = x (+ residual), rounded to the input dtype as in the model;
    # y = (h.f32 * rsqrt(mean(h.f32^2) + eps)).to(dtype) * weight, rounded to the input dtype.
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, h, mask=ok)
    hf = h.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps)
    normed = (hf * inv_rms).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """RMSNorm of x (T, hidden) fp32/fp16/bf16 with weight (hidden,); statistic in fp32.

    Without `residual`: returns y (T, hidden) in x's dtype.
    With `residual` (T, hidden): h = x + residual, returns (rms_norm(h) * weight, h), one pass.
    """
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm: need x (T, hidden) and weight (hidden,), got {tuple(x.shape)}, {tuple(weight.shape)}")
    check_float("rms_norm x", x)
    check_float("rms_norm weight", weight)
    check_last_contiguous("rms_norm x", x)
    if not weight.is_contiguous():
        raise ValueError("rms_norm: weight must be contiguous")
    T, N = x.shape
    y = output_like("rms_norm", x, out)
    if residual is not None:
        check_like("rms_norm", "residual", residual, x, "x")
        h = torch.empty_like(x)
        res, stride_r, stride_h = residual, residual.stride(0), h.stride(0)
    else:
        h, res, stride_r, stride_h = x, x, 0, 0  # unused by the kernel
    if T > 0:
        block = next_pow2(N)
        warps = min(16, max(1, block // 256))
        plan = LaunchPlan(_rms_norm_kernel, (T,), dict(HAS_RESIDUAL=residual is not None, BLOCK=block),
                          num_warps=warps)
        launch(plan, x, res, weight, y, h, N, float(eps), x.stride(0), stride_r, y.stride(0), stride_h)
    return (y, h) if residual is not None else y
