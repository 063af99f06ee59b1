"""tinyllama_kernels.swiglu.swiglu against NumPy float64.

Gates span the whole sigmoid (large negative, near zero, large positive), so silu is not a plain ReLU or identity,
and the up half varies in sign and magnitude, so swapping the halves shows. Tolerance: silu(gate) is computed in fp32
(exp within FP32_TRANSCENDENTAL, a division and a product), rounded to the dtype (u), multiplied by up and rounded
again (u): |y - ref| <= (2u + u^2 + 4 * 2^-24 + FP32_TRANSCENDENTAL) |ref| + (1 + |up|) subnormal spacings (a
silu that rounds to a subnormal is off by up to one spacing, which the product with up scales).
"""

import numpy as np
import pytest

from tests.kernel_support import (DEVICE, FP32_TRANSCENDENTAL, FP32_U, assert_within, f64, subnormal_spacing, torch,
                                  unit_roundoff)  # first: sets TRITON_INTERPRET
from tinyllama_kernels.swiglu import swiglu


def _ref(gate_up):
    """(silu(gate) * up, |up|) in float64."""
    gu = f64(gate_up)
    I = gu.shape[1] // 2
    gate, up = gu[:, :I], gu[:, I:]
    with np.errstate(over="ignore"):
        return gate / (1.0 + np.exp(-gate)) * up, np.abs(up)


def _bound(ref, abs_up, dtype):
    u = unit_roundoff(dtype)
    return (2 * u + u * u + 4 * FP32_U + FP32_TRANSCENDENTAL) * np.abs(ref) + (1 + abs_up) * subnormal_spacing(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,I", [(1, 5), (3, 64), (2, 1500)])
def test_swiglu(M, I, dtype):
    g = np.random.default_rng(M * 7 + I)
    gate = g.choice([0.05, 1.0, 4.0, 15.0], (M, I)) * g.standard_normal((M, I))  # every part of the sigmoid
    up = g.choice([-1.0, 1.0], (M, I)) * np.exp(g.uniform(-4, 4, (M, I)))
    gate_up = torch.from_numpy(np.concatenate([gate, up], axis=1).astype(np.float32)).to(dtype).to(DEVICE)
    y = swiglu(gate_up)
    assert y.shape == (M, I) and y.dtype == dtype
    ref, abs_up = _ref(gate_up)
    assert_within(y, ref, _bound(ref, abs_up, dtype), f"swiglu {dtype}")


def test_swiglu_extreme_gates_are_finite():
    gate_up = torch.tensor([[-1000.0, 1000.0, 0.0, 2.0, 3.0, 4.0]], device=DEVICE)
    y = f64(swiglu(gate_up))
    np.testing.assert_allclose(y, [[0.0, 1000.0 * 3.0, 0.0]], atol=1e-4)
