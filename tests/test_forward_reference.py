"""The NumPy forward pass against references: transformers' reference outputs on stories260K (a real trained model)
and transformers' LlamaForCausalLM on random checkpoints of many shapes, dtypes and layouts."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.runtime.batch import SequenceStep
from tests.conftest import load_reference, make_random_checkpoint, read_json, reference_greedy, reference_logits

STORY_START = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference relative to the logit scale (largest |ref|)."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# --- stories260K: a real trained model with transformers' reference logits -------------------------------------

@pytest.fixture(scope="module")
def stories(stories260k):
    return engine.load_model(str(stories260k))


def test_stories260k_prompt_logits_match_transformers(stories, stories260k):
    ref = np.load(stories260k / "reference_outputs.npz")
    logits = stories.logits(ref["prompt_ids"])
    assert logits.dtype == np.float32 and logits.shape == ref["prompt_logits"].shape
    assert np.max(np.abs(logits - ref["prompt_logits"])) < 1e-4


def test_stories260k_greedy_64_tokens_and_text(stories, stories260k):
    expected = read_json(stories260k / "reference_outputs.json")
    reference_ids = expected["greedy_from_bos_ids_64"]  # BOS + 64 generated
    new = stories.generate(reference_ids[:1], max_new_tokens=64)
    assert new == reference_ids[1:]
    text = stories.tokenizer.decode(reference_ids[:1] + new, skip_special_tokens=True)
    assert text == expected["greedy_from_bos_text"]
    assert text.startswith(STORY_START)


def test_stories260k_greedy_from_prompt(stories, stories260k):
    expected = read_json(stories260k / "reference_outputs.json")
    prompt = expected["prompt_ids"]
    reference = expected["greedy_from_prompt_ids_32"]
    assert stories.generate(prompt, max_new_tokens=32) == reference[len(prompt):]


def test_stories260k_config_is_read(stories):
    c = stories.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (64, 8, 4, 8, 512)
    assert c.tie_word_embeddings and stories.backend.weights.lm_head is stories.backend.weights.embed


# --- random checkpoints against LlamaForCausalLM -------------------------------------------------------------------

SHAPES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa4": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
}
VARIANTS = [
    ("mha", "float32", False, None),
    ("gqa2", "float32", True, None),
    ("gqa4", "bfloat16", False, None),
    ("mqa", "float16", True, None),
    ("gqa2", "float32", False, "60KB"),  # sharded: model.safetensors.index.json + several files
    ("gqa4", "bfloat16", True, "40KB"),
]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}-{'tied' if v[2] else 'untied'}"
                                                               f"{'-sharded' if v[3] else ''}")
def random_pair(request, tmp_path_factory):
    shape, dtype, tied, shard = request.param
    folder = make_random_checkpoint(tmp_path_factory.mktemp("ckpt"), dtype=dtype, max_shard_size=shard,
                                    tie_word_embeddings=tied, seed=VARIANTS.index(request.param), **SHAPES[shape])
    if shard:
        assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 1
    return engine.load_model(str(folder)), load_reference(folder)


@pytest.mark.parametrize("length", [1, 2, 17, 64])
def test_random_logits_match_transformers(random_pair, length):
    model, ref = random_pair
    ids = np.random.default_rng(length).integers(0, model.config.vocab_size, size=length)
    ours = model.logits(ids)
    expected = reference_logits(ref, ids)
    assert ours.dtype == np.float32
    assert relative_error(ours, expected) < 1e-4


def test_random_greedy_tokens_match_transformers(random_pair):
    model, ref = random_pair
    ids = [1, 17, 99, 3, 250, 42]
    assert model.generate(ids, max_new_tokens=24, ignore_eos=True) == reference_greedy(ref, ids, 24)


def test_decode_through_cache_equals_full_prefill(random_pair):
    model, _ = random_pair
    ids = np.random.default_rng(7).integers(0, model.config.vocab_size, size=40)
    full = model.logits(ids)
    cache = model.new_cache()
    split = model.forward([SequenceStep(cache, ids[:25], all_logits=True)])[0]  # a prefill chunk, then one by one
    rows = [split]
    for t in ids[25:]:
        rows.append(model.forward([SequenceStep(cache, [t])])[0])
    stepped = np.concatenate(rows)
    assert cache.length == len(ids)
    assert np.max(np.abs(stepped - full)) < 1e-4 * np.max(np.abs(full))


def test_ragged_batch_equals_single_sequences(random_pair):
    model, _ = random_pair
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, model.config.vocab_size, size=n) for n in (5, 1, 12)]
    caches = [model.new_cache() for _ in prompts]
    batched = model.forward([SequenceStep(c, p, all_logits=True) for c, p in zip(caches, prompts)])
    for p, got in zip(prompts, batched):
        assert np.max(np.abs(got - model.logits(p))) < 1e-5 * np.max(np.abs(got)) + 1e-6
    # one decode step for all three together equals each sequence alone
    nxt = [int(rng.integers(0, model.config.vocab_size)) for _ in prompts]
    step = model.forward([SequenceStep(c, [t]) for c, t in zip(caches, nxt)])
    for p, t, got in zip(prompts, nxt, step):
        alone = model.logits(np.append(p, t))[-1:]
        assert np.max(np.abs(got - alone)) < 1e-4 * np.max(np.abs(alone))


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    folder = make_random_checkpoint(tmp_path, rope_parameters={"rope_theta": 10000.0, **scaling}, head_dim=32,
                                    hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    model, ref = engine.load_model(str(folder)), load_reference(folder)
    assert model.config.rope_scaling["rope_type"] == scaling["rope_type"]
    ids = np.arange(60) % 256
    assert relative_error(model.logits(ids), reference_logits(ref, ids)) < 1e-4


def test_tinyllama_dimensions_two_layers(tmp_path):
    """TinyLlama-1.1B's real widths (hidden 2048, 32/4 heads, intermediate 5632, vocab 32000) with 2 layers."""
    folder = make_random_checkpoint(tmp_path, dtype="bfloat16", vocab_size=32000, hidden_size=2048,
                                    intermediate_size=5632, num_hidden_layers=2, num_attention_heads=32,
                                    num_key_value_heads=4, max_position_embeddings=2048, initializer_range=0.02)
    model, ref = engine.load_model(str(folder)), load_reference(folder)
    ids = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]
    assert relative_error(model.logits(ids), reference_logits(ref, ids)) < 1e-4
    assert model.generate(ids, max_new_tokens=6, ignore_eos=True) == reference_greedy(ref, ids, 6)


def test_long_prompts_run_in_passes_with_the_same_logits(random_pair, monkeypatch):
    """More tokens than PASS_ROWS in one call run as several passes (bounded activation memory): the logits equal
    one pass over everything (to rounding; bit-equal on the compiled kernels, whose rows do not depend on M)."""
    from engine.runtime import numpy_backend

    model, _ = random_pair
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, model.config.vocab_size, size=n) for n in (40, 3, 25)]
    whole = model.forward([SequenceStep(model.new_cache(), p, all_logits=True) for p in prompts])
    last = model.forward([SequenceStep(model.new_cache(), p) for p in prompts])
    monkeypatch.setattr(numpy_backend, "PASS_ROWS", 16)  # 68 tokens: 5 passes, sequences cut across them
    caches = [model.new_cache() for _ in prompts]
    pieces = model.forward([SequenceStep(c, p, all_logits=True) for c, p in zip(caches, prompts)])
    for a, b, c in zip(whole, pieces, caches):
        assert b.shape == a.shape and np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))
    assert [c.length for c in caches] == [40, 3, 25]
    for a, b in zip(last, model.forward([SequenceStep(model.new_cache(), p) for p in prompts])):
        assert b.shape == (1, model.config.vocab_size) and np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))
