"""OpenAI's presence / frequency penalties (against a float64 hand computation) and per-token log-probabilities
(against a float64 log-softmax of Model.logits over the prompt and the generated tokens)."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.errors import EngineError
from engine.generation.sampling import (SamplingError, SamplingParams, apply_presence_frequency_penalty,
                                        process_logits, sample_token)

GENERATED = (3, 7, 3, 3, 49, 7, 60, -1)  # repeats; 60 and -1 are outside a 50-token vocabulary


def hand_penalized(row, generated, presence, frequency) -> np.ndarray:
    """OpenAI's definition in float64: logit[t] -= frequency * count[t] + presence * (count[t] > 0)."""
    out = np.asarray(row, dtype=np.float64).copy()
    for t in range(out.shape[0]):
        count = sum(1 for g in generated if g == t)
        out[t] -= frequency * count + presence * (count > 0)
    return out


@pytest.mark.parametrize("presence, frequency", [(0.5, 0.0), (0.0, 0.7), (1.3, -0.4), (-2.0, 2.0)])
def test_penalty_equals_float64_hand_computation(presence, frequency):
    row = (np.random.default_rng(1).standard_normal(50) * 3).astype(np.float32)
    ours = apply_presence_frequency_penalty(row, GENERATED, presence, frequency)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, hand_penalized(row, GENERATED, presence, frequency).astype(np.float32))
    untouched = [t for t in range(50) if t not in GENERATED]
    np.testing.assert_array_equal(ours[untouched], row[untouched])


def test_penalties_sit_between_repetition_penalty_and_temperature():
    row = (np.random.default_rng(2).standard_normal(50) * 3).astype(np.float32)
    prompt, generated = [1, 2, 3], [3, 9, 9]
    params = SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.6)
    expected = np.asarray(row, dtype=np.float64)
    for t in set(prompt + generated):  # transformers' repetition penalty over the whole context
        expected[t] = expected[t] * 1.3 if expected[t] < 0 else expected[t] / 1.3
    expected = hand_penalized(expected, generated, 0.4, 0.6) / 0.7
    ours = process_logits(row, params, prompt + generated, generated_ids=generated)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_greedy_argmax_is_taken_after_the_penalties():
    row = np.zeros(10, dtype=np.float32)
    row[4], row[6] = 2.0, 1.5
    rng = np.random.default_rng(0)
    assert sample_token(row, SamplingParams(), rng, [4], generated_ids=[4]) == 4
    assert sample_token(row, SamplingParams(presence_penalty=0.6), rng, [4], generated_ids=[4]) == 6
    assert sample_token(row, SamplingParams(presence_penalty=0.6), rng, [4], generated_ids=[]) == 4  # prompt only


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-2.01),
                                 dict(presence_penalty=float("nan")), dict(frequency_penalty="1")])
def test_penalty_range_is_openais(bad):
    with pytest.raises(SamplingError, match=next(iter(bad))):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def stories(stories260k):
    return engine.load_model(str(stories260k))


def test_penalties_in_generation_count_generated_tokens_only(stories):
    """Greedy decoding with penalties equals a hand-run loop over Model.logits that penalizes only new tokens."""
    prompt = stories.prompt_ids("Once upon a time, there was a little girl named Lily. Lily")
    presence, frequency, n = 0.8, 0.6, 30
    ids = list(prompt)
    for _ in range(n):
        logits = hand_penalized(stories.logits(ids)[-1], ids[len(prompt):], presence, frequency)
        ids.append(int(np.argmax(logits)))
    got = stories.generate(prompt, max_new_tokens=n, ignore_eos=True, presence_penalty=presence,
                           frequency_penalty=frequency)
    assert got == ids[len(prompt):]
    assert got != stories.generate(prompt, max_new_tokens=n, ignore_eos=True)  # the penalties changed the text
    with pytest.raises(EngineError, match="presence_penalty"):
        stories.complete(prompt, presence_penalty=3.0)


def log_softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.2, top_k=20, seed=5, repetition_penalty=1.3)])
def test_logprobs_are_the_log_softmax_of_the_raw_logits(stories, sampling):
    """Chosen and top-N log-probabilities come from the model's raw logits, before any sampling processor."""
    prompt = stories.prompt_ids("The little dog")
    result = stories.complete(prompt, max_new_tokens=12, ignore_eos=True, logprobs=4, **sampling)
    reference = log_softmax64(stories.logits(prompt + result.token_ids))[len(prompt) - 1:-1]
    assert len(result.logprobs) == len(result.token_ids) == 12
    for token, entry, ref in zip(result.token_ids, result.logprobs, reference):
        assert entry.logprob == pytest.approx(ref[token], abs=2e-4)
        assert [t for t, _ in entry.top] == list(np.argsort(-ref, kind="stable")[:4])
        np.testing.assert_allclose([v for _, v in entry.top], np.sort(ref)[::-1][:4], atol=2e-4)


def test_logprobs_only_when_asked_and_on_stream_events(stories):
    plain = stories.complete("The little dog", max_new_tokens=5)
    assert plain.logprobs is None
    gen = stories.stream("The little dog", max_new_tokens=5, logprobs=0)
    events = list(gen)
    assert all(e.logprob is not None and e.logprob.top == () for e in events)
    assert [e.logprob for e in events] == gen.result.logprobs
    with pytest.raises(EngineError, match="logprobs"):
        stories.complete("The little dog", logprobs=-1)
