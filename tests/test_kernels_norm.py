"""tinyllama_kernels.norm.rms_norm (with and without the residual fusion) against NumPy float64.

The rows are chosen so that every term of y = x / sqrt(mean(x^2) + eps) * w shows: mean squares comparable to eps
(eps changes the result by ~30%), rows so tiny that eps dominates, rows so large that it vanishes, a lone large
element, a zero row. Tolerance: y is computed in fp32 (a K-term sum of squares: (K - 1) roundings of 2^-24;
rsqrt and the product within FP32_TRANSCENDENTAL), rounded to the dtype (u), multiplied by w and rounded again (u),
so |y - ref| <= (2u + u^2 + (K + 8) * 2^-24 + FP32_TRANSCENDENTAL) |ref| + (1 + |w|) subnormal spacings.
"""

import numpy as np
import pytest

from tests.kernel_support import (DEVICE, FP32_TRANSCENDENTAL, FP32_U, assert_within, f64, subnormal_spacing,
                                  torch, unit_roundoff)  # first: sets TRITON_INTERPRET
from tinyllama_kernels.norm import rms_norm
from tinyllama_kernels._common import interpreting

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tensor(a, dtype):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dtype).to(DEVICE)


def _rows(T, hidden, eps, seed):
    """T rows whose mean squares are: ~eps, ~eps/4, ~1e-4 eps (tiny: eps dominates), ~1e4 (eps invisible),
    one large element among small ones, all zeros; cycled to T rows."""
    g = np.random.default_rng(seed)
    kinds = [np.sqrt(eps) * g.standard_normal(hidden), 0.5 * np.sqrt(eps) * g.standard_normal(hidden),
             1e-2 * np.sqrt(eps) * g.standard_normal(hidden), 100.0 * g.standard_normal(hidden),
             np.where(np.arange(hidden) == hidden // 3, 30.0 * np.sqrt(eps), 1e-2 * np.sqrt(eps)),
             np.zeros(hidden)]
    return np.stack([kinds[i % len(kinds)] for i in range(T)])


def _weights(hidden, seed):
    g = np.random.default_rng(seed)
    return g.choice([-1.0, 1.0], hidden) * g.uniform(0.5, 2.0, hidden)


def _ref_norm(h, w, eps):
    eps = float(np.float32(eps))  # the kernel is handed eps as an fp32 scalar
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps) * w


def _bound(ref, w, dtype):
    u, hidden = unit_roundoff(dtype), ref.shape[-1]
    return ((2 * u + u * u + (hidden + 8) * FP32_U + FP32_TRANSCENDENTAL) * np.abs(ref)
            + (1 + np.abs(w)) * subnormal_spacing(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,hidden", [(6, 64), (7, 100), (6, 1030)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rms_norm(T, hidden, dtype, eps):
    x, w = _tensor(_rows(T, hidden, eps, 1), dtype), _tensor(_weights(hidden, 2), dtype)
    y = rms_norm(x, w, eps)
    assert y.shape == x.shape and y.dtype == dtype
    ref = _ref_norm(f64(x), f64(w), eps)
    assert_within(y, ref, _bound(ref, f64(w), dtype), f"rms_norm {dtype}")
    assert np.all(f64(y)[5] == 0)  # the zero row: 0 / sqrt(eps), no NaN


def test_eps_is_inside_the_square_root():
    """The rows whose mean square is eps: with eps outside the root (or left out) the result is 1.41x off."""
    eps = 1e-5
    x = _tensor(_rows(1, 256, eps, 3), torch.float32)
    w = _tensor(np.ones(256), torch.float32)
    y = f64(rms_norm(x, w, eps))
    h = f64(x)
    ms = np.mean(h * h)
    assert 0.5 * eps < ms < 2 * eps  # premise: eps is comparable to the mean square
    np.testing.assert_allclose(y, h / np.sqrt(ms + eps), rtol=1e-5)
    assert not np.allclose(y, h / np.sqrt(ms), rtol=1e-2) and not np.allclose(y, h / np.sqrt(ms) + eps, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,hidden", [(6, 48), (6, 130)])
def test_rms_norm_residual_fusion(T, hidden, dtype):
    eps = 1e-6
    x, r = _tensor(_rows(T, hidden, eps, 4), dtype), _tensor(_rows(T, hidden, eps, 5)[::-1], dtype)
    w = _tensor(_weights(hidden, 6), dtype)
    y, h = rms_norm(x, w, eps, residual=r)
    h_ref = f64(x) + f64(r)  # h is x + r computed in fp32 and rounded once to the dtype
    u = unit_roundoff(dtype)
    assert_within(h, h_ref, u * np.abs(h_ref) + subnormal_spacing(dtype), "residual sum")
    # the normalised output is taken from h as rounded to the model dtype, as in the model
    ref = _ref_norm(f64(h), f64(w), eps)
    assert_within(y, ref, _bound(ref, f64(w), dtype), f"fused rms_norm {dtype}")
    if dtype != torch.float32 and not (dtype == torch.bfloat16 and interpreting()):
        # h is exactly torch's own add (fp32 add, round to nearest even); the interpreter truncates fp32 -> bf16
        assert torch.equal(h, x + r)


def test_rms_norm_strided_rows():
    base = _tensor(np.random.default_rng(6).standard_normal((3, 90)), torch.float32)
    x = base[:, 5:69]
    w = _tensor(_weights(64, 7), torch.float32)
    ref = _ref_norm(f64(x), f64(w), 1e-5)
    assert_within(rms_norm(x, w, 1e-5), ref, _bound(ref, f64(w), torch.float32), "strided rows")
