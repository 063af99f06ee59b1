"""Small helpers shared by the kernels: dtype checks, block-size rounding, dot modes."""

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# How a kernel's tl.dot treats its inputs (a constexpr passed to every kernel that multiplies tiles).
DOT_NATIVE = 0  # bf16/fp16 tensor-core dot with fp32 accumulation
DOT_IEEE = 1  # fp32 inputs: full fp32 precision (no TF32), so fp32 results match to ~1e-6
DOT_UPCAST = 2  # interpreter + bf16: upcast to fp32 first (the interpreter's bf16 dot is broken)


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_mode(dtype: torch.dtype, interpret: bool) -> int:
    """The DOT_* mode for tiles of `dtype`: on a GPU, or in the interpreter when `interpret` (a Target's field)."""
    if dtype == torch.float32:
        return DOT_IEEE
    if dtype == torch.bfloat16 and interpret:
        return DOT_UPCAST
    return DOT_NATIVE


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return triton.next_power_of_2(max(int(n), 1))


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise TypeError unless `t` is fp32/fp16/bf16."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32/float16/bfloat16, got {t.dtype}")


def check_last_contiguous(name: str, t: torch.Tensor) -> None:
    """Raise ValueError unless the last dimension of `t` has stride 1."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {t.stride()}")


def check_like(kernel: str, name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    """Raise ValueError unless `t` has `like`'s shape and dtype and a contiguous last dimension."""
    if t.shape != like.shape or t.dtype != like.dtype:
        raise ValueError(f"{kernel}: {name} must match {like_name}'s shape and dtype")
    check_last_contiguous(f"{kernel} {name}", t)


def output_like(kernel: str, like: torch.Tensor, out: torch.Tensor | None, name: str = "x") -> torch.Tensor:
    """`out` checked against `like` (check_like), or a new contiguous tensor of `like`'s shape and dtype."""
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    check_like(kernel, "out", out, like, name)
    return out


def check_qkv(kernel: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Raise unless q, k_cache and v_cache are fp32/fp16/bf16 of one dtype with a contiguous last dimension."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_float(f"{kernel} {name}", t)
        check_last_contiguous(f"{kernel} {name}", t)
        if t.dtype != q.dtype:
            raise TypeError(f"{kernel}: q, k_cache and v_cache must share a dtype")


@triton.jit
def tile_dot(a, b, DOT_MODE: tl.constexpr):
    """fp32 (BM, BN) = a (BM, BK) @ b (BK, BN) for 16-bit or fp32 tiles, as chosen by DOT_MODE."""
    if DOT_MODE == 1:
        c = tl.dot(a, b, input_precision="ieee")
    elif DOT_MODE == 2:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, DOT_MODE: tl.constexpr):
    """One key/value tile of flash attention: s (BM, BN) log2-domain scores (-inf where masked), v (BN, BD) values;
    running row max m_i (BM,), row sum l_i (BM,) and output acc (BM, BD), all fp32 -> updated (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, DOT_MODE)
    return m_new, l_i, acc
