"""SwiGLU activation of the fused gate/up projection: silu(gate) * up."""

import torch
import triton
import triton.language as tl

from ._common import check_float, check_last_contiguous
from .launch import LaunchPlan, launch


@triton.jit
def _swiglu_kernel(
    gu_ptr, y_ptr, I,
    stride_gu, stride_y,
    BLOCK: tl.constexpr,
):
    # Program (row, col-block): y[row, c] = silu(gate[row, c]) * up[row, c], with HF's roundings
    # (silu rounded to the model dtype, then the product rounded again).
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + I + cols, mask=ok, other=0.0).to(tl.float32)
    e = tl.exp(-tl.abs(gate))  # overflow-free sigmoid
    sigmoid = tl.where(gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    act = (gate * sigmoid).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (act * up).to(y_ptr.dtype.element_ty), mask=ok)


def swiglu(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up (M, 2*I) fp32/fp16/bf16, gate = first I columns, up = last I -> silu(gate) * up (M, I)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"swiglu: gate_up must be (M, 2*I), got {tuple(gate_up.shape)}")
    check_float("swiglu gate_up", gate_up)
    check_last_contiguous("swiglu gate_up", gate_up)
    M, I = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty((M, I), dtype=gate_up.dtype, device=gate_up.device) if out is None else out
    if tuple(y.shape) != (M, I) or y.dtype != gate_up.dtype:
        raise ValueError(f"swiglu: out must be ({M}, {I}) {gate_up.dtype}")
    check_last_contiguous("swiglu out", y)
    if M > 0 and I > 0:
        block = 1024
        plan = LaunchPlan(_swiglu_kernel, (M, triton.cdiv(I, block)), dict(BLOCK=block))
        launch(plan, gate_up, y, I, gate_up.stride(0), y.stride(0))
    return y
