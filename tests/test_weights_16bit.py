"""bf16 / fp16 checkpoints kept 16-bit in memory and widened exactly inside the compiled kernels: logits equal
transformers' float32 model on the same (upcast) weights, and today's float32-weights path up to summation order, on
every kernel variant this CPU runs; the weights take the checkpoint's bytes, with no float32 copy."""
from __future__ import annotations

import gc
import json
import subprocess
import sys

import numpy as np
import pytest

import engine
from engine.errors import EngineError
from engine.runtime import native
from engine.runtime.batch import SequenceStep
from tests.conftest import REPO, load_reference, make_random_checkpoint, reference_greedy, reference_logits

pytestmark = pytest.mark.skipif(not native.status().available,
                                reason=f"the compiled kernels are not usable here: {native.status().detail}")

CHECKPOINTS = {  # name: (dtype, config); every one small, each a different layout
    "bf16-gqa-untied": ("bfloat16", dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64)),
    "fp16-mqa-tied": ("float16", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "bf16-mha-tied-sharded": ("bfloat16", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                                               max_shard_size="40KB")),
}
STORAGE = {"bfloat16": np.uint16, "float16": np.float16}


def relative_error(ours, ref) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    dtype, config = CHECKPOINTS[request.param]
    config = dict(config)
    shard = config.pop("max_shard_size", None)
    folder = make_random_checkpoint(tmp_path_factory.mktemp(request.param), dtype=dtype, max_shard_size=shard,
                                    seed=len(request.param), **config)
    return folder, dtype


@pytest.fixture(scope="module")
def loaded(checkpoint):
    folder, dtype = checkpoint
    return (engine.load_model(str(folder)), engine.load_model(str(folder), weights_dtype="float32"),
            load_reference(folder), dtype)


@pytest.fixture(params=native.usable_isas() or ["none"])
def isa(request):
    default = native.status().isa
    native.set_isa(request.param)
    yield request.param
    native.set_isa(default)


def test_weights_stay_in_the_checkpoints_dtype(loaded):
    model, widened, _, dtype = loaded
    assert model.weights_dtype == dtype and widened.weights_dtype == "float32"
    w = model.backend.weights
    for a in [w.embed, w.lm_head] + [m for layer in w.layers for m in (layer.wqkv, layer.wo, layer.w_gate_up,
                                                                        layer.w_down)]:
        assert a.dtype == STORAGE[dtype]
    assert w.final_norm.dtype == np.float32 and w.layers[0].attn_norm.dtype == np.float32
    assert w.nbytes < 0.52 * widened.backend.weights.nbytes  # half the bytes (norms stay float32: tiny)


@pytest.mark.parametrize("length", [1, 2, 17, 64])
def test_logits_match_transformers_and_the_float32_path(loaded, isa, length):
    """Equal transformers fp32 on the same weights (1e-4 of the logit scale), and the float32-weights path to
    summation order (1e-5): the kernels multiply the very same numbers."""
    model, widened, ref, _ = loaded
    ids = np.random.default_rng(length).integers(0, model.config.vocab_size, size=length)  # up to the whole window
    ours = model.logits(ids)
    assert relative_error(ours, reference_logits(ref, ids)) < 1e-4
    assert relative_error(ours, widened.logits(ids)) < 1e-5


def test_greedy_tokens_match_transformers(loaded, isa):
    model, _, ref, _ = loaded
    ids = [1, 17, 99, 3, 250, 42]
    assert model.generate(ids, max_new_tokens=20, ignore_eos=True) == reference_greedy(ref, ids, 20)


def test_decode_through_the_cache_and_batches_give_the_same_bits(loaded, isa):
    """Decode through the cache = prefill (to rounding); a sequence's logits are bit-identical alone and in a
    batch: every matmul row is summed in one order whatever else is in the step."""
    model, _, _, _ = loaded
    rng = np.random.default_rng(5)
    ids = rng.integers(0, model.config.vocab_size, size=30)
    full = model.logits(ids)
    cache = model.new_cache()
    rows = [model.forward([SequenceStep(cache, ids[:20], all_logits=True)])[0]]
    rows += [model.forward([SequenceStep(cache, [t])])[0] for t in ids[20:]]
    assert relative_error(np.concatenate(rows), full) < 1e-5
    prompts = [rng.integers(0, model.config.vocab_size, size=n) for n in (7, 1, 12)]
    alone = [model.logits(p) for p in prompts]
    batched = model.forward([SequenceStep(model.new_cache(), p, all_logits=True) for p in prompts])
    for a, b in zip(alone, batched):
        assert np.array_equal(a, b)


def test_weight_bytes_are_the_checkpoints_tensor_bytes(checkpoint):
    """After loading, the matrices and embedding table take exactly their bytes in the safetensors files (fused, the
    tied lm_head once); no float32 copy of a matrix is alive."""
    folder, dtype = checkpoint
    gc.collect()
    model = engine.load_model(str(folder))
    file_bytes = 0
    for f in folder.glob("*.safetensors"):
        header = json.loads(f.read_bytes()[8 : 8 + int.from_bytes(f.read_bytes()[:8], "little")])
        file_bytes += sum(e["data_offsets"][1] - e["data_offsets"][0] for name, e in header.items()
                          if name != "__metadata__" and len(e["shape"]) == 2)
    w = model.backend.weights
    matrices = [a for a in w.arrays() if a.ndim == 2]
    assert sum(a.nbytes for a in matrices) == file_bytes
    sizes = {a.size for a in matrices}
    gc.collect()
    float32_copies = [o for o in gc.get_objects() if type(o) is np.ndarray and o.dtype == np.float32
                      and o.size in sizes and o.ndim == 2]
    assert not float32_copies


def test_weights_dtype_choices(checkpoint, stories260k):
    folder, dtype = checkpoint
    assert engine.load_model(str(folder), weights_dtype=dtype).weights_dtype == dtype
    other = "float16" if dtype == "bfloat16" else "bfloat16"
    with pytest.raises(EngineError, match=f"weights_dtype={other} but the checkpoint stores {dtype}"):
        engine.load_model(str(folder), weights_dtype=other)
    with pytest.raises(EngineError, match="weights_dtype must be one of"):
        engine.load_model(str(folder), weights_dtype="int3")
    stories = engine.load_model(str(stories260k))  # an fp32 checkpoint stays fp32
    assert stories.weights_dtype == "float32" and stories.weights_dtype_reason == "the checkpoint's dtype"
    with pytest.raises(EngineError, match="stores float32 weights"):
        engine.load_model(str(stories260k), weights_dtype="bfloat16")


def test_without_the_kernels_16bit_weights_are_widened_with_the_reason(checkpoint, tmp_path):
    folder, _ = checkpoint
    code = ("import engine; m = engine.load_model(%r); print(m.weights_dtype); print(m.weights_dtype_reason)"
            % str(folder))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**__import__("os").environ, "TINYLLAMA_NATIVE": "0"})
    assert done.returncode == 0, done.stderr
    dtype, reason = done.stdout.strip().splitlines()
    assert dtype == "float32" and "compiled kernels are not available (off (TINYLLAMA_NATIVE=0))" in reason


def decoding_beside_a_prompt(model, seed: int, prompt_len: int):
    """A sequence 9 tokens in decodes one token alone, then again in a step beside a new prompt of prompt_len tokens
    -> (that prompt, the decoding row's logits alone, the prompt's logits in the shared step, the row's there)."""
    rng = np.random.default_rng(seed)
    prompt, long_prompt = rng.integers(0, model.config.vocab_size, size=9), rng.integers(0, 256, size=prompt_len)
    cache = model.new_cache()
    model.forward([SequenceStep(cache, prompt)])
    alone = model.forward([SequenceStep(cache, [7])])[0]
    cache.truncate(len(prompt))
    prompt_logits, mixed = model.forward([SequenceStep(model.new_cache(), long_prompt, all_logits=True),
                                          SequenceStep(cache, [7])])
    return long_prompt, alone, prompt_logits, mixed


def test_on_avx512_a_long_prompt_runs_on_the_kernel_with_the_same_bits_in_any_batch(loaded, monkeypatch):
    """The avx512 variant takes every row, prompts of any length included (faster than OpenBLAS there), so a prompt's
    logits are the same bits alone as beside a decoding sequence, and the decoding row's the same as alone."""
    from engine.runtime import layers

    if "avx512" not in native.usable_isas():
        pytest.skip("this CPU has no AVX-512")
    model, _, _, _ = loaded
    default = native.status().isa
    native.set_isa("avx512")
    try:
        assert layers.widened_blas_from_rows() == layers.NEVER and layers.BLAS_FROM_ROWS["avx512"] is None
        blas_calls = []
        monkeypatch.setattr(layers, "widened_blas", lambda *a, **k: blas_calls.append(1))
        long_prompt, alone, long_mixed, mixed = decoding_beside_a_prompt(model, seed=9, prompt_len=50)
        long_alone = model.forward([SequenceStep(model.new_cache(), long_prompt, all_logits=True)])[0]
        assert np.array_equal(mixed, alone) and np.array_equal(long_mixed, long_alone) and not blas_calls
    finally:
        native.set_isa(default)


def test_a_decoding_sequence_keeps_its_bits_when_a_long_prompt_joins(loaded, isa, monkeypatch):
    """Where a variant hands long prompt chunks to OpenBLAS on widened weights (here made to from 16 rows), the
    decoding rows beside them stay on the kernel, so a decoding sequence's logits are the same bits with or without
    the prompt in its step, and the prompt's own logits are those of the kernel path to float32 rounding."""
    from engine.runtime import layers

    model, _, _, _ = loaded
    monkeypatch.setitem(layers.WIDENED_BLAS_FROM_ROWS, isa, 16)
    long_prompt, alone, prompt_logits, mixed = decoding_beside_a_prompt(model, seed=8, prompt_len=30)
    assert np.array_equal(mixed, alone)
    monkeypatch.setitem(layers.WIDENED_BLAS_FROM_ROWS, isa, None)  # every row on the kernel
    assert relative_error(prompt_logits, model.logits(long_prompt)) < 1e-5


def test_a_range_of_rows_reads_the_same_values_as_the_whole_tensor(tmp_path, monkeypatch):
    """Checkpoint.read_into(name, out, first=...) (the quantizing loader reads pieces of rows): every dtype, pieces
    that straddle the loader's copy chunks and pages, and a range past the end refused."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from weights import safetensors_file

    monkeypatch.setattr(safetensors_file, "COPY_CHUNK_BYTES", 3 * 4096 + 6)
    tensors = {"b": torch.randn(1001, 37).to(torch.bfloat16), "c": torch.randn(77, 999).to(torch.float16),
               "d": torch.randn(300, 41)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with safetensors_file.SafetensorsFile(tmp_path / "m.safetensors") as f:
        for name, t in tensors.items():
            whole = t.float().numpy()
            n, k = whole.shape
            for start, rows in [(0, 1), (3, 250), (n - 7, 7), (n // 2, n - n // 2)]:
                rows = min(rows, n - start)
                out = np.empty((rows, k), dtype=np.float32)
                f.read_into(name, out, first=start * k)
                assert np.array_equal(out, whole[start : start + rows]), (name, start, rows)
            with pytest.raises(ValueError):
                f.read_into(name, np.empty((2, k), dtype=np.float32), first=(n - 1) * k)
            with pytest.raises(ValueError):
                f.read_into(name, np.empty((2, k), dtype=np.float32))  # a whole read needs the whole tensor
