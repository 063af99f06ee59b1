"""kernels.norm.rms_norm (with and without the residual fusion) against NumPy float64."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the Triton kernels need torch")
pytest.importorskip("triton", reason="the Triton kernels need triton")

from kernels._common import interpreting  # noqa: E402

from kernels.norm import rms_norm  # noqa: E402

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device", allow_module_level=True)
DEVICE = "cpu" if interpreting() else "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _rand(shape, dtype, seed, scale=1.0):
    g = np.random.default_rng(seed)
    return torch.from_numpy((scale * g.standard_normal(shape)).astype(np.float32)).to(dtype).to(DEVICE)


def _f64(t):
    return t.float().cpu().numpy().astype(np.float64)


def _ref_norm(h, w, eps):
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,hidden", [(1, 64), (5, 100), (3, 1030)])
def test_rms_norm(T, hidden, dtype):
    x, w = _rand((T, hidden), dtype, 1, 3.0), _rand((hidden,), dtype, 2)
    y = rms_norm(x, w, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    np.testing.assert_allclose(_f64(y), _ref_norm(_f64(x), _f64(w), 1e-5), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,hidden", [(1, 48), (4, 130)])
def test_rms_norm_residual_fusion(T, hidden, dtype):
    x, r, w = _rand((T, hidden), dtype, 3), _rand((T, hidden), dtype, 4), _rand((hidden,), dtype, 5)
    y, h = rms_norm(x, w, 1e-6, residual=r)
    h_ref = _f64(x) + _f64(r)
    np.testing.assert_allclose(_f64(h), h_ref, rtol=TOL[dtype], atol=TOL[dtype])
    # the normalised output is taken from h as rounded to the model dtype, as in the model
    np.testing.assert_allclose(_f64(y), _ref_norm(_f64(h), _f64(w), 1e-6), rtol=TOL[dtype], atol=TOL[dtype])
    if dtype == torch.bfloat16 and not interpreting():
        # on the GPU h is exactly torch's bf16 add (fp32 add, round to nearest even); the interpreter
        # truncates fp32 -> bf16 casts instead of rounding, so there it is only within tolerance
        assert torch.equal(h, x + r)


def test_rms_norm_strided_rows():
    base = _rand((3, 90), torch.float32, 6)
    x = base[:, 5:69]
    w = _rand((64,), torch.float32, 7)
    np.testing.assert_allclose(_f64(rms_norm(x, w, 1e-5)), _ref_norm(_f64(x), _f64(w), 1e-5), rtol=1e-4, atol=1e-5)
