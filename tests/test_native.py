"""The compiled few-row matmul (engine/runtime/native) against float64 NumPy, its build and its fallbacks."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from engine.runtime import layers, native
from engine.runtime.native import NativeStatus

needs_native = pytest.mark.skipif(not native.status().available,
                                  reason=f"the compiled matmul is not usable here: {native.status().detail}")


def reference(x, w):
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64).T


def assert_close(y, ref):
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.abs(y - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@needs_native
@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 31, 48, 64])
@pytest.mark.parametrize("n,k", [(1, 16), (7, 15), (25, 17), (97, 100), (300, 1024), (61, 5632), (5000, 2048)])
def test_matmul_matches_float64(m, n, k):
    """Every tile shape (1-4 rows of x, 1-8 rows of w), K not a multiple of 16 (masked tail), N not a multiple of
    any tile height, one weight block and many (a 40 MB weight the threads split, as in the model)."""
    rng = np.random.default_rng(m * 1000 + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    assert_close(native.matmul_xwt(x, w), reference(x, w))


@needs_native
def test_matmul_strided_rows_and_out():
    """Row strides of x, w and out larger than their widths (slices of bigger arrays), written into `out`."""
    rng = np.random.default_rng(6)
    x_big = rng.standard_normal((5, 80)).astype(np.float32)
    w_big = rng.standard_normal((40, 90)).astype(np.float32)
    out_big = np.zeros((5, 50), dtype=np.float32)
    x, w, out = x_big[:, 3:70], w_big[:, 5:72], out_big[:, 2:42]
    assert native.matmul_xwt(x, w, out=out) is out
    assert_close(out, reference(x, w))
    assert not out_big[:, :2].any() and not out_big[:, 42:].any()  # nothing written outside `out`


@needs_native
def test_matmul_rejects_what_it_cannot_run():
    x, w = np.ones((2, 8), np.float32), np.ones((3, 8), np.float32)
    with pytest.raises(ValueError):
        native.matmul_xwt(x.astype(np.float64), w)
    with pytest.raises(ValueError):
        native.matmul_xwt(np.ones((8, 2), np.float32).T, w)  # columns not contiguous
    with pytest.raises(ValueError):
        native.matmul_xwt(x, np.ones((3, 9), np.float32))
    with pytest.raises(ValueError):
        native.matmul_xwt(x, w, out=np.empty((3, 2), np.float32))


def test_linear_without_the_native_kernel_uses_blas(monkeypatch):
    """Where the kernel is unavailable `linear` still gives x @ w.T: BLAS GEMV/GEMM and the cache-blocked GEMVs."""
    monkeypatch.setattr(native, "status", lambda: NativeStatus(False, "off for this test"))
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3000, 1024)).astype(np.float32)  # 12 MB: three 4 MB blocks for the few-row path
    for m in (1, 5, 12, 13):
        x = rng.standard_normal((m, 1024)).astype(np.float32)
        assert_close(layers.linear(x, w), reference(x, w))


def status_in_subprocess(env_overrides: dict, tmp_path) -> str:
    env = dict(os.environ, TINYLLAMA_CACHE=str(tmp_path / "cache"), **env_overrides)
    code = "from engine.runtime import native; s = native.status(); print(s.available, s.detail)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_turned_off_by_environment(tmp_path):
    assert status_in_subprocess({"TINYLLAMA_NATIVE": "0"}, tmp_path) == "False off (TINYLLAMA_NATIVE=0)"


def test_a_failing_compiler_leaves_blas_with_the_reason(tmp_path):
    out = status_in_subprocess({"CC": "false"}, tmp_path)
    assert out.startswith("False not built: false failed")
    out = status_in_subprocess({"CC": "/nonexistent/cc"}, tmp_path)
    assert out.startswith("False not built: no C compiler")
    assert not list((tmp_path / "cache").glob("*"))  # no half-written library left behind


@needs_native
def test_build_is_cached_by_source(tmp_path, monkeypatch):
    """A second build of the same source re-uses the library; a changed source gets its own."""
    monkeypatch.setenv("TINYLLAMA_CACHE", str(tmp_path))
    first = native.build()
    assert native.build() == first and first.stat().st_mtime == native.build().stat().st_mtime
    changed = tmp_path / "matmul.c"
    changed.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    assert native.build(changed) != first
