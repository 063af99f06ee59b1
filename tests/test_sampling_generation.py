"""Sampling checked at the generation level, against transformers, step by step.

At every step of a real generation (stories260K, a trained tiny Llama) the distribution the engine draws from is
captured where it is made (`SequenceState.accept` -> `sampling.probabilities`) and compared with transformers' own
logits processors (RepetitionPenalty, Temperature, TopK, TopP, MinP, in transformers' order) applied to the whole
context so far (prompt + generated) on the same logits row; the row itself is checked against transformers' forward
on that context. A sampler given the wrong context (only the generated ids, say) or a processor applied out of order
fails here even when it is repeatable. Greedy decoding with a repetition penalty must equal transformers' `generate`
token for token. Exact-tie boundaries of top-p and min-p are checked on rows whose probabilities are exact in float32.
"""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.generation import sampling
from engine.generation.sampling import SamplingParams, apply_min_p, apply_top_p, process_logits
from engine.generation.state import SequenceState
from tests.conftest import load_reference

torch = pytest.importorskip("torch", reason="transformers' processors run on torch")
logits_process = pytest.importorskip("transformers.generation.logits_process",
                                     reason="transformers provides the reference logits processors")

# Tokens of this prompt come back in the story (Lily, she, the, ...): a penalty that ignores the prompt shows.
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play with her toys. One day, Lily"
STEPS = 24


@pytest.fixture(scope="module")
def stories(stories260k):
    return engine.load_model(str(stories260k))


@pytest.fixture(scope="module")
def reference(stories260k):
    return load_reference(stories260k)


def transformers_processors(p: SamplingParams):
    """transformers' processors for `p`, in the order GenerationMixin._get_logits_processor builds them when sampling
    (only the repetition penalty when greedy), each added under transformers' own condition."""
    chain = logits_process.LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        chain.append(logits_process.RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if not p.greedy:
        if p.temperature != 1.0:
            chain.append(logits_process.TemperatureLogitsWarper(p.temperature))
        if p.top_k != 0:
            chain.append(logits_process.TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            chain.append(logits_process.TopPLogitsWarper(p.top_p))
        if p.min_p > 0.0:
            chain.append(logits_process.MinPLogitsWarper(p.min_p))
    return chain


def softmax64(row) -> np.ndarray:
    row = np.asarray(row, dtype=np.float64)
    e = np.exp(row - row.max())
    return e / e.sum()


class Recorder:
    """Captures, per accepted token, the logits row `SequenceState.accept` was given and the distribution
    `sampling.probabilities` handed to the draw (None when greedy: no distribution is made)."""

    def __init__(self, monkeypatch):
        self.rows: list[np.ndarray] = []
        self.distributions: list[np.ndarray | None] = []
        accept, probabilities = SequenceState.accept, sampling.probabilities

        def recording_accept(state, logits, context_length=None):
            self.rows.append(np.array(logits, dtype=np.float32))
            self.distributions.append(None)
            return accept(state, logits, context_length)

        def recording_probabilities(*args, **kwargs):
            out = probabilities(*args, **kwargs)
            self.distributions[-1] = out.copy()
            return out

        monkeypatch.setattr(SequenceState, "accept", recording_accept)
        monkeypatch.setattr(sampling, "probabilities", recording_probabilities)


def check_every_step(reference_model, prompt_ids, tokens, recorder, params: SamplingParams):
    """Each step's distribution equals transformers' processors on (prompt + tokens so far, the same logits)."""
    assert len(recorder.rows) == len(tokens) == len(recorder.distributions)
    full = list(prompt_ids) + list(tokens)
    with torch.no_grad():
        ref_logits = reference_model(torch.tensor([full])).logits[0].numpy()
    chain = transformers_processors(params)
    for i, (row, token, drawn_from) in enumerate(zip(recorder.rows, tokens, recorder.distributions)):
        context = full[: len(prompt_ids) + i]
        expected_row = ref_logits[len(context) - 1]
        assert np.abs(row - expected_row).max() <= 1e-4 * np.abs(expected_row).max(), f"step {i}: logits differ"
        processed = chain(torch.tensor([context]), torch.from_numpy(row.copy())[None])[0].numpy()
        if params.greedy:
            assert drawn_from is None and token == int(np.argmax(processed)), f"step {i}"
            continue
        expected = softmax64(processed)
        np.testing.assert_array_equal(drawn_from > 0, expected > 0, err_msg=f"step {i}: different tokens kept")
        np.testing.assert_allclose(drawn_from, expected, rtol=0, atol=1e-6, err_msg=f"step {i}")
        assert expected[token] > 0, f"step {i}: drew token {token}, which transformers removed"


OPTIONS = {  # each option alone (temperature 1 where it is not the one tested), then combinations
    "temperature": SamplingParams(temperature=0.7, seed=1),
    "top_k": SamplingParams(temperature=1.0, top_k=8, seed=2),
    "top_p": SamplingParams(temperature=1.0, top_p=0.7, seed=3),
    "min_p": SamplingParams(temperature=1.0, min_p=0.08, seed=4),
    "repetition_penalty": SamplingParams(temperature=1.0, repetition_penalty=1.5, seed=5),
    "penalty_below_one": SamplingParams(temperature=1.2, repetition_penalty=0.8, top_p=0.95, seed=6),
    "all": SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=7),
    "hot_topk_minp": SamplingParams(temperature=1.6, top_k=40, min_p=0.1, repetition_penalty=1.2, seed=8),
    "greedy_penalty": SamplingParams(repetition_penalty=1.4),
}


def _kwargs(p: SamplingParams) -> dict:
    return dict(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                repetition_penalty=p.repetition_penalty, seed=p.seed)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_step_draws_from_transformers_distribution(stories, reference, monkeypatch, name):
    params = OPTIONS[name]
    recorder = Recorder(monkeypatch)
    result = stories.complete(PROMPT, max_new_tokens=STEPS, ignore_eos=True, **_kwargs(params))
    assert len(result.token_ids) == STEPS
    check_every_step(reference, result.prompt_token_ids, result.token_ids, recorder, params)


def test_the_prompt_counts_for_the_penalty(stories, reference, monkeypatch):
    """The test above is sharp: with this prompt, the penalty over prompt + generated and the penalty over the
    generated ids alone give different distributions at some step (so a sampler given too little context fails)."""
    params = OPTIONS["all"]
    recorder = Recorder(monkeypatch)
    result = stories.complete(PROMPT, max_new_tokens=STEPS, ignore_eos=True, **_kwargs(params))
    differs = [not np.allclose(softmax64(process_logits(row, params, result.prompt_token_ids + result.token_ids[:i])),
                               softmax64(process_logits(row, params, result.token_ids[:i])), atol=1e-6)
               for i, row in enumerate(recorder.rows)]
    assert sum(differs) >= STEPS // 2


@pytest.mark.usefixtures("always_draft")
def test_speculative_and_batched_sampling_draw_from_the_same_distributions(stories, reference, monkeypatch):
    """Verification rows (speculative decoding) and a batch of sequences go through the same per-token step."""
    params = OPTIONS["all"]
    prompt = PROMPT + " " + PROMPT  # repeats itself: prompt lookup finds drafts
    recorder = Recorder(monkeypatch)
    result = stories.complete(prompt, max_new_tokens=STEPS, ignore_eos=True, speculate=4, **_kwargs(params))
    assert result.draft_tokens > 0
    check_every_step(reference, result.prompt_token_ids, result.token_ids, recorder, params)

    recorder = Recorder(monkeypatch)
    results = stories.generate_batch([prompt], max_new_tokens=STEPS, ignore_eos=True, **_kwargs(params))
    check_every_step(reference, results[0].prompt_token_ids, results[0].token_ids, recorder, params)


@pytest.mark.parametrize("penalty", [1.3, 2.0, 0.7])
def test_greedy_with_repetition_penalty_equals_transformers_generate(stories, reference, penalty):
    ids = stories.prompt_ids(PROMPT)
    ours = stories.complete(ids, max_new_tokens=40, repetition_penalty=penalty)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                                    repetition_penalty=penalty, eos_token_id=2, pad_token_id=0)[0, len(ids):].tolist()
    assert ours.token_ids == theirs
    plain = stories.complete(ids, max_new_tokens=40)
    assert plain.token_ids != ours.token_ids  # the penalty changed the output, so the comparison says something


# ---- exact ties at the top-p and min-p boundaries ------------------------------------------------------------------
# Logits 0, -ln2, -2ln2, -3ln2, -3ln2 (float32): exp of these is exactly 1, 1/2, 1/4, 1/8, 1/8 (the true values are
# within 0.03 ulp of those), their sum is 2, so the probabilities 1/2, 1/4, 1/8, 1/16, 1/16 and every partial sum are
# exact in float32: a threshold equal to a partial sum is a true tie, decided by < against <=, not by rounding.
LN2 = np.float32(np.log(2.0))
EXACT = np.array([-3, 0, -2, -3, -1], dtype=np.float32) * LN2  # token order shuffled: p = 1/16, 1/2, 1/8, 1/16, 1/4


def _exact_rows_are_exact():
    probs_np = np.exp(EXACT - EXACT.max())
    probs_np = probs_np / probs_np.sum()
    probs_torch = torch.softmax(torch.from_numpy(EXACT), dim=-1).numpy()
    expected = np.array([1 / 16, 1 / 2, 1 / 8, 1 / 16, 1 / 4], dtype=np.float32)
    assert np.array_equal(probs_np, expected) and np.array_equal(probs_torch, expected), "premise: exact probs"


@pytest.mark.parametrize("top_p, kept", [
    (0.5, [1]),  # mass of the top token is exactly 0.5 = top_p: it alone suffices
    (0.75, [1, 4]),  # 1/2 + 1/4 is exactly 0.75
    (0.875, [1, 4, 2]),
    (0.9375, [1, 4, 2, 0, 3]),  # 1 - 0.9375 = 1/16: the two 1/16 tokens tie; the cumulative of the first is 1/16
    (0.75 + 2 ** -20, [1, 4, 2]),  # just over a partial sum: the next token is needed
])
def test_top_p_at_exact_ties(top_p, kept):
    _exact_rows_are_exact()
    ours = np.isfinite(apply_top_p(EXACT, top_p))
    reference = torch.isfinite(logits_process.TopPLogitsWarper(top_p)(torch.zeros((1, 1), dtype=torch.long),
                                                                      torch.from_numpy(EXACT.copy())[None]))[0]
    if top_p == 0.9375:  # transformers removes a cumulative <= 1/16: one of the tied 1/16 tokens, which one is torch's
        assert ours.sum() == reference.sum().item() == 4 and ours[[1, 4, 2]].all()
        return
    assert ours.tolist() == reference.tolist() == [i in kept for i in range(5)]


@pytest.mark.parametrize("min_p, kept", [
    (0.25, [1, 4, 2]),  # threshold 0.25 * 1/2 = 1/8 exactly: the 1/8 token ties and is kept (removed only if below)
    (0.5, [1, 4]),  # threshold 1/4: the 1/4 token ties and stays
    (0.125, [0, 1, 2, 3, 4]),  # threshold 1/16: the two 1/16 tokens tie and stay
    (0.25 + 2 ** -20, [1, 4]),
    (1.0, [1]),
])
def test_min_p_at_exact_ties(min_p, kept):
    _exact_rows_are_exact()
    ours = np.isfinite(apply_min_p(EXACT, min_p))
    reference = torch.isfinite(logits_process.MinPLogitsWarper(min_p)(torch.zeros((1, 1), dtype=torch.long),
                                                                      torch.from_numpy(EXACT.copy())[None]))[0]
    assert ours.tolist() == reference.tolist() == [i in kept for i in range(5)]
