"""Model.trace against transformers (float32, eager attention): output_attentions and output_hidden_states on random
checkpoints (MHA, GQA, MQA, tied) and on stories260K; `layers=`, the memory guard, and that tracing changes nothing."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.config import ModelConfig
from engine.errors import EngineError
from engine.runtime.batch import SequenceStep
from engine.runtime.trace import TRACE_MEMORY_LIMIT, TraceRecorder, trace_bytes
from tests.conftest import load_reference, make_random_checkpoint, read_json

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."

SHAPES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def reference_trace(ref, ids):
    """transformers' logits, attentions (L, n_heads, T, T) and hidden states (L + 1, T, hidden) as NumPy."""
    import torch

    with torch.no_grad():
        out = ref(torch.tensor([list(ids)]), output_attentions=True, output_hidden_states=True)
    return (out.logits[0].numpy(), [a[0].numpy() for a in out.attentions], [h[0].numpy() for h in out.hidden_states])


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
def random_pair(request, tmp_path_factory):
    folder = make_random_checkpoint(tmp_path_factory.mktemp("trace"), num_hidden_layers=3,
                                    seed=list(SHAPES).index(request.param) + 20, **SHAPES[request.param])
    return engine.load_model(str(folder)), load_reference(folder)


@pytest.fixture(scope="module")
def stories_pair(stories260k):
    return engine.load_model(str(stories260k)), load_reference(stories260k)


def assert_trace_equals_transformers(model, ref, ids):
    trace = model.trace(ids, attentions=True, hidden_states=True)
    logits, attentions, hidden = reference_trace(ref, ids)
    c, t = model.config, len(ids)
    assert trace.token_ids.tolist() == list(ids)
    assert len(trace.attentions) == c.num_hidden_layers and len(trace.hidden_states) == c.num_hidden_layers + 1
    above_diagonal = np.triu(np.ones((t, t), dtype=bool), 1)
    for ours, theirs in zip(trace.attentions, attentions):
        assert ours.dtype == np.float32 and ours.shape == (c.num_attention_heads, t, t) == theirs.shape
        assert np.max(np.abs(ours - theirs)) < 1e-5
        assert np.max(np.abs(ours.sum(axis=-1) - 1)) < 1e-5
        assert np.all(ours[:, above_diagonal] == 0.0)  # exact zeros, not just small
    for ours, theirs in zip(trace.hidden_states, hidden):
        assert ours.dtype == np.float32 and ours.shape == (t, c.hidden_size) == theirs.shape
        assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < 1e-4
    assert np.max(np.abs(trace.logits - logits)) / np.max(np.abs(logits)) < 1e-4
    return trace


def test_random_configs_attentions_and_hidden_states_equal_transformers(random_pair):
    model, ref = random_pair
    rng = np.random.default_rng(5)
    ids = [1] + rng.integers(3, model.config.vocab_size, 23).tolist()
    assert_trace_equals_transformers(model, ref, ids)


def test_stories260k_attentions_and_hidden_states_equal_transformers(stories_pair):
    model, ref = stories_pair
    trace = assert_trace_equals_transformers(model, ref, model.tokenizer.encode(STORY))
    # the last hidden state is after the final norm: lm_head of it is the logits
    weights = model.backend.weights
    assert np.max(np.abs(trace.hidden_states[-1] @ weights.lm_head.T - trace.logits)) < 1e-4


def test_tracing_changes_nothing(stories_pair, stories260k):
    model, _ = stories_pair
    ids = read_json(stories260k / "reference_outputs.json")["prompt_ids"]
    plain = model.logits(ids)
    assert np.array_equal(model.trace(ids).logits, plain)  # the same forward, bit for bit
    assert np.array_equal(model.trace(ids, attentions=True, hidden_states=True).logits, plain)
    assert model.trace(ids).attentions is None and model.trace(ids).hidden_states is None


def test_layers_limits_what_is_recorded(stories_pair):
    model, _ = stories_pair
    ids = model.tokenizer.encode(STORY)
    full = model.trace(ids, attentions=True, hidden_states=True)
    part = model.trace(ids, attentions=True, hidden_states=True, layers=[1, -1])  # -1: the final hidden state
    n = model.config.num_hidden_layers
    assert part.layers == (1, n)
    assert [a is not None for a in part.attentions] == [i == 1 for i in range(n)]
    assert [h is not None for h in part.hidden_states] == [i in (1, n) for i in range(n + 1)]
    assert np.array_equal(part.attentions[1], full.attentions[1])
    assert np.array_equal(part.hidden_states[n], full.hidden_states[n])
    only_attention = model.trace(ids, attentions=True, layers=[0])
    assert only_attention.hidden_states is None and only_attention.attentions[0] is not None
    with pytest.raises(EngineError, match="out of range"):
        model.trace(ids, attentions=True, layers=[n + 1])
    with pytest.raises(EngineError, match="ints"):
        model.trace(ids, attentions=True, layers=["0"])


def test_memory_guard_refuses_with_one_clear_line(stories_pair):
    model, _ = stories_pair
    ids = model.tokenizer.encode(STORY)
    t, c = len(ids), model.config
    needed = (t * c.vocab_size + c.num_hidden_layers * c.num_attention_heads * t * t) * 4
    assert trace_bytes(c, t, True, False, tuple(range(c.num_hidden_layers + 1))) == needed
    with pytest.raises(EngineError) as e:
        model.trace(ids, attentions=True, max_bytes=needed - 1)
    message = str(e.value)
    assert "\n" not in message and "layers=" in message and "shorter prompt" in message
    model.trace(ids, attentions=True, max_bytes=needed)  # exactly at the limit is allowed


def test_the_documented_limit_refuses_tinyllama_at_2048_tokens(tinyllama_tokenizer_dir):
    config = ModelConfig.from_dict(read_json(tinyllama_tokenizer_dir / "config.json"))
    every_layer = tuple(range(config.num_hidden_layers + 1))
    attention_bytes = trace_bytes(config, 2048, True, False, every_layer) - 2048 * config.vocab_size * 4
    assert 11.5e9 < attention_bytes < 12.0e9  # docs/inspection.md's 11.8 GB
    with pytest.raises(EngineError, match="layers="):
        TraceRecorder(config, 2048, attentions=True)
    TraceRecorder(config, 2048, attentions=True, layers=[0, 5, 21])  # three layers fit in TRACE_MEMORY_LIMIT
    assert TRACE_MEMORY_LIMIT == 4 << 30


def test_trace_errors_are_user_errors(stories_pair):
    model, _ = stories_pair
    with pytest.raises(EngineError, match="empty"):
        model.trace([])
    other = engine.Model(model.config, backend=type("Other", (), {"name": "triton"})(), folder=model.folder)
    with pytest.raises(EngineError, match="numpy backend"):
        other.trace([1, 2, 3])


def test_a_recorded_forward_takes_one_sequence(stories_pair):
    model, _ = stories_pair
    steps = [SequenceStep(model.new_cache(), [1, 2]), SequenceStep(model.new_cache(), [1, 3])]
    with pytest.raises(ValueError, match="one sequence"):
        model.backend.forward(steps, recorder=TraceRecorder(model.config, 2))


def test_the_benchmarks_branch_free_forward_is_the_same_forward(stories_pair):
    """bench/trace_overhead.py compares the shipped forward with a copy whose recorder lines are stripped by ast:
    the copy must compute the same logits and keep no trace of the recorder."""
    import inspect

    from bench.trace_overhead import branch_free_forward

    model, _ = stories_pair
    stripped = branch_free_forward()
    assert inspect.getsource(type(model.backend)._forward_pass).count("recorder is not None") >= 4
    ids = model.tokenizer.encode(STORY)
    shipped_cache, stripped_cache = model.new_cache(), model.new_cache()
    for chunk in (ids[:10], ids[10:11], ids[11:]):  # prefill, one decode step, a chunk
        a = model.backend.forward([SequenceStep(shipped_cache, chunk, all_logits=True)])[0]
        b = stripped(model.backend, [SequenceStep(stripped_cache, chunk, all_logits=True)])[0]
        assert np.array_equal(a, b)
