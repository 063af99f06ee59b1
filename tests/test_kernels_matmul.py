"""tinyllama_kernels.matmul against a NumPy float64 reference (Triton interpreter on CPU unless TRITON_INTERPRET=0 on a GPU).

Tolerance: products of fp16/bf16 values are exact in fp32; the K-term sum in fp32 (any order: tiles, split-K
partials) is within (K - 1) * 2^-24 * sum_k |x_k w_k| of the exact sum, fp32 inputs add one rounding per product;
the result is rounded once to the dtype (u). So |y - ref| <= u |ref| + (1 + u) (K + 1) a (|x| @ |w|.T) + one
subnormal spacing, with a = 2^-24 (IEEE fp32 accumulation: the interpreter, and fp32's DOT_IEEE) or 2^-22 for
16-bit tensor-core dots on a GPU, whose fp32 accumulation is not round-to-nearest.
"""

import numpy as np
import pytest

from tests.kernel_support import (DEVICE, FP32_U, assert_within, f64, subnormal_spacing, torch,
                                  unit_roundoff)  # first: sets TRITON_INTERPRET
from tinyllama_kernels._common import interpreting
from tinyllama_kernels.matmul import DECODE_MAX_M, matmul


def _rand(shape, dtype, seed):
    g = np.random.default_rng(seed)
    return torch.from_numpy(g.standard_normal(shape).astype(np.float32)).to(dtype).to(DEVICE)


def _assert_close(got, x, w, dtype):
    """got against f64(x) @ f64(w).T within the bound derived above."""
    xd, wd = f64(x), f64(w)
    ref = xd @ wd.T
    u, k = unit_roundoff(dtype), xd.shape[1]
    a = FP32_U if dtype == torch.float32 or interpreting() else 4 * FP32_U
    bound = u * np.abs(ref) + (1 + u) * (k + 1) * a * (np.abs(xd) @ np.abs(wd).T) + subnormal_spacing(dtype)
    assert_within(got, ref, bound, f"matmul {tuple(xd.shape)} x {tuple(wd.shape)} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 37, 150), (3, 16, 33), (DECODE_MAX_M, 50, 260),  # decode path
                                   (9, 45, 100), (70, 130, 72)])  # tiled GEMM path
def test_matmul_matches_numpy(M, N, K, dtype):
    x, w = _rand((M, K), dtype, 1), _rand((N, K), dtype, 2)
    y = matmul(x, w)
    assert y.shape == (M, N) and y.dtype == dtype
    _assert_close(y, x, w, dtype)


@pytest.mark.parametrize("split_k", [1, 2, 3, 64])
def test_matmul_decode_split_k(split_k):
    x, w = _rand((2, 300), torch.float32, 3), _rand((21, 300), torch.float32, 4)
    y = matmul(x, w, split_k=split_k)
    _assert_close(y, x, w, torch.float32)


@pytest.mark.parametrize("M", [2, 20])
def test_matmul_strided_x_and_out(M):
    base = _rand((M, 80), torch.float32, 5)
    x = base[:, 7:57]  # row stride 80, not contiguous
    w = _rand((24, 50), torch.float32, 6)
    out = torch.full((M, 24), float("nan"), device=DEVICE)
    y = matmul(x, w, out=out)
    assert y is out
    _assert_close(y, x, w, torch.float32)


def test_matmul_rejects_bad_shapes():
    with pytest.raises(ValueError):
        matmul(_rand((2, 8), torch.float32, 0), _rand((3, 9), torch.float32, 0))
    with pytest.raises(TypeError):
        matmul(_rand((2, 8), torch.float32, 0), _rand((3, 8), torch.bfloat16, 0))
