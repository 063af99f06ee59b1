"""kernels.swiglu.swiglu against NumPy float64."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the Triton kernels need torch")
pytest.importorskip("triton", reason="the Triton kernels need triton")

from kernels._common import interpreting  # noqa: E402

from kernels.swiglu import swiglu  # noqa: E402

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device", allow_module_level=True)
DEVICE = "cpu" if interpreting() else "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _f64(t):
    return t.float().cpu().numpy().astype(np.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,I", [(1, 5), (3, 64), (2, 1500)])
def test_swiglu(M, I, dtype):
    g = np.random.default_rng(M * 7 + I)
    gate_up = torch.from_numpy((4 * g.standard_normal((M, 2 * I))).astype(np.float32)).to(dtype).to(DEVICE)
    y = swiglu(gate_up)
    assert y.shape == (M, I) and y.dtype == dtype
    gu = _f64(gate_up)
    gate, up = gu[:, :I], gu[:, I:]
    ref = gate / (1.0 + np.exp(-gate)) * up
    np.testing.assert_allclose(_f64(y), ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_swiglu_extreme_gates_are_finite():
    gate_up = torch.tensor([[-1000.0, 1000.0, 0.0, 2.0, 3.0, 4.0]], device=DEVICE)
    y = _f64(swiglu(gate_up))
    np.testing.assert_allclose(y, [[0.0, 1000.0 * 3.0, 0.0]], atol=1e-4)
