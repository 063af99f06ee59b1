"""kernels.norm.rms_norm (with and without the residual fusion) against NumPy float64."""

import numpy as np
import pytest

from tests.kernel_support import DEVICE, TOL, f64, torch  # first: sets TRITON_INTERPRET
from kernels.norm import rms_norm
from kernels._common import interpreting


def _rand(shape, dtype, seed, scale=1.0):
    g = np.random.default_rng(seed)
    return torch.from_numpy((scale * g.standard_normal(shape)).astype(np.float32)).to(dtype).to(DEVICE)


def _ref_norm(h, w, eps):
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,hidden", [(1, 64), (5, 100), (3, 1030)])
def test_rms_norm(T, hidden, dtype):
    x, w = _rand((T, hidden), dtype, 1, 3.0), _rand((hidden,), dtype, 2)
    y = rms_norm(x, w, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    np.testing.assert_allclose(f64(y), _ref_norm(f64(x), f64(w), 1e-5), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,hidden", [(1, 48), (4, 130)])
def test_rms_norm_residual_fusion(T, hidden, dtype):
    x, r, w = _rand((T, hidden), dtype, 3), _rand((T, hidden), dtype, 4), _rand((hidden,), dtype, 5)
    y, h = rms_norm(x, w, 1e-6, residual=r)
    h_ref = f64(x) + f64(r)
    np.testing.assert_allclose(f64(h), h_ref, rtol=TOL[dtype], atol=TOL[dtype])
    # the normalised output is taken from h as rounded to the model dtype, as in the model
    np.testing.assert_allclose(f64(y), _ref_norm(f64(h), f64(w), 1e-6), rtol=TOL[dtype], atol=TOL[dtype])
    if dtype == torch.bfloat16 and not interpreting():
        # on the GPU h is exactly torch's bf16 add (fp32 add, round to nearest even); the interpreter
        # truncates fp32 -> bf16 casts instead of rounding, so there it is only within tolerance
        assert torch.equal(h, x + r)


def test_rms_norm_strided_rows():
    base = _rand((3, 90), torch.float32, 6)
    x = base[:, 5:69]
    w = _rand((64,), torch.float32, 7)
    np.testing.assert_allclose(f64(rms_norm(x, w, 1e-5)), _ref_norm(f64(x), f64(w), 1e-5), rtol=1e-4, atol=1e-5)
