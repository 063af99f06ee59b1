"""What every Triton kernel test module needs, imported first: the interpreter on the CPU (set before triton loads),
torch and triton present or the module skipped, the device the kernels run on, and dtype tolerances."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch", reason="the Triton kernels need torch")
pytest.importorskip("triton", reason="the Triton kernels need triton")

from kernels._common import interpreting  # noqa: E402

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device", allow_module_level=True)
DEVICE = "cpu" if interpreting() else "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def f64(t) -> np.ndarray:
    """A device tensor as a float64 NumPy array (the reference's precision)."""
    return t.float().cpu().numpy().astype(np.float64)
