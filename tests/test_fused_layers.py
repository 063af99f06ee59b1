"""The layers of a pass in one kernel call (native.DecoderLayers) against the NumPy backend's layer loop: the same
kernels in the same order, so the very same bits, for every weight dtype, layout and kernel variant, through prefill,
decode, batches with mixed lengths and a pass cut into pieces; and the loop still runs where it must (a trace, rows
for OpenBLAS)."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.runtime import layers, native, numpy_backend
from engine.runtime.batch import SequenceStep
from tests.conftest import load_reference, make_random_checkpoint, reference_logits

pytestmark = pytest.mark.skipif(not native.status().available,
                                reason=f"the compiled kernels are not usable here: {native.status().detail}")

CHECKPOINTS = {  # name: (dtype, config)
    "bf16-gqa": ("bfloat16", dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64)),
    "fp16-mqa-tied": ("float16", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "fp32-mha-odd": ("float32", dict(num_attention_heads=3, num_key_value_heads=3, hidden_size=48,
                                     intermediate_size=100)),
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def folder(request, tmp_path_factory):
    dtype, config = CHECKPOINTS[request.param]
    return make_random_checkpoint(tmp_path_factory.mktemp(request.param), dtype=dtype, seed=3, **config)


@pytest.fixture(params=native.usable_isas())
def isa(request):
    default = native.status().isa
    native.set_isa(request.param)
    yield request.param
    native.set_isa(default)


def run(model, fuse: bool, prompts, decode_steps: int = 3):
    """Logits of a batched prefill of `prompts` (all rows), then `decode_steps` batched one-token steps."""
    model.backend.fuse_layers = fuse
    caches = [model.new_cache() for _ in prompts]
    out = model.forward([SequenceStep(c, p, all_logits=True) for c, p in zip(caches, prompts)])
    for t in range(decode_steps):
        out += model.forward([SequenceStep(c, [int(t + 5 * j) % model.config.vocab_size]) for j, c in
                              enumerate(caches)])
    return out, caches


def test_one_call_gives_the_loops_bits(folder, isa):
    model = engine.load_model(str(folder))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.config.vocab_size, size=n) for n in (9, 1, 23)]
    fused, fused_caches = run(model, True, prompts)
    assert model.backend._fused is not None  # the one-call path ran
    looped, looped_caches = run(model, False, prompts)
    for a, b in zip(fused, looped):
        assert np.array_equal(a, b)
    for a, b in zip(fused_caches, looped_caches):  # the caches got the same keys and values
        assert a.length == b.length and np.array_equal(a.k[:, :, : a.length], b.k[:, :, : b.length])
        assert np.array_equal(a.v[:, :, : a.length], b.v[:, :, : b.length])


def test_one_call_matches_transformers_through_passes(folder, monkeypatch):
    """A prompt longer than a pass (cut into pieces, each piece one call) against transformers fp32."""
    monkeypatch.setattr(numpy_backend, "PASS_ROWS", 16)
    model = engine.load_model(str(folder))
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, size=40)
    ours = model.logits(ids)
    ref = reference_logits(load_reference(folder), ids)
    assert float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref))) < 1e-4


def test_the_loop_runs_where_it_must(folder, monkeypatch):
    model = engine.load_model(str(folder))
    backend = model.backend
    assert backend._fused_layers(4, 4) is not None
    backend.fuse_layers = False
    assert backend._fused_layers(4, 4) is None
    backend.fuse_layers = True
    # rows that go to OpenBLAS (a variant that hands long prompts over): the loop splits them off
    monkeypatch.setitem(layers.WIDENED_BLAS_FROM_ROWS, native.status().isa, 8)
    monkeypatch.setitem(layers.BLAS_FROM_ROWS, native.status().isa, 8)
    assert backend._fused_layers(8, 0) is None and backend._fused_layers(7, 7) is not None
    # a replaced weight array is picked up (the one call is rebuilt over the new array)
    first = backend._fused_layers(4, 4)
    layer = backend.weights.layers[0]
    layer.wo = layer.wo.copy()
    assert backend._fused_layers(4, 4) is not first
