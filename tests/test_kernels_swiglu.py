"""kernels.swiglu.swiglu against NumPy float64."""

import numpy as np
import pytest

from tests.kernel_support import DEVICE, TOL, f64, torch  # first: sets TRITON_INTERPRET
from kernels.swiglu import swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,I", [(1, 5), (3, 64), (2, 1500)])
def test_swiglu(M, I, dtype):
    g = np.random.default_rng(M * 7 + I)
    gate_up = torch.from_numpy((4 * g.standard_normal((M, 2 * I))).astype(np.float32)).to(dtype).to(DEVICE)
    y = swiglu(gate_up)
    assert y.shape == (M, I) and y.dtype == dtype
    gu = f64(gate_up)
    gate, up = gu[:, :I], gu[:, I:]
    ref = gate / (1.0 + np.exp(-gate)) * up
    np.testing.assert_allclose(f64(y), ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_swiglu_extreme_gates_are_finite():
    gate_up = torch.tensor([[-1000.0, 1000.0, 0.0, 2.0, 3.0, 4.0]], device=DEVICE)
    y = f64(swiglu(gate_up))
    np.testing.assert_allclose(y, [[0.0, 1000.0 * 3.0, 0.0]], atol=1e-4)
