"""tinyllama_kernels.rotary (Hugging Face rotate_half convention) against NumPy float64.

Each output element is x_i cos - x_j sin (or x_j cos + x_i sin) computed in fp32 from fp32 tables (two products and
a sum: within 3 * 2^-24 of the sum of the terms' magnitudes) and rounded once to the dtype (u):
|y - ref| <= u |ref| + (1 + u) 3 * 2^-24 (|x_i cos| + |x_j sin|) + one subnormal spacing.
"""

import numpy as np
import pytest

from tests.kernel_support import (DEVICE, FP32_U, assert_within, f64, subnormal_spacing, torch,
                                  unit_roundoff)  # first: sets TRITON_INTERPRET
from tinyllama_kernels.rotary import apply_rotary, apply_rotary_qkv


def _tables(max_pos, head_dim, theta=10000.0):
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    ang = np.outer(np.arange(max_pos), inv)
    ang = np.concatenate([ang, ang], axis=-1)
    return (torch.from_numpy(np.cos(ang).astype(np.float32)).to(DEVICE),
            torch.from_numpy(np.sin(ang).astype(np.float32)).to(DEVICE))


def _ref_rotary(x, cos, sin, positions):
    """(reference, bound's magnitude term |x cos| + |rotate_half(x) sin|)."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    return x * c + rot * s, np.abs(x * c) + np.abs(rot * s)


def _bound(ref, magnitude, dtype):
    u = unit_roundoff(dtype)
    return u * np.abs(ref) + (1 + u) * 3 * FP32_U * magnitude + subnormal_spacing(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,n_heads,head_dim", [(1, 4, 8), (5, 3, 64), (2, 2, 12)])
@pytest.mark.parametrize("inplace", [False, True])
def test_apply_rotary(T, n_heads, head_dim, dtype, inplace):
    g = np.random.default_rng(T + n_heads + head_dim)
    x = torch.from_numpy(g.standard_normal((T, n_heads, head_dim)).astype(np.float32)).to(dtype).to(DEVICE)
    cos, sin = _tables(64, head_dim)
    positions = torch.from_numpy(g.integers(1, 64, size=T).astype(np.int32)).to(DEVICE)  # > 0: a real rotation
    ref, magnitude = _ref_rotary(f64(x), f64(cos), f64(sin), positions.cpu().numpy())
    y = apply_rotary(x, cos, sin, positions, inplace=inplace)
    assert (y is x) == inplace and y.dtype == dtype
    assert_within(y, ref, _bound(ref, magnitude, dtype), f"rotary {dtype}")


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_qkv_in_place(n_heads, n_kv_heads, dtype):
    T, head_dim, start_pos = 3, 8, 5
    g = np.random.default_rng(n_heads * 10 + n_kv_heads)
    width = (n_heads + 2 * n_kv_heads) * head_dim
    qkv = torch.from_numpy(g.standard_normal((T, width)).astype(np.float32)).to(dtype).to(DEVICE)
    before = f64(qkv).reshape(T, n_heads + 2 * n_kv_heads, head_dim)
    cos, sin = _tables(32, head_dim)
    positions = torch.arange(start_pos, start_pos + T, dtype=torch.int64, device=DEVICE)
    out = apply_rotary_qkv(qkv, cos, sin, positions, n_heads, n_kv_heads, head_dim)
    assert out is qkv
    after = f64(qkv).reshape(T, n_heads + 2 * n_kv_heads, head_dim)
    n_rot = n_heads + n_kv_heads
    ref, magnitude = _ref_rotary(before[:, :n_rot], f64(cos), f64(sin), positions.cpu().numpy())
    assert_within(after[:, :n_rot], ref, _bound(ref, magnitude, dtype), f"rotary qkv {dtype}")
    np.testing.assert_array_equal(after[:, n_rot:], before[:, n_rot:])  # v untouched


def test_position_zero_is_identity():
    cos, sin = _tables(4, 16)
    x = torch.randn(2, 3, 16, device=DEVICE)
    y = apply_rotary(x, cos, sin, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    np.testing.assert_array_equal(f64(y), f64(x))  # cos 1, sin 0: exact
