"""llama.cpp's block formats (engine.runtime.kquant: Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), their kernels
(native/kquant.h), our quantizer and the q4_k_m mix (engine.runtime.kquant_mix).

The reference for a block of bytes is gguf.quants.dequantize (llama.cpp's own gguf-py) of the same bytes: the
repacked layout must give exactly its float32 values, and the kernels' product lies within the format's error bound
of the float64 product with them: the activations are rounded to int16 per group of 32 (step max|x_g| / 32639,
|x - xs xq| <= xs / 2 plus the float32 rounding of the product, under 2^-10 of a step), the integer sums are exact,
then a few float32 roundings per sub-block of the terms A u x and B x (relative 2^-24 each):
    |y - y64| <= sum_g xs_g (0.5 + 2^-10) sum_{k in g} |w_k|  +  (K / 16 + 8) 2^-23 sum_k |x_k| (|A u_k| + |B_k|).
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

import engine
from engine.config import ModelConfig
from engine.errors import EngineError
from engine.runtime import ggml_formats, kquant, kquant_mix, layers, native, quant
from engine.runtime.batch import SequenceStep
from engine.runtime.ggml_formats import RowStack
from engine.runtime.weights import choose_weights_dtype
from tests.conftest import load_reference, make_random_checkpoint, reference_logits

KERNELS = native.status().available
needs_kernels = pytest.mark.skipif(not KERNELS, reason=f"the compiled kernels are not usable here: "
                                                       f"{native.status().detail}")
# the float16 fields of each format's block: byte offsets (d, and dmin or m where it has one)
F16_FIELDS = {"q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2),
              "q5_k": (0, 2), "q6_k": (208,)}
XMAX = 32639  # kquant_layout.h's KQ_XMAX


@pytest.fixture(params=native.usable_isas() or ["none"])
def isa(request):
    if request.param == "none":
        pytest.skip("no kernel variant")
    default = native.status().isa
    native.set_isa(request.param)
    yield request.param
    native.set_isa(default)


def ggml_type(kind: str):
    return getattr(gguf.GGMLQuantizationType, kquant.ggml_name(kind))


def random_blocks(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Well-formed random ggml blocks of an (n, k) tensor: random bytes, the float16 fields small finite values (the
    Q4_1 / Q5_1 minimum negative) -> uint8 (n, row bytes)."""
    rng = np.random.default_rng(seed)
    nb = k // kquant.BLOCK_COLUMNS[kind]
    raw = rng.integers(0, 256, size=(n, nb, kquant.GGML_BLOCK_BYTES[kind]), dtype=np.uint8)
    for i, off in enumerate(F16_FIELDS[kind]):
        v = rng.uniform(0.001, 0.01, size=(n, nb))
        if i == 1 and kind in ("q4_1", "q5_1"):
            v = -5 * v
        raw[:, :, off : off + 2] = v.astype(np.float16).view(np.uint8).reshape(n, nb, 2)
    return raw.reshape(n, -1)


def terms(kind: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|A u| + |B| per weight (float64), the magnitudes the kernel's float sums see, from the dequantized values of
    the same bytes with u and the minimum taken apart (gguf's dequantize of the blocks with the minimum zeroed)."""
    values = gguf.quants.dequantize(raw, ggml_type(kind)).astype(np.float64)
    if kind in ("q4_k", "q5_k", "q2_k", "q4_1", "q5_1"):
        zeroed = raw.copy().reshape(raw.shape[0], -1, kquant.GGML_BLOCK_BYTES[kind])
        zeroed[:, :, F16_FIELDS[kind][1] : F16_FIELDS[kind][1] + 2] = 0
        au = gguf.quants.dequantize(zeroed.reshape(raw.shape), ggml_type(kind)).astype(np.float64)
        return values, np.abs(au) + np.abs(au - values)
    return values, 2 * np.abs(values) + 64 * np.abs(values).max()  # a loose magnitude for the offset formats


def bound(x: np.ndarray, w: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """The format's error bound (module docstring) for x (M, K), w (N, K) float64 and the terms' magnitudes."""
    m, k = x.shape
    xs = np.abs(x.reshape(m, -1, 32)).max(-1) / XMAX  # (M, G)
    wsum = np.abs(w).reshape(w.shape[0], -1, 32).sum(-1)  # (N, G)
    return xs @ wsum.T * (0.5 + 2 ** -10) + (k / 16 + 8) * 2 ** -23 * (np.abs(x) @ mag.T)


@needs_kernels
@pytest.mark.parametrize("kind", kquant.KINDS)
def test_repacked_layout_holds_the_files_values(kind):
    raw = random_blocks(kind, 37, 512, seed=1)
    m = kquant.from_ggml(kquant.ggml_name(kind), raw, (37, 512))
    want = gguf.quants.dequantize(raw, ggml_type(kind))
    assert m.layout == "kernel" and m.nbytes == -(-37 // 16) * kquant.block_bytes(kind, 512)
    assert np.array_equal(m.dequantize(), want)  # exactly gguf's float32 values
    assert np.array_equal(m.dequantize(np.array([36, 0, 17])), want[[36, 0, 17]])
    # the layout takes ggml's bytes per weight (whole 16-row blocks)
    assert kquant.block_bytes(kind, 512) == 16 * kquant.ggml_row_bytes(kind, 512)


@needs_kernels
@pytest.mark.parametrize("kind", kquant.KINDS)
def test_matmul_within_the_bound_of_the_files_exact_product(kind, isa):
    n, k = 50, 768 if kquant.BLOCK_COLUMNS[kind] == 256 else 96
    raw = random_blocks(kind, n, k, seed=2)
    m = kquant.from_ggml(kquant.ggml_name(kind), raw, (n, k))
    w, mag = terms(kind, raw)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, k)).astype(np.float32)
    x[1] *= 1e-3  # a small row: the int16 rounding follows the row's own scale
    y = layers.linear(x, m)
    exact = x.astype(np.float64) @ w.T
    assert np.all(np.abs(y - exact) <= bound(x.astype(np.float64), w, mag))
    # batch-invariant: a row's result is the same bits alone, in any batch
    for i in (0, 8):
        assert np.array_equal(layers.linear(x[i : i + 1], m)[0], y[i])


@needs_kernels
def test_parts_of_several_formats_run_in_one_call(isa):
    """A fused matrix whose rows are in several formats (q4_K_M's q/k in Q4_K, v in Q6_K; an int8 QuantMatrix; a bf16
    matrix): each part's columns are the bits of that part alone."""
    k = 512
    rng = np.random.default_rng(4)
    q4 = kquant.from_ggml("Q4_K", random_blocks("q4_k", 23, k, 5), (23, k))
    q6 = kquant.from_ggml("Q6_K", random_blocks("q6_k", 9, k, 6), (9, k))
    i8 = quant.quantize((0.02 * rng.standard_normal((7, k))).astype(np.float32), "int8")
    bf = (rng.integers(0, 1 << 16, size=(5, k), dtype=np.uint32) & 0x3FFF).astype(np.uint16)
    stack = kquant.stack([q4, q6, i8, bf])
    assert isinstance(stack, RowStack) and stack.shape == (44, k)
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = layers.linear(x, stack)
    alone = np.concatenate([layers.linear(x, p) for p in (q4, q6, i8, bf)], axis=1)
    assert np.array_equal(y, alone)
    rows = stack.dequantize(np.array([0, 30, 43]))
    assert np.array_equal(rows[0], q4.dequantize([0])[0]) and np.array_equal(rows[1], q6.dequantize([7])[0])
    assert np.array_equal(rows[2], (bf[4].astype(np.uint32) << 16).view(np.float32))
    # parts of one format with whole 16-row blocks become one matrix
    one = kquant.stack([kquant.from_ggml("Q4_K", random_blocks("q4_k", 32, k, 7), (32, k)), q4])
    assert isinstance(one, kquant.KQuantMatrix) and one.shape == (55, k)


def test_the_registry_runs_these_types_and_names_them():
    for name in kquant.GGML_TYPES:
        assert isinstance(ggml_formats.lookup(name), kquant.BlockFormat)
    with pytest.raises(ggml_formats.UnsupportedTypeError, match="IQ2_XXS.*Q4_K.*Q6_K"):
        ggml_formats.lookup("IQ2_XXS", "blk.0.attn_q.weight")


@pytest.mark.parametrize("kind", ["q4_k", "q6_k", "q5_1"])
def test_without_the_kernels_ggml_bytes_are_dequantized_for_blas(kind):
    raw = random_blocks(kind, 20, 256, seed=8)
    m = kquant.KQuantMatrix(kind, (20, 256), raw.copy(), layout="ggml")
    w = gguf.quants.dequantize(raw, ggml_type(kind)).astype(np.float64)
    x = np.random.default_rng(9).standard_normal((3, 256)).astype(np.float32)
    y = m.linear(x)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5 * np.abs(y).max())
    assert np.array_equal(m.dequantize([3]), gguf.quants.dequantize(raw[3:4], ggml_type(kind)))


# -- our quantizer -------------------------------------------------------------------------------------------------

def awkward(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    w[0, :256] = 0.0
    w[1, :32] = 1e-7
    w[2, 5] = 0.7
    w[3, :256] = np.abs(w[3, :256])  # all positive: the minimum is 0
    w[4, :256] = -np.abs(w[4, :256]) - 0.01  # all negative
    return w


def llamacpp_quantizer():
    """llama.cpp's own quantizer (libggml-base's ggml_quantize_chunk, from llama-cpp-python) or skip."""
    import ctypes
    import os

    llama_cpp = pytest.importorskip("llama_cpp")
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    if not os.path.exists(path):
        pytest.skip("llama-cpp-python without libggml-base.so")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def quantize(w: np.ndarray, kind: str) -> np.ndarray:
        n, k = w.shape
        out = np.zeros((n, kquant.ggml_row_bytes(kind, k)), dtype=np.uint8)
        lib.ggml_quantize_chunk(int(ggml_type(kind)), np.ascontiguousarray(w).ctypes.data, out.ctypes.data, 0, n,
                                k, None)
        return out

    return quantize


@needs_kernels
@pytest.mark.parametrize("kind", kquant.QUANTIZERS)
def test_quantizer_writes_ggml_blocks_closer_than_llamacpps(kind):
    w = awkward(64, 512, seed=10)
    raw = kquant.quantize_ggml(w, kind)
    ours = gguf.quants.dequantize(raw, ggml_type(kind))  # llama.cpp's reader takes our bytes
    m = kquant.quantize(w, kind)
    assert np.array_equal(m.dequantize(), ours)
    assert np.all(ours[0, :256] == 0)  # a super-block of zeros stays zeros
    theirs = gguf.quants.dequantize(llamacpp_quantizer()(w, kind), ggml_type(kind))
    err_ours, err_theirs = np.sum((ours - w) ** 2), np.sum((theirs - w) ** 2)
    assert err_ours < err_theirs, (err_ours, err_theirs)


@needs_kernels
def test_quantizer_weighs_columns_by_importance():
    w = awkward(32, 256, seed=11)
    importance = np.ones(256, dtype=np.float32)
    importance[:32] = 100.0  # the first sub-block's columns matter most
    plain = gguf.quants.dequantize(kquant.quantize_ggml(w, "q4_k"), ggml_type("q4_k"))
    weighted = gguf.quants.dequantize(kquant.quantize_ggml(w, "q4_k", importance), ggml_type("q4_k"))
    per_col = lambda v: ((v - w) ** 2).sum(0)  # noqa: E731
    assert per_col(weighted)[:32].sum() < per_col(plain)[:32].sum()
    with pytest.raises(ValueError, match="whole blocks"):
        kquant.quantize_ggml(w[:, :100], "q4_k")


# -- the q4_k_m mix --------------------------------------------------------------------------------------------------

def test_mix_is_llamacpps_q4_k_m_choice(stories260k, tinyllama_tokenizer_dir):
    """The types llama.cpp's q4_K_M gives a 22-layer TinyLlama (use_more_bits: layers 0, 1, 4, 7, 10, 13, 16, 19, 20,
    21 keep v and down in Q6_K) and the fallbacks of stories260K's 64 / 172-wide rows; <= 4.9 bits per weight."""
    tiny = ModelConfig.from_dict(json.loads((tinyllama_tokenizer_dir / "config.json").read_text()))
    more = {i for i in range(22) if kquant_mix.tensor_kind(f"model.layers.{i}.mlp.down_proj.weight", tiny) == "q6_k"}
    assert more == {0, 1, 4, 7, 10, 13, 16, 19, 20, 21}
    assert kquant_mix.tensor_kind("lm_head.weight", tiny) == "q6_k"
    assert kquant_mix.tensor_kind("model.embed_tokens.weight", tiny) == "q4_k"
    assert kquant_mix.tensor_kind("model.layers.3.self_attn.v_proj.weight", tiny) == "q4_k"
    bits = sum(kquant.bits_per_weight(kquant_mix.tensor_kind(n, tiny)) * np.prod(s)
               for n, s in tiny.tensor_shapes().items() if len(s) == 2)
    assert bits / sum(np.prod(s) for s in tiny.tensor_shapes().values() if len(s) == 2) <= 4.9
    small = ModelConfig.from_dict(json.loads((stories260k / "config.json").read_text()))
    assert kquant_mix.tensor_kind("model.layers.0.self_attn.q_proj.weight", small) == "q5_0"
    assert kquant_mix.tensor_kind("model.layers.2.self_attn.v_proj.weight", small) == "int8"
    assert kquant_mix.tensor_kind("model.layers.0.mlp.down_proj.weight", small) == "keep"
    assert kquant_mix.tensor_kind("model.embed_tokens.weight", small) == "int8"  # tied: the output's Q8_0


def test_q4_k_m_refuses_what_cannot_run(stories260k):
    with pytest.raises(EngineError, match="needs the compiled kernels"):
        choose_weights_dtype("q4_k_m", "bfloat16", False, "no C compiler")
    with pytest.raises(EngineError, match="numpy backend only"):
        engine.load_model(str(stories260k), backend="triton", weights_dtype="q4_k_m")


@pytest.fixture(scope="module")
def k_checkpoint(tmp_path_factory):
    """A random bf16 Llama whose rows are whole 256-column blocks, 8 layers (use_more_bits picks 0, 3, 6, 7)."""
    return make_random_checkpoint(tmp_path_factory.mktemp("k256"), dtype="bfloat16", seed=5, hidden_size=256,
                                  intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                                  num_hidden_layers=8, vocab_size=320)


@needs_kernels
def test_q4_k_m_model_runs_one_call_with_the_loops_bits(k_checkpoint, isa):
    model = engine.load_model(str(k_checkpoint), weights_dtype="q4_k_m")
    w = model.backend.weights
    assert model.weights_dtype == "q4_k_m"
    assert isinstance(w.layers[0].wqkv, RowStack)  # q, k in Q4_K; v in Q6_K
    assert [p.kind for p in w.layers[0].wqkv.parts] == ["q4_k", "q6_k"]
    assert w.layers[1].wqkv.kind == "q4_k" and w.layers[3].w_down.kind == "q6_k" and w.lm_head.kind == "q6_k"
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 320, size=n) for n in (7, 1, 12)]

    def run(fuse: bool):
        model.backend.fuse_layers = fuse
        caches = [model.new_cache() for _ in prompts]
        out = model.forward([SequenceStep(c, p, all_logits=True) for c, p in zip(caches, prompts)])
        out += model.forward([SequenceStep(c, [3 + j]) for j, c in enumerate(caches)])
        return out

    fused = run(True)
    assert model.backend._fused is not None
    for a, b in zip(fused, run(False)):
        assert np.array_equal(a, b)


@needs_kernels
def test_q4_k_m_model_is_the_exact_meaning_of_its_blocks(k_checkpoint, tmp_path):
    """Against transformers fp32 on the dequantized weights (the model the blocks define): the int16 activations keep
    the logits within a small fraction of their scale; against the checkpoint itself the mix costs what 4.5 bits do."""
    import torch

    model = engine.load_model(str(k_checkpoint), weights_dtype="q4_k_m")
    ref = load_reference(k_checkpoint)
    ids = np.random.default_rng(7).integers(0, 320, size=24)
    exact_fp32 = reference_logits(ref, ids)
    w = model.backend.weights
    with torch.no_grad():  # the blocks' own values into the reference model
        for i, layer in enumerate(ref.model.layers):
            qkv = w.layers[i].wqkv.dequantize()
            q, kv = layer.self_attn.q_proj.weight.shape[0], layer.self_attn.k_proj.weight.shape[0]
            layer.self_attn.q_proj.weight.copy_(torch.from_numpy(qkv[:q]))
            layer.self_attn.k_proj.weight.copy_(torch.from_numpy(qkv[q : q + kv]))
            layer.self_attn.v_proj.weight.copy_(torch.from_numpy(qkv[q + kv :]))
            layer.self_attn.o_proj.weight.copy_(torch.from_numpy(w.layers[i].wo.dequantize()))
            gu = w.layers[i].w_gate_up.dequantize()
            layer.mlp.gate_proj.weight.copy_(torch.from_numpy(gu[: gu.shape[0] // 2]))
            layer.mlp.up_proj.weight.copy_(torch.from_numpy(gu[gu.shape[0] // 2 :]))
            layer.mlp.down_proj.weight.copy_(torch.from_numpy(w.layers[i].w_down.dequantize()))
        ref.model.embed_tokens.weight.copy_(torch.from_numpy(w.embed.dequantize()))
        ref.lm_head.weight.copy_(torch.from_numpy(w.lm_head.dequantize()))
    meaning = reference_logits(ref, ids)
    ours = model.logits(ids)
    scale = np.abs(meaning).max()
    assert np.abs(ours - meaning).max() < 2e-3 * scale  # int16 activations: far within the weights' own rounding
    assert 20 * np.abs(ours - meaning).max() < np.abs(meaning - exact_fp32).max()


@needs_kernels
def test_q4_k_m_is_cached_and_read_back(k_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLLAMA_QUANT_CACHE", "1")
    monkeypatch.setenv("TINYLLAMA_CACHE", str(tmp_path))
    ids = np.arange(1, 12)
    first = engine.load_model(str(k_checkpoint), weights_dtype="q4_k_m")
    want = first.logits(ids)
    assert list((tmp_path / "quantized").iterdir())

    def no_quantizing(*args, **kwargs):
        raise AssertionError("quantized again instead of reading the cache")

    monkeypatch.setattr(kquant, "quantize_ggml", no_quantizing)
    second = engine.load_model(str(k_checkpoint), weights_dtype="q4_k_m")
    assert np.array_equal(second.logits(ids), want)
    assert kquant_mix.bits_per_weight(second.backend.weights) <= 4.9


@needs_kernels
def test_q4_k_m_on_stories260k_is_at_least_as_close_as_llamacpps(stories260k):
    """stories260K's rows are 64 and 172 wide: the mix falls back to Q5_0, Q8_0 and the checkpoint's float32 as
    llama.cpp's does; our quantizer's KL against fp32 over 128 tokens of text is at most llama.cpp's q4_K_M's (run
    here through llama-cpp-python on its own file of the same checkpoint)."""
    pytest.importorskip("llama_cpp")
    from bench import fidelity

    folder = stories260k
    tok = engine.load_model(str(folder)).tokenizer
    ids = tok.encode(fidelity.DEFAULT_TEXT.read_text())[:128]
    ref = reference_logits(load_reference(folder), ids)
    ours = engine.load_model(str(folder), weights_dtype="q4_k_m").logits(ids)
    theirs = fidelity.llamacpp_logits(str(folder), "q4_K_M", ids, 2)
    s_ours, s_theirs = fidelity.scores(ref, ours, ids), fidelity.scores(ref, theirs, ids)
    assert s_ours["kl_mean"] <= s_theirs["kl_mean"], (s_ours, s_theirs)


@needs_kernels
def test_a_gguf_of_mixed_block_formats_runs_its_exact_meaning(tmp_path, stories260k):
    """A GGUF whose tensors are in Q4_K, Q5_K and Q6_K as llama.cpp's q4_K_M / q5_K_M mixes hold them (v in Q6_K in
    one layer: a q/k/v RowStack), loaded by the GGUF loader through the registry: against transformers fp32 on the
    file's dequantized tensors, the same greedy tokens and a KL far below what 8-bit activations cost."""
    from engine.compare import compare_with_transformers
    from tests.gguf_support import write_gguf

    folder = make_random_checkpoint(tmp_path / "ckpt", dtype="float32", seed=8, hidden_size=256,
                                    intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                                    num_hidden_layers=2, vocab_size=512, tokenizer_from=stories260k)

    def types(name: str) -> str:
        if name.endswith("v_proj.weight") and ".0." in name or name == "lm_head.weight":
            return "Q6_K"
        return "Q5_K" if "down_proj" in name else "Q4_K"

    path = write_gguf(folder, tmp_path / "mix.gguf", tensor_types=types)
    model = engine.load_model(str(path))
    w = model.backend.weights
    assert [p.kind for p in w.layers[0].wqkv.parts] == ["q4_k", "q6_k"] and w.layers[1].wqkv.kind == "q4_k"
    assert w.layers[0].w_down.kind == "q5_k" and w.lm_head.kind == "q6_k"
    report = compare_with_transformers(model, "Once upon a time", steps=8, llamacpp=False)
    assert report.fidelity.top1_agreement == 1.0 and report.fidelity.kl_mean < 1e-6, report.summary()
    assert model.backend._fused is not None  # the layers ran in one call, parts and all


@pytest.fixture(scope="module")
def llamacpp_q4_k_m(tmp_path_factory, tinyllama_tokenizer_dir):
    """llama.cpp's own q4_K_M file (its converter to f16, then llama_model_quantize) of a random Llama whose rows are
    whole 256-column blocks, with TinyLlama's vocabulary: (checkpoint folder, file)."""
    import os
    import subprocess
    import sys

    from bench import llamacpp as bench_llamacpp

    if not bench_llamacpp.installed():
        pytest.skip("llama-cpp-python is not installed (its converter and quantizer make the file)")
    tmp = tmp_path_factory.mktemp("llamacpp-q4km")
    folder = make_random_checkpoint(tmp / "ckpt", dtype="bfloat16", seed=9, hidden_size=256, intermediate_size=512,
                                    num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=8,
                                    vocab_size=32000, tokenizer_from=tinyllama_tokenizer_dir)
    try:
        script = bench_llamacpp.converter()
    except Exception as e:  # noqa: BLE001 - the converter could not be fetched: say why
        pytest.skip(f"llama.cpp's converter is not available: {e}")
    env = dict(os.environ)
    if (script.parent / "gguf-py").is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(script.parent / "gguf-py")] + [p for p in [env.get("PYTHONPATH")] if p])
    f16 = tmp / "f16.gguf"
    done = subprocess.run([sys.executable, str(script), str(folder), "--outtype", "f16", "--outfile", str(f16)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"llama.cpp's converter failed: {(done.stderr or done.stdout).strip()[-300:]}")
    out = tmp / "q4_K_M.gguf"
    bench_llamacpp.quantize_gguf(f16, out, "q4_K_M")
    return folder, out


def test_the_mix_is_the_types_of_llamacpps_own_q4_k_m_file(llamacpp_q4_k_m):
    from weights.gguf_file import gguf_name

    folder, path = llamacpp_q4_k_m
    config = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    theirs = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    for name, shape in config.tensor_shapes().items():
        if len(shape) == 2:
            ours = kquant_mix.tensor_kind(name, config)
            assert {"int8": "Q8_0"}.get(ours, ours.upper()) == theirs[gguf_name(name)], name


@needs_kernels
def test_llamacpps_q4_k_m_file_runs_within_half_its_drift(llamacpp_q4_k_m):
    """llama.cpp's q4_K_M file (Q4_K and Q6_K tensors) on our kernels against its exact meaning: our mean KL at most
    half of llama.cpp's on the same file and rows, our top-1 agreement at least its."""
    from engine.compare import compare_with_transformers

    _, path = llamacpp_q4_k_m
    model = engine.load_model(str(path))
    assert {p.kind for p in model.backend.weights.layers[0].wqkv.parts} == {"q4_k", "q6_k"}
    report = compare_with_transformers(model, "Once upon a time", steps=8)
    ours, theirs = report.fidelity, report.llamacpp.fidelity
    assert ours.kl_mean <= 0.5 * theirs.kl_mean, (ours, theirs)
    assert ours.top1_agreement >= theirs.top1_agreement
