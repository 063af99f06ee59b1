"""What every Triton kernel test module needs, imported first: the interpreter on the CPU (set before triton loads),
torch and triton present or the module skipped, the device the kernels run on, and the rounding error of each
format, from which the tests derive their tolerances against float64 references.

Error model (stated once, used by every kernel test): a result rounded to a format with unit roundoff u lies within
u * |exact| of the exact value (normal range) and within one subnormal spacing of it near zero. Inputs are made in
the tested dtype, so the float64 reference starts from exactly the values the kernel reads; every difference comes
from the kernel's own roundings: its fp32 arithmetic (u = 2^-24 per operation, K - 1 of them in a K-term sum) and its
conversions of fp32 results to the tested dtype.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch", reason="the Triton kernels need torch")
pytest.importorskip("triton", reason="the Triton kernels need triton")

from tinyllama_kernels._common import interpreting  # noqa: E402

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device", allow_module_level=True)
DEVICE = "cpu" if interpreting() else "cuda"

FP32_U = 2.0 ** -24  # unit roundoff of one fp32 operation (round to nearest)
# fp32 arithmetic the kernels do beyond + - * /: exp/exp2/rsqrt are within a few ulp (GPU fast-math included).
FP32_TRANSCENDENTAL = 8 * FP32_U


def unit_roundoff(dtype) -> float:
    """Largest relative error of converting an fp32 value to `dtype` in a kernel: 2^-24 (fp32: no conversion, but
    one fp32 rounding), 2^-11 (fp16), 2^-8 (bf16), rounding to nearest. Triton's CPU interpreter converts
    fp32 -> bf16 by truncating the low 16 bits instead (measured: it does), which is within 2^-7."""
    if dtype == torch.float32:
        return FP32_U
    if dtype == torch.float16:
        return 2.0 ** -11
    return 2.0 ** -7 if interpreting() else 2.0 ** -8


def subnormal_spacing(dtype) -> float:
    """Absolute error of one conversion near zero: the spacing of `dtype`'s subnormals."""
    info = torch.finfo(dtype)
    return float(info.smallest_normal) * float(info.eps)


def f64(t) -> np.ndarray:
    """A device tensor (or an array) as a float64 NumPy array (the reference's precision)."""
    if isinstance(t, np.ndarray):
        return t.astype(np.float64)
    return t.float().cpu().numpy().astype(np.float64)


def assert_within(got, ref: np.ndarray, bound: np.ndarray, what: str = "") -> None:
    """Every |got - ref| <= bound (elementwise, broadcast); the message names the worst element and its ratio."""
    err = np.abs(f64(got) - ref)
    bound = np.broadcast_to(bound, err.shape)
    ratio = err / np.where(bound > 0, bound, np.finfo(np.float64).tiny)
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    assert ratio[worst] <= 1.0, (f"{what}: |error| {err[worst]:.3e} > bound {bound[worst]:.3e} at {worst} "
                                 f"(ref {ref[worst]:.6e}, {np.count_nonzero(ratio > 1)} elements over)")


# A whole forward in a 16-bit dtype rounds on the way to each logit: per layer the norm (2: normed, times weight),
# qkv, rotary, attention (2: p before p @ v, the output), o_proj, the residual add, the second norm (2), gate_up,
# swiglu (2), down_proj, the residual add; then the first norm (2) and lm_head: R = 15 L + 3 roundings.
ROUNDINGS_PER_LAYER, ROUNDINGS_OUTSIDE_LAYERS = 15, 3


def forward_tolerance(dtype, n_layers: int) -> float:
    """Largest |logit difference| / logit scale allowed between a forward in `dtype` and an fp32 forward on the same
    (`dtype`-rounded) weights. Each of the R roundings perturbs what it rounds by at most u; independent ones add in
    quadrature, so sqrt(R) u is their typical combined size at the logits (the worst case, R u, is far above what
    they reach); allowed: 2 sqrt(R) u. fp32: the NumPy and Triton fp32 forwards differ only in summation order: 1e-4.
    """
    if dtype == torch.float32:
        return 1e-4
    rounds = ROUNDINGS_PER_LAYER * n_layers + ROUNDINGS_OUTSIDE_LAYERS
    return 2 * np.sqrt(rounds) * unit_roundoff(dtype)


def rounded_weights(weights, dtype):
    """A ModelWeights whose every array is rounded to `dtype` (as a 16-bit backend holds them), kept in float32."""
    import dataclasses

    from engine.runtime.weights import LayerWeights, ModelWeights

    def r(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).float().numpy()

    layers = [LayerWeights(**{f.name: r(getattr(layer, f.name)) for f in dataclasses.fields(layer)})
              for layer in weights.layers]
    embed = r(weights.embed)
    lm_head = embed if weights.lm_head is weights.embed else r(weights.lm_head)
    return ModelWeights(embed=embed, layers=layers, final_norm=r(weights.final_norm), lm_head=lm_head)
