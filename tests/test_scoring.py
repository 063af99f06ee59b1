"""Scoring prompts in the scheduler (prompt_logprobs, max_new_tokens=0), the logit bias, and embeddings pooling: each
checked against transformers on stories260K (its real weights)."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.errors import EngineError
from engine.generation.sampling import SamplingParams, apply_logit_bias, sample_token
from engine.generation.scheduler import Scheduler
from engine.generation.scoring import score_rows
from engine.generation.state import GenerationOptions, TokenEvent, default_options
from engine.inspect.embeddings import SlicedEmbedding, embed, pool
from engine.runtime.batch import SequenceStep
from engine.runtime.prefix_cache import PrefixCache
from tests.conftest import load_reference, reference_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
        "a big red ball.")


@pytest.fixture(scope="module")
def stories(stories260k):
    return engine.load_model(str(stories260k))


@pytest.fixture(scope="module")
def reference(stories260k):
    return load_reference(stories260k)


def log_softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def check_scores(entries, ids, reference_rows, top: int) -> None:
    """entries: [None, TokenLogprob...] for ids; reference_rows (T, vocab) float64 log-softmax from transformers."""
    assert len(entries) == len(ids) and entries[0] is None
    for j in range(1, len(ids)):
        row, entry = reference_rows[j - 1], entries[j]
        assert entry.logprob == pytest.approx(row[ids[j]], abs=1e-4)
        assert entry.rank == 1 + int((row > row[ids[j]] + 1e-9).sum())
        order = np.lexsort((np.arange(row.size), -row))[:top]
        assert [t for t, _ in entry.top] == [int(t) for t in order]
        assert [v for _, v in entry.top] == pytest.approx(row[order], abs=1e-4)


def test_score_rows_is_the_float64_log_softmax():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 50)) * 4).astype(np.float32)
    logits[2, [3, 7]] = logits[2].max() + 1  # a tie at the top: the lower id first
    targets = rng.integers(0, 50, 6)
    rows = log_softmax64(logits)
    scores = score_rows(logits, targets, top=3)
    for row, target, score in zip(rows, targets, scores):
        assert score.logprob == pytest.approx(row[target], abs=1e-6)
        assert score.rank == 1 + int((row > row[target]).sum())
        assert [t for t, _ in score.top] == list(np.lexsort((np.arange(50), -row))[:3])
    assert [t for t, _ in scores[2].top][:2] == [3, 7]
    assert [s.top for s in score_rows(logits, targets, top=1)] == [(s.top[0],) for s in scores]


def test_a_scoring_request_in_a_busy_chunked_batch_matches_transformers(stories, reference):
    ids = stories.tokenizer.encode(TEXT)
    rows = log_softmax64(reference_logits(reference, ids))
    scheduler = Scheduler(stories, prefill_chunk=7)
    busy = scheduler.submit(stories.tokenizer.encode("The dog"), max_new_tokens=40, ignore_eos=True)
    scheduler.step()
    scheduler.step()  # the other sequence decodes: the scoring prompt now prefills in chunks of 7
    only = scheduler.submit(ids, default_options(stories, max_new_tokens=0, prompt_logprobs=3))
    generating = scheduler.submit(ids, default_options(stories, max_new_tokens=4, prompt_logprobs=0, temperature=0))
    events = {id(r): [] for r in (busy, only, generating)}
    for request, event in scheduler.run():
        events[id(request)].append(event)
    result = only.result
    assert result.token_ids == [] and result.stop_reason == "max_new_tokens" and not events[id(only)]
    check_scores(result.prompt_logprobs, ids, rows, top=3)
    scored = generating.result
    assert scored.token_ids == stories.generate(ids, max_new_tokens=4)  # scoring does not change the answer
    assert [e.logprob for e in scored.prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in result.prompt_logprobs[1:]], abs=1e-5)  # other chunks: other rounding
    first = events[id(generating)][0]
    assert isinstance(first, TokenEvent) and first.prompt_logprobs == scored.prompt_logprobs
    assert all(e.prompt_logprobs is None for e in events[id(generating)][1:])


def test_a_scoring_request_prefills_whole_past_the_prefix_cache_and_forks_share_its_scores(stories, reference):
    ids = stories.tokenizer.encode(TEXT)
    rows = log_softmax64(reference_logits(reference, ids))
    scheduler = Scheduler(stories, prefix_cache=PrefixCache.for_model(stories, 10 ** 8, block_tokens=4))
    warm = scheduler.submit(ids, max_new_tokens=1)
    list(scheduler.run())
    assert warm.result.token_ids
    again = scheduler.submit(ids, max_new_tokens=1)  # restores its prompt from the cache
    scorer = scheduler.submit(ids, default_options(stories, max_new_tokens=2, prompt_logprobs=1, temperature=1,
                                                   seed=3))
    fork = scheduler.fork(scorer, default_options(stories, max_new_tokens=2, prompt_logprobs=1, temperature=1,
                                                  seed=4))
    list(scheduler.run())
    assert again.result.cached_tokens > 0 and scorer.result.cached_tokens == 0
    check_scores(scorer.result.prompt_logprobs, ids, rows, top=1)
    assert fork.result.prompt_logprobs == scorer.result.prompt_logprobs


def test_score_only_is_refused_without_scoring_and_needs_an_empty_cache(stories):
    with pytest.raises(EngineError, match="max_new_tokens must be an integer >= 1"):
        GenerationOptions(max_new_tokens=0)
    GenerationOptions(max_new_tokens=0, prompt_logprobs=0)
    ids = stories.tokenizer.encode(TEXT)
    window = stories.config.max_position_embeddings
    scheduler = Scheduler(stories)
    full = (ids * window)[:window]  # a whole window may be scored when nothing is generated
    request = scheduler.submit(full, default_options(stories, max_new_tokens=0, prompt_logprobs=0))
    list(scheduler.run())
    assert len(request.result.prompt_logprobs) == window
    cache = stories.new_cache()
    stories.forward([SequenceStep(cache, ids[:5])])
    with pytest.raises(EngineError, match="prefilled whole"):
        scheduler.submit(ids, default_options(stories, max_new_tokens=1, prompt_logprobs=0), cache=cache)


def test_logit_bias_adds_to_the_raw_logits_and_minus_100_bans():
    logits = np.array([1.0, 3.0, 2.0, 0.5], dtype=np.float32)
    biased = apply_logit_bias(logits, ((1, -100.0), (2, 0.25), (3, 100.0), (9, 5.0)))
    assert biased[1] == -np.inf and biased[2] == np.float32(2.25) and biased[3] == np.float32(100.5)
    assert biased[0] == logits[0]
    rng = np.random.default_rng(0)
    assert sample_token(logits, SamplingParams(logit_bias=((1, -100.0),)), rng) == 2  # greedy: the next best
    draws = {sample_token(logits, SamplingParams(temperature=1.5, logit_bias={1: -100, 2: -100}), rng)
             for _ in range(200)}
    assert draws == {0, 3}
    for bad in ({-1: 1.0}, {1: 101.0}, {True: 1.0}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_pool_transformers_last_hidden_state(stories, stories260k, pooling):
    model = transformers.LlamaModel.from_pretrained(stories260k, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    for text in ("Once upon a time", TEXT):
        ids = stories.tokenizer.encode(text)
        with torch.no_grad():
            states = model(torch.tensor([ids])).last_hidden_state[0].double().numpy()
        raw = states.mean(axis=0) if pooling == "mean" else states[-1]
        vector = embed(stories, ids, pooling)
        assert vector.dtype == np.float32 and vector.shape == (stories.config.hidden_size,)
        np.testing.assert_allclose(vector, raw / np.linalg.norm(raw), atol=1e-5)
        np.testing.assert_allclose(embed(stories, ids, pooling, normalize=False), raw, rtol=1e-4, atol=1e-5)
    with pytest.raises(EngineError, match="pooling"):
        pool(states, "cls")
    with pytest.raises(EngineError, match="context window"):
        embed(stories, [1] * (stories.config.max_position_embeddings + 1))


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_a_sliced_embedding_is_the_whole_pass_bit_for_bit(stories, pooling):
    """What the server runs between decode steps (SlicedEmbedding, the smallest slices) is embed()'s vector."""
    rng = np.random.default_rng(0)
    for n in (1, 3, 4, 37, stories.config.max_position_embeddings):
        ids = [1] + rng.integers(3, stories.config.vocab_size, n - 1).tolist()
        job = SlicedEmbedding(stories, ids, pooling, normalize=n % 2 == 1)
        slices = 1
        while not job.run_slice(0.0):
            slices += 1
        assert slices == -(-n // 4)  # one smallest piece (4 positions) a slice
        np.testing.assert_array_equal(job.result(), embed(stories, ids, pooling, normalize=n % 2 == 1))
    with pytest.raises(EngineError, match="context window"):
        SlicedEmbedding(stories, [1] * (stories.config.max_position_embeddings + 1))
