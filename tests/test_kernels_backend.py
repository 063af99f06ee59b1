"""tinyllama_kernels.triton_backend.TritonBackend against engine.runtime.numpy_backend.NumpyBackend (same weights, same steps)."""

import numpy as np
import pytest

from tests.kernel_support import forward_tolerance, rounded_weights, torch  # first: sets TRITON_INTERPRET
from engine.runtime.batch import SequenceStep
from engine.config import ModelConfig
from engine.runtime.weights import LayerWeights, ModelWeights
from engine.runtime.numpy_backend import NumpyBackend
from tinyllama_kernels.triton_backend import TritonBackend


def _config(n_heads, n_kv_heads, tied=False):
    return ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=8,
                       max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied)


def _weights(c: ModelConfig, seed=0) -> ModelWeights:
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.2):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm():
        return (1.0 + 0.2 * rng.standard_normal(c.hidden_size)).astype(np.float32)

    qkv_rows = c.q_size + 2 * c.kv_size
    layers = [LayerWeights(attn_norm=norm(), wqkv=rand(qkv_rows, c.hidden_size), wo=rand(c.hidden_size, c.q_size),
                           mlp_norm=norm(), w_gate_up=rand(2 * c.intermediate_size, c.hidden_size),
                           w_down=rand(c.hidden_size, c.intermediate_size))
              for _ in range(c.num_hidden_layers)]
    embed = rand(c.vocab_size, c.hidden_size, scale=1.0)
    lm_head = embed if c.tie_word_embeddings else rand(c.vocab_size, c.hidden_size)
    return ModelWeights(embed=embed, layers=layers, final_norm=norm(), lm_head=lm_head)


def _rel(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _run_script(backend):
    """Prefill two prompts, decode them together, a ragged batch, then truncate and re-feed: every logits array."""
    out = []
    a, b = backend.new_cache(), backend.new_cache()
    out += backend.forward([SequenceStep(a, [5, 17, 3, 44, 9], all_logits=True)])
    out += backend.forward([SequenceStep(b, [1, 2], all_logits=False)])
    out += backend.forward([SequenceStep(a, [7]), SequenceStep(b, [8])])  # batched decode
    out += backend.forward([SequenceStep(a, [11, 12, 13], all_logits=True), SequenceStep(b, [14])])  # ragged
    a.truncate(4)
    out += backend.forward([SequenceStep(a, [60, 61], all_logits=True)])  # re-feed after a rejected suffix
    assert (a.length, b.length) == (6, 4)
    return out


@pytest.mark.parametrize("n_heads,n_kv_heads,tied", [(4, 4, False), (4, 2, True), (4, 1, False)])
def test_triton_backend_matches_numpy_fp32(n_heads, n_kv_heads, tied):
    c = _config(n_heads, n_kv_heads, tied)
    w = _weights(c, seed=n_heads + n_kv_heads)
    ours = _run_script(TritonBackend(c, w, dtype="float32"))
    ref = _run_script(NumpyBackend(c, w))
    assert [o.shape for o in ours] == [r.shape for r in ref]
    for o, r in zip(ours, ref):
        assert o.dtype == np.float32
        assert _rel(o, r) < 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_triton_backend_16bit_close_to_numpy(dtype):
    """Against the NumPy fp32 forward on the same rounded weights, within forward_tolerance (derived from the
    format's rounding and the roundings on the way to a logit; see tests/kernel_support.py)."""
    c = _config(4, 2)
    w = _weights(c, seed=3)
    ours = _run_script(TritonBackend(c, w, dtype=dtype))
    ref = _run_script(NumpyBackend(c, rounded_weights(w, getattr(torch, dtype))))
    tolerance = forward_tolerance(getattr(torch, dtype), c.num_hidden_layers)
    for o, r in zip(ours, ref):
        assert _rel(o, r) < tolerance


def test_stories260k_prompt_logits_on_triton(stories260k):
    import engine

    model = engine.load_model(str(stories260k), backend="triton", dtype="float32")
    ref = np.load(stories260k / "reference_outputs.npz")
    logits = model.logits(ref["prompt_ids"])
    assert np.max(np.abs(logits - ref["prompt_logits"])) < 1e-4


@pytest.mark.slow
def test_stories260k_greedy_on_triton(stories260k):
    import engine
    from tests.conftest import read_json

    model = engine.load_model(str(stories260k), backend="triton", dtype="float32")
    expected = read_json(stories260k / "reference_outputs.json")
    prompt = expected["prompt_ids"]
    assert model.generate(prompt, max_new_tokens=32) == expected["greedy_from_prompt_ids_32"][len(prompt):]
