"""kernels.matmul against a NumPy float64 reference (Triton interpreter on CPU unless TRITON_INTERPRET=0 on a GPU)."""

import numpy as np
import pytest

from tests.kernel_support import DEVICE, TOL, f64, torch  # first: sets TRITON_INTERPRET
from kernels.matmul import DECODE_MAX_M, matmul


def _rand(shape, dtype, seed):
    g = np.random.default_rng(seed)
    return torch.from_numpy(g.standard_normal(shape).astype(np.float32)).to(dtype).to(DEVICE)


def _assert_close(got, ref, dtype):
    tol = TOL[dtype]
    np.testing.assert_allclose(f64(got), ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 37, 150), (3, 16, 33), (DECODE_MAX_M, 50, 260),  # decode path
                                   (9, 45, 100), (70, 130, 72)])  # tiled GEMM path
def test_matmul_matches_numpy(M, N, K, dtype):
    x, w = _rand((M, K), dtype, 1), _rand((N, K), dtype, 2)
    y = matmul(x, w)
    assert y.shape == (M, N) and y.dtype == dtype
    _assert_close(y, f64(x) @ f64(w).T, dtype)


@pytest.mark.parametrize("split_k", [1, 2, 3, 64])
def test_matmul_decode_split_k(split_k):
    x, w = _rand((2, 300), torch.float32, 3), _rand((21, 300), torch.float32, 4)
    y = matmul(x, w, split_k=split_k)
    _assert_close(y, f64(x) @ f64(w).T, torch.float32)


@pytest.mark.parametrize("M", [2, 20])
def test_matmul_strided_x_and_out(M):
    base = _rand((M, 80), torch.float32, 5)
    x = base[:, 7:57]  # row stride 80, not contiguous
    w = _rand((24, 50), torch.float32, 6)
    out = torch.full((M, 24), float("nan"), device=DEVICE)
    y = matmul(x, w, out=out)
    assert y is out
    _assert_close(y, f64(x) @ f64(w).T, torch.float32)


def test_matmul_rejects_bad_shapes():
    with pytest.raises(ValueError):
        matmul(_rand((2, 8), torch.float32, 0), _rand((3, 9), torch.float32, 0))
    with pytest.raises(TypeError):
        matmul(_rand((2, 8), torch.float32, 0), _rand((3, 8), torch.bfloat16, 0))
