"""The NumPy building blocks against float64 computations written out independently."""
from __future__ import annotations

import numpy as np
import pytest

from engine.runtime import layers


def f64(a):
    return np.asarray(a, dtype=np.float64)


@pytest.mark.parametrize("m", [1, 2, 5, 12, 13, 40, 64, 65])
def test_linear_every_path(m):
    """x @ w.T for one row, a few rows and many rows: the compiled kernel up to NATIVE_MAX_ROWS, then BLAS GEMM."""
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, 1024)).astype(np.float32)
    w = rng.standard_normal((3000, 1024)).astype(np.float32)  # 12 MB: three 4 MB blocks
    y = layers.linear(x, w)
    assert y.dtype == np.float32 and y.shape == (m, 3000)
    assert np.abs(y - f64(x) @ f64(w).T).max() < 1e-4 * np.abs(f64(x) @ f64(w).T).max()


def test_rms_norm():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    ref = f64(w) * f64(x) / np.sqrt(np.mean(f64(x) ** 2, axis=-1, keepdims=True) + 1e-5)
    out = layers.rms_norm(x, w, np.float32(1e-5))
    assert out.dtype == np.float32 and np.abs(out - ref).max() < 1e-5


def test_apply_rotary_rotates_pairs_half_apart():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 2, 8)).astype(np.float32)
    angles = rng.uniform(0, 6, size=(4, 4))
    cos = np.cos(np.concatenate([angles, angles], -1)).astype(np.float32)
    sin = np.sin(np.concatenate([angles, angles], -1)).astype(np.float32)
    out = layers.apply_rotary(x, cos, sin)
    for t in range(4):
        for i in range(4):  # dimension i pairs with i + half (rotate_half convention)
            c, s = np.cos(angles[t, i]), np.sin(angles[t, i])
            a, b = f64(x[t, :, i]), f64(x[t, :, i + 4])
            assert np.allclose(out[t, :, i], a * c - b * s, atol=1e-6)
            assert np.allclose(out[t, :, i + 4], b * c + a * s, atol=1e-6)


# Every attention implementation the runtime has (a compiled one may stand in front of the NumPy one: both held).
ATTENTIONS = [getattr(layers, name) for name in ("attention", "attention_numpy") if hasattr(layers, name)]


@pytest.mark.parametrize("attention", ATTENTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("heads, kv_heads, t, start", [(4, 4, 1, 6), (4, 2, 5, 0), (8, 2, 3, 4), (4, 1, 7, 2),
                                                       (4, 2, 2, 3)])
def test_attention_is_causal_gqa(heads, kv_heads, t, start, attention):
    rng = np.random.default_rng(heads * 10 + t)
    d = 8
    q = rng.standard_normal((t, heads, d)).astype(np.float32)
    k = rng.standard_normal((kv_heads, start + t, d)).astype(np.float32)
    v = rng.standard_normal((kv_heads, start + t, d)).astype(np.float32)
    out = attention(q, k, v, start)
    group = heads // kv_heads
    for i in range(t):
        for h in range(heads):
            keys, values = f64(k[h // group, : start + i + 1]), f64(v[h // group, : start + i + 1])
            scores = keys @ f64(q[i, h]) / np.sqrt(d)
            p = np.exp(scores - scores.max())
            expected = (p / p.sum()) @ values
            assert np.allclose(out[i, h * d : (h + 1) * d], expected, atol=1e-5)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_swiglu(compiled, monkeypatch):
    """silu(gate) * up, gate columns first, on the compiled kernel and on the NumPy path used without it."""
    from engine.runtime import native

    if not compiled:
        monkeypatch.setattr(native, "status", lambda: native.NativeStatus(False, "off for this test"))
    elif not native.status().available:
        pytest.skip(f"no compiled kernels here: {native.status().detail}")
    rng = np.random.default_rng(2)
    gate_up = (rng.standard_normal((3, 20)) * 30).astype(np.float32)  # large |x|: no overflow warnings
    g, u = f64(gate_up[:, :10]), f64(gate_up[:, 10:])
    with np.errstate(over="raise"):
        out = layers.swiglu(gate_up)
    assert np.allclose(out, g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS, ids=lambda f: f.__name__)
def test_attention_with_large_scores_stays_finite(attention):
    """Scores in the thousands (a peaked head of a real model, or fp16-sized activations): the softmax subtracts the
    row maximum, so nothing overflows and the result equals float64's."""
    rng = np.random.default_rng(3)
    q = (40 * rng.standard_normal((3, 2, 8))).astype(np.float32)
    k = (40 * rng.standard_normal((1, 5, 8))).astype(np.float32)
    v = rng.standard_normal((1, 5, 8)).astype(np.float32)
    with np.errstate(over="raise", invalid="raise"):
        out = attention(q, k, v, start_pos=2)
    for i in range(3):
        for h in range(2):
            s = f64(k[0, : 3 + i]) @ f64(q[i, h]) / np.sqrt(8)
            assert np.abs(s).max() > 100  # premise: exp(s) alone would overflow float32
            p = np.exp(s - s.max())
            assert np.allclose(out[i, h * 8 : (h + 1) * 8], (p / p.sum()) @ f64(v[0, : 3 + i]), atol=1e-5)
