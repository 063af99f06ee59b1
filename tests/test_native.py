"""Our compiled kernels (engine/runtime/native) against float64 NumPy, on every instruction-set variant this CPU can
run (avx512, avx2, portable), and their build, variant choice and fallbacks."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from engine.runtime import layers, native
from engine.runtime.native import NativeStatus
from tests.conftest import REPO

needs_native = pytest.mark.skipif(not native.status().available,
                                  reason=f"the compiled kernels are not usable here: {native.status().detail}")
ISAS = native.usable_isas() or ["none"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Each variant this CPU runs, in turn (switched in process), back to the default afterwards."""
    if request.param == "none":
        pytest.skip(f"the compiled kernels are not usable here: {native.status().detail}")
    default = native.status().isa
    native.set_isa(request.param)
    yield request.param
    native.set_isa(default)


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even (as torch rounds)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def stored(w32: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(the weight as the kernel takes it, its exact values in float64)."""
    if dtype == "bfloat16":
        w = to_bf16(w32)
        return w, (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype == "float16":
        w = w32.astype(np.float16)
        return w, w.astype(np.float64)
    return w32, w32.astype(np.float64)


def assert_close(y, ref, k):
    """Within float32 summation error: K products of magnitude ~|x||w| summed, ~sqrt(K) * 2^-24 relative each."""
    assert y.dtype == np.float32 and y.shape == ref.shape
    scale = max(1.0, np.abs(ref).max())
    assert np.abs(y - ref).max() <= 2e-6 * np.sqrt(k) * scale


WEIGHT_DTYPES = ["float32", "bfloat16", "float16"]


@needs_native
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 9, 13, 33, 70])
@pytest.mark.parametrize("n,k", [(1, 16), (7, 15), (25, 17), (97, 100), (61, 5632), (300, 1024)])
def test_matmul_matches_float64(isa, dtype, m, n, k):
    """Every register-tile shape of every variant (1-4 rows of x, 1-8 weight rows), K not a multiple of the chunk
    (the zero-padded tail), N not a multiple of any tile height, one weight block and many."""
    rng = np.random.default_rng(m * 1000 + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w, w64 = stored(rng.standard_normal((n, k)).astype(np.float32), dtype)
    assert_close(native.matmul_xwt(x, w), x.astype(np.float64) @ w64.T, k)


@needs_native
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_matmul_large_weight_split_among_threads(isa, dtype):
    """A 20-40 MB weight (TinyLlama's gate/up width) that the thread pool splits into many blocks."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2048)).astype(np.float32)
    w, w64 = stored(rng.standard_normal((5000, 2048)).astype(np.float32), dtype)
    assert_close(native.matmul_xwt(x, w), x.astype(np.float64) @ w64.T, 2048)


@needs_native
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_matmul_special_values_are_exact(isa, dtype):
    """Subnormal, signed-zero, and extreme weights are widened exactly (no flush-to-zero); NaN and inf propagate."""
    k = 64
    x = np.zeros((2, k), np.float32)
    x[0, 5] = 1.0
    x[1, 6] = 2.0 ** 10
    w32 = np.zeros((4, k), np.float32)
    tiny = {"float32": np.float32(1e-40), "bfloat16": np.float32(2.0 ** -130), "float16": np.float32(2.0 ** -24)}[dtype]
    w32[0, 5] = tiny  # a subnormal of the weight's format
    w32[1, 6] = -(2.0 ** -10)
    w32[2, 5] = np.inf
    w32[3, 5] = np.nan
    w, _ = stored(w32, dtype)
    y = native.matmul_xwt(x, w)
    assert y[0, 0] == tiny and y[1, 1] == -1.0
    assert y[0, 2] == np.inf and np.isnan(y[0, 3])


@needs_native
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_a_row_gives_the_same_bits_whatever_its_batch(isa, dtype):
    """Each output is summed in one fixed order whatever M, the row's tile or the thread split: a sequence's logits
    are bit-identical alone, in a batch of 8, or among the 200 rows of a prefill chunk."""
    rng = np.random.default_rng(9)
    w, _ = stored(rng.standard_normal((301, 777)).astype(np.float32), dtype)
    x = rng.standard_normal((200, 777)).astype(np.float32)
    alone = native.matmul_xwt(x[5:6], w)
    for rows in (slice(0, 8), slice(3, 7), slice(0, 200), slice(5, 70)):
        batch = native.matmul_xwt(x[rows], w)
        assert np.array_equal(batch[5 - rows.start], alone[0])


@needs_native
def test_matmul_strided_rows_and_out(isa):
    """Row strides of x, w and out larger than their widths (slices of bigger arrays), written into `out`."""
    rng = np.random.default_rng(6)
    x_big = rng.standard_normal((5, 80)).astype(np.float32)
    w_big = to_bf16(rng.standard_normal((40, 90)).astype(np.float32))
    out_big = np.zeros((5, 50), dtype=np.float32)
    x, w, out = x_big[:, 3:70], w_big[:, 5:72], out_big[:, 2:42]
    assert native.matmul_xwt(x, w, out=out) is out
    w64 = (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    assert_close(out, x.astype(np.float64) @ w64.T, 67)
    assert not out_big[:, :2].any() and not out_big[:, 42:].any()  # nothing written outside `out`


@needs_native
def test_matmul_rejects_what_it_cannot_run():
    x, w = np.ones((2, 8), np.float32), np.ones((3, 8), np.float32)
    for bad in ([x.astype(np.float64), w], [np.ones((8, 2), np.float32).T, w], [x, np.ones((3, 9), np.float32)],
                [x, w.astype(np.float64)], [x, w.astype(np.int16)]):
        with pytest.raises(ValueError):
            native.matmul_xwt(*bad)
    with pytest.raises(ValueError):
        native.matmul_xwt(x, w, out=np.empty((3, 2), np.float32))


def attention_float64(q, k, v, start):
    """Causal GQA attention in float64: the definition, query head h on kv head h // group."""
    t, h, d = q.shape
    group = h // k.shape[0]
    out = np.zeros((t, h, d))
    for head in range(h):
        kk, vv = k[head // group].astype(np.float64), v[head // group].astype(np.float64)
        for i in range(t):
            s = kk[: start + i + 1] @ q[i, head].astype(np.float64) / np.sqrt(d)
            p = np.exp(s - s.max())
            out[i, head] = (p / p.sum()) @ vv[: start + i + 1]
    return out.reshape(t, h * d)


@needs_native
@pytest.mark.parametrize("t,heads,kv_heads,head_dim,start", [
    (1, 32, 4, 64, 0), (1, 32, 4, 64, 700), (1, 8, 1, 64, 300), (3, 4, 4, 16, 10),   # decode, MQA, MHA verify
    (70, 8, 2, 64, 0), (40, 6, 3, 24, 17), (5, 2, 1, 8, 3), (130, 4, 2, 36, 5),      # prefill chunks, odd head_dim
])
def test_attention_matches_float64(isa, t, heads, kv_heads, head_dim, start):
    """The compiled attention (online softmax over key blocks) against the definition in float64, on a cache view
    with spare capacity (the row stride of a KVCache layer), keys longer and shorter than a block."""
    rng = np.random.default_rng(t + heads + start)
    capacity = start + t + 9
    k_cache = rng.standard_normal((kv_heads, capacity, head_dim)).astype(np.float32)
    v_cache = rng.standard_normal((kv_heads, capacity, head_dim)).astype(np.float32)
    q = (3 * rng.standard_normal((t, heads, head_dim))).astype(np.float32)  # peaked softmaxes as well as flat ones
    k, v = k_cache[:, : start + t], v_cache[:, : start + t]
    got = native.attention(q, k, v, start)
    ref = attention_float64(q, k, v, start)
    # float32 rounding of a weighted sum over L keys: ~sqrt(L) * 2^-24 of the largest value, with room for the
    # rounding of the scores and of exp.
    tol = 8 * np.sqrt(start + t) * 2.0 ** -24 * np.abs(v).max()
    assert got.shape == (t, heads * head_dim) and np.abs(got - ref).max() < tol
    assert np.abs(layers.attention_numpy(q, k, v, start) - ref).max() < tol  # the NumPy fallback too
    # A trace's probabilities: the definition's, exact zeros above the diagonal, and the output the same bits.
    traced, probs = native.attention(q, k, v, start, return_probs=True)
    assert np.array_equal(traced, got) and probs.shape == (heads, t, start + t)
    _, numpy_probs = layers.attention_numpy(q, k, v, start, return_probs=True)
    assert np.abs(probs - numpy_probs).max() < 1e-6
    above = np.arange(start + t)[None, :] > (start + np.arange(t))[:, None]
    assert not probs[:, above].any() and np.allclose(probs.sum(axis=-1), 1, atol=1e-5)


@needs_native
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 4, 64), (6, 3, 24), (4, 1, 36)])
def test_step_attention_stores_the_new_keys_and_equals_a_call_per_sequence(isa, heads, kv_heads, head_dim):
    """StepAttention (one call per layer for every sequence of a step: three decoding rows at different depths, a
    3-token verification and a 70-token prompt chunk, caches of different capacities) stores each sequence's new
    keys and values where KVCache.write puts them and gives each sequence's output the same bits as its own call."""
    from engine.runtime.kv_cache import KVCache

    rng = np.random.default_rng(heads + head_dim)
    layers_n, layer = 3, 1
    starts, counts = [5, 200, 0, 64, 17], [1, 1, 70, 3, 1]
    caches = [KVCache(layers_n, kv_heads, head_dim, 4096, block_tokens=32 * (j + 1)) for j in range(len(starts))]
    copies = [KVCache(layers_n, kv_heads, head_dim, 4096, block_tokens=32 * (j + 1)) for j in range(len(starts))]
    for c, d, s, n in zip(caches, copies, starts, counts):
        c.reserve(s + n)
        d.reserve(s + n)
        c.k[:] = d.k[:] = rng.standard_normal(c.k.shape).astype(np.float32)
        c.v[:] = d.v[:] = rng.standard_normal(c.v.shape).astype(np.float32)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = (2 * rng.standard_normal((sum(counts), width))).astype(np.float32)
    got = native.StepAttention(caches, starts, counts, heads, head_dim)(qkv, layer)
    q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
    row = 0
    for c, d, s, n in zip(caches, copies, starts, counts):
        part = qkv[row : row + n]
        d.write(layer, s, part[:, q_end:k_end].reshape(n, kv_heads, head_dim),
                part[:, k_end:].reshape(n, kv_heads, head_dim))
        assert np.array_equal(c.k, d.k) and np.array_equal(c.v, d.v)  # only the new positions of `layer` changed
        keys, values = d.layer(layer, s + n)
        alone = native.attention(np.ascontiguousarray(part[:, :q_end]).reshape(n, heads, head_dim), keys, values, s)
        assert np.array_equal(got[row : row + n], alone)
        row += n


@needs_native
def test_step_attention_rejects_what_it_cannot_run():
    from engine.runtime.kv_cache import KVCache

    cache = KVCache(2, 2, 8, 64)
    cache.reserve(4)
    with pytest.raises(ValueError):
        native.StepAttention([cache], [cache.capacity], [1], 4, 8)  # no room reserved for the new token
    step = native.StepAttention([cache], [0], [2], 4, 8)
    with pytest.raises(ValueError):
        step(np.ones((3, 64), np.float32), 0)  # 3 rows for a step of 2
    with pytest.raises(ValueError):
        native.StepAttention([cache], [0], [1], 3, 8)  # 3 query heads on 2 kv heads


@needs_native
def test_attention_rejects_what_it_cannot_run():
    q = np.ones((2, 4, 8), np.float32)
    k = np.ones((2, 5, 8), np.float32)
    with pytest.raises(ValueError):
        native.attention(q, k, k, 4)  # 4 + 2 > 5 positions
    with pytest.raises(ValueError):
        native.attention(q, np.ones((3, 5, 8), np.float32), np.ones((3, 5, 8), np.float32), 0)  # 4 heads on 3 kv
    with pytest.raises(ValueError):
        native.attention(q, k.astype(np.float64), k, 0)


@needs_native
def test_kernels_from_two_python_threads_at_once():
    """ctypes releases the GIL during a call; calls from two threads are serialised by the pool, results exact."""
    rng = np.random.default_rng(1)
    w = to_bf16(rng.standard_normal((999, 512)).astype(np.float32))
    xs = [rng.standard_normal((m, 512)).astype(np.float32) for m in (1, 3, 17, 64)]
    expected = [native.matmul_xwt(x, w) for x in xs]
    failures = []

    def work():
        for _ in range(30):
            for x, e in zip(xs, expected):
                if not np.array_equal(native.matmul_xwt(x, w), e):
                    failures.append(x.shape)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures


def test_linear_without_the_native_kernel_uses_blas(monkeypatch):
    """Where the kernel is unavailable `linear` still gives x @ w.T: BLAS GEMV/GEMM and the cache-blocked GEMVs."""
    monkeypatch.setattr(native, "status", lambda: NativeStatus(False, "off for this test"))
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3000, 1024)).astype(np.float32)  # 12 MB: three 4 MB blocks for the few-row path
    for m in (1, 5, 12, 13):
        x = rng.standard_normal((m, 1024)).astype(np.float32)
        assert_close(layers.linear(x, w), x.astype(np.float64) @ w.astype(np.float64).T, 1024)


def status_in_subprocess(env_overrides: dict, tmp_path=None) -> str:
    """native.status() of a new process with `env_overrides`; its own empty kernel cache when tmp_path is given."""
    env = dict(os.environ, **env_overrides)
    if tmp_path is not None:
        env["TINYLLAMA_CACHE"] = str(tmp_path / "cache")
    code = "from engine.runtime import native; s = native.status(); print(s.available, s.isa, s.detail)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_turned_off_by_environment(tmp_path):
    assert status_in_subprocess({"TINYLLAMA_NATIVE": "0"}, tmp_path) == "False None off (TINYLLAMA_NATIVE=0)"


@needs_native
@pytest.mark.parametrize("wish", ISAS)
def test_a_variant_forced_by_environment(tmp_path, wish):
    out = status_in_subprocess({"TINYLLAMA_NATIVE_ISA": wish})
    assert out.startswith(f"True {wish} {wish}, ")


def test_an_unknown_or_unrunnable_variant_is_refused_with_the_reason(tmp_path):
    assert "is not one of avx512, avx2, portable" in status_in_subprocess({"TINYLLAMA_NATIVE_ISA": "sse9"})
    if native.status().available and "avx512" not in native.usable_isas():
        assert "this CPU cannot run it" in status_in_subprocess({"TINYLLAMA_NATIVE_ISA": "avx512"})


def test_a_failing_compiler_leaves_blas_with_the_reason(tmp_path):
    out = status_in_subprocess({"CC": "false"}, tmp_path)
    assert out.startswith("False None not built: false failed")
    out = status_in_subprocess({"CC": "/nonexistent/cc"}, tmp_path)
    assert out.startswith("False None not built: no C compiler")
    assert not list((tmp_path / "cache").glob("*"))  # no half-written library left behind


@needs_native
def test_build_is_cached_by_source(tmp_path, monkeypatch):
    """A second build of the same sources re-uses the library; a changed source gets its own."""
    monkeypatch.setenv("TINYLLAMA_CACHE", str(tmp_path / "cache"))
    first = native.build()
    assert native.build() == first and first.stat().st_mtime == native.build().stat().st_mtime
    copy = tmp_path / "src"
    shutil.copytree(native.HERE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "pool.c").write_text((copy / "pool.c").read_text() + "\n/* changed */\n")
    assert native.build(copy) != first


SELFTEST_CHECKS = 73  # per variant: selftest.c's checks of every kernel api.c exports
SELFTEST_BLOCK_CHECKS = 41  # per variant: the 8 block formats (kquant.h) on 5 shapes each, and matmul_parts
SELFTEST_NO_VNNI_CHECKS = 8  # avx512 on a VNNI CPU: the block formats' build without VNNI checked as well


def selftest_lines(isas: list[str], vnni: bool) -> list[str]:
    """What selftest.c prints when every check passes on `isas` (vnni: the CPU has AVX512-VNNI)."""
    block = {isa: SELFTEST_BLOCK_CHECKS + (SELFTEST_NO_VNNI_CHECKS if isa == "avx512" and vnni else 0) for isa in isas}
    return ([f"{isa}: {SELFTEST_CHECKS} checks passed" for isa in isas]
            + [f"{isa} block formats: {block[isa]} checks passed" for isa in isas]
            + ["block-format quantizer: 4 checks passed"])


def cpu_has_vnni() -> bool:
    """Whether the avx512 variant's block-format kernel is the VNNI build on this CPU."""
    if "avx512" not in native.usable_isas():
        return False
    before = native.status().isa
    native.set_isa("avx512")
    try:
        return "VNNI" in native.kmatmul_build()
    finally:
        native.set_isa(before)


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
def test_c_selftest_on_this_machine(tmp_path):
    """selftest.c, the C-level check of every exported kernel against double precision that runs where Python cannot
    (see tests/test_native_platforms.py), built as the engine builds the library with -Wall -Wextra -Werror and
    every variant compiled in, passes here on every variant this CPU runs. Built with the lane-by-lane conversion
    that GCC < 9 gets instead of __builtin_convertvector (-DTL_NO_CONVERTVECTOR): the library the other tests load
    has the builtin, so both are checked."""
    from engine.runtime.native.selftest import build_selftest

    build_selftest([os.environ.get("CC", "cc")], tmp_path / "selftest", flags=["-DTL_NO_CONVERTVECTOR"], strict=True)
    done = subprocess.run([str(tmp_path / "selftest")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == selftest_lines(native.usable_isas(), cpu_has_vnni())


@needs_native
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_widen_into_is_exact(isa, dtype):
    """The kernels' widening (OpenBLAS's GEMM then multiplies long prompts on the widened blocks) gives exactly the
    float32 values of the 16-bit weights, K not a multiple of any vector width."""
    rng = np.random.default_rng(4)
    w, w64 = stored(rng.standard_normal((37, 203)).astype(np.float32), dtype)
    out = np.full(w.shape, np.nan, dtype=np.float32)
    assert native.widen_into(w, out) is out and np.array_equal(out, w64.astype(np.float32))


@needs_native
def test_swiglu_matches_float64(isa):
    """silu(gate) * up with the kernels' vectorised exp, over the whole range of the sigmoid (saturated ends too)."""
    rng = np.random.default_rng(5)
    gate_up = (6 * rng.standard_normal((9, 2 * 203))).astype(np.float32)
    gate_up[0, :6] = [-200, -90, -87, 88, 100, 0]
    g, u = gate_up[:, :203].astype(np.float64), gate_up[:, 203:].astype(np.float64)
    ref = g / (1 + np.exp(-g)) * u
    got = native.swiglu(gate_up)
    assert got.shape == (9, 203) and np.abs(got - ref).max() <= 4 * 2.0 ** -24 * np.abs(ref).max()
    assert np.abs(got - layers.swiglu(gate_up)).max() <= 4 * 2.0 ** -24 * np.abs(ref).max()


@needs_native
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_long_prompt_rows_on_openblas_and_decode_rows_on_the_kernel(monkeypatch, dtype):
    """`linear` hands the rows of long prompt chunks to OpenBLAS's GEMM on widened blocks (float64-close) and keeps
    the other rows on the kernel, bit-identical to those rows alone."""
    monkeypatch.setattr(layers, "WIDEN_BLOCK_BYTES", 64 << 10)  # many blocks even for this small weight
    monkeypatch.setitem(layers.WIDENED_BLAS_FROM_ROWS, native.status().isa, 256)  # (avx512 keeps every row)
    rng = np.random.default_rng(6)
    w, w64 = stored(rng.standard_normal((300, 512)).astype(np.float32), dtype)
    x = rng.standard_normal((3 + layers.widened_blas_from_rows(), 512)).astype(np.float32)
    y = layers.linear(x, w, prompt_from=3)
    assert_close(y, x.astype(np.float64) @ w64.T, 512)
    assert np.array_equal(y[:3], native.matmul_xwt(x[:3], w))


@needs_native
def test_fused_rms_norm_and_rotary_match_numpy(isa):
    """The compiled residual-add + RMSNorm and in-place rotary embedding do NumPy's operations (float32 rounding)."""
    from engine.runtime.rope import rope_tables
    from engine.config import ModelConfig

    rng = np.random.default_rng(12)
    x = rng.standard_normal((7, 100)).astype(np.float32)
    res = rng.standard_normal((7, 100)).astype(np.float32)
    weight = (1 + 0.2 * rng.standard_normal(100)).astype(np.float32)
    summed, h = native.rms_norm(x, weight, 1e-5, residual=res)
    assert np.array_equal(summed, x + res)
    ref = layers.rms_norm_numpy((x + res).astype(np.float64), weight.astype(np.float64), 1e-5)
    assert np.abs(h - ref).max() < 1e-6 * np.abs(ref).max()
    assert np.abs(native.rms_norm(x, weight, 1e-5) - layers.rms_norm_numpy(x, weight, np.float32(1e-5))).max() < 1e-6
    config = ModelConfig(vocab_size=8, hidden_size=72, intermediate_size=8, num_hidden_layers=1, num_attention_heads=6,
                         num_key_value_heads=3, head_dim=12, max_position_embeddings=50)
    cos, sin = rope_tables(config)
    qkv = rng.standard_normal((5, 12 * 12)).astype(np.float32)
    positions = np.array([0, 3, 49, 7, 7])
    expected = qkv.copy()
    view = expected[:, : 9 * 12].reshape(5, 9, 12)
    view[:] = layers.apply_rotary(view, cos[positions], sin[positions])
    native.rotary_(qkv, positions, cos, sin, 9, 12)  # 6 query + 3 key heads; the value heads untouched
    assert np.abs(qkv - expected).max() < 1e-6
