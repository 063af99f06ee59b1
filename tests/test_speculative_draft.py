"""Speculative decoding with a draft model (engine.generation.speculative.DraftModel): whatever the draft proposes,
the output is exactly plain decoding's (greedy against transformers' own greedy tokens, seeded sampling against plain
sampling), alone, in a batch and through the serving loop; the draft's KV cache is rolled back with the model's.
Every step drafts here (the `always_draft` fixture); tests/test_speculation.py tests when drafting pays."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.errors import EngineError
from engine.generation.scheduler import Scheduler
from engine.generation.speculative import DraftModel, Proposal
from engine.runtime.batch import SequenceStep
from tests.conftest import load_reference, make_random_checkpoint, reference_greedy

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"
pytestmark = pytest.mark.usefixtures("always_draft")  # the drafting mechanics: every step drafts, paying or not


@pytest.fixture(scope="module")
def stories(stories260k):
    return engine.load_model(str(stories260k))


@pytest.fixture(scope="module")
def int4_draft(stories):
    """The model's own int4 copy (weights_dtype="int4"): it disagrees with the model now and then."""
    return stories.draft_model("int4")


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    """Random weights over stories260K's 512-token vocabulary: a draft that is almost always wrong."""
    return engine.load_model(str(make_random_checkpoint(tmp_path_factory.mktemp("draft"), vocab_size=512,
                                                        max_position_embeddings=512, seed=3)))


def test_greedy_with_a_draft_model_equals_plain_and_transformers(stories, stories260k, int4_draft):
    plain = stories.complete(PROMPT, max_new_tokens=60, ignore_eos=True)
    fast = stories.complete(PROMPT, max_new_tokens=60, ignore_eos=True, speculate=5, draft="int4")
    assert stories.draft_model("int4") is int4_draft
    assert fast.token_ids == plain.token_ids
    ids = stories.prompt_ids(PROMPT)
    assert fast.token_ids[:24] == reference_greedy(load_reference(stories260k), ids, 24)
    assert fast.draft_tokens > 0 and 0.3 < fast.acceptance_rate < 1.0  # some kept, some rolled back


def test_a_wrong_draft_changes_nothing(stories, other_draft):
    plain = stories.complete(PROMPT, max_new_tokens=40, ignore_eos=True)
    fast = stories.complete(PROMPT, max_new_tokens=40, ignore_eos=True, speculate=4, draft=other_draft)
    assert fast.token_ids == plain.token_ids
    assert fast.draft_tokens > 0 and fast.acceptance_rate < 0.5


def test_seeded_sampling_with_a_draft_model_equals_plain(stories, int4_draft):
    kw = dict(max_new_tokens=50, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True, repetition_penalty=1.1)
    plain = stories.complete(PROMPT, **kw)
    fast = stories.complete(PROMPT, speculate=4, draft=int4_draft, **kw)
    assert fast.token_ids == plain.token_ids and fast.accepted_draft_tokens > 0
    streamed = [e.token_id for e in stories.stream(PROMPT, speculate=4, draft=int4_draft, **kw)]
    assert streamed == plain.token_ids


def test_batch_with_a_draft_model_equals_plain_and_batches_the_draft(stories, int4_draft):
    prompts = [PROMPT, "The dog ran", "Tom and Sue went to the park. They saw a big", "A"]
    kw = dict(max_new_tokens=30, stop=["ball"], seed=1)
    plain = stories.generate_batch(prompts, **kw)
    scheduler = Scheduler(stories)
    requests = [scheduler.submit(stories.prompt_ids(p), speculate=4, draft=int4_draft, **kw) for p in prompts]
    before = requests[0].drafter.forwards
    for _ in scheduler.run():
        pass
    assert [r.result.token_ids for r in requests] == [r.token_ids for r in plain]
    assert [r.result.text for r in requests] == [r.text for r in plain]
    drafter = requests[0].drafter
    assert all(r.drafter is drafter for r in requests)  # one draft model for the batch ...
    assert drafter.forwards - before < sum(r.result.draft_tokens for r in requests)  # one forward per position for all
    assert [r.token_ids for r in stories.generate_batch(prompts, speculate=4, draft=int4_draft, **kw)] == \
        [r.token_ids for r in plain]


def test_combined_with_lookup(stories):
    """"int8+lookup": prompt lookup where the context has a match (no draft forward), the int8 copy elsewhere."""
    ids = stories.prompt_ids(PROMPT + " " + PROMPT)
    plain = stories.generate(ids, max_new_tokens=40, ignore_eos=True)
    runs = {}
    for draft in ("int8", "int8+lookup"):
        scheduler = Scheduler(stories)
        r = scheduler.submit(ids, speculate=4, draft=draft, max_new_tokens=40, ignore_eos=True)
        before = r.drafter.forwards
        for _ in scheduler.run():
            pass
        assert r.result.token_ids == plain
        runs[draft] = (r.lookup_first, r.drafter.forwards - before)
    assert runs["int8"][0] is False and runs["int8+lookup"][0] is True
    assert 0 < runs["int8+lookup"][1] < runs["int8"][1]  # lookup drafted some steps: fewer draft forwards


def test_draft_cache_holds_its_context_and_rolls_back(int4_draft):
    """propose(): the draft's greedy tokens (its own plain decoding), its cache = context + all but the last."""
    drafter = DraftModel(int4_draft)
    context = int4_draft.prompt_ids(PROMPT)
    cache = drafter.new_cache()
    draft = drafter.propose([(cache, context, 5)])[0].tokens
    assert draft == int4_draft.generate(context, max_new_tokens=5, ignore_eos=True, repetition_penalty=1.0)
    assert cache.length == len(context) + 4
    cache.truncate(len(context) + 2)  # as after two accepted tokens: the next round feeds only what is new
    again = drafter.propose([(cache, context + draft[:2] + [7], 3)])[0].tokens
    fresh = int4_draft.generate(context + draft[:2] + [7], max_new_tokens=3, ignore_eos=True, repetition_penalty=1.0)
    assert again == fresh


def test_named_draft_is_loaded_once_on_first_use_and_shares_equal_arrays(stories260k):
    model = engine.load_model(str(stories260k))
    assert model._drafts == {}
    plain = model.complete(PROMPT, max_new_tokens=20, ignore_eos=True)
    fast = model.complete(PROMPT, max_new_tokens=20, ignore_eos=True, speculate=3, draft="int8")
    assert fast.token_ids == plain.token_ids
    draft = model.draft_model("int8")
    assert list(model._drafts) == ["int8"] and model.draft_model("int8") is draft and draft.weights_dtype == "int8"
    assert draft.backend.weights.layers[0].attn_norm is model.backend.weights.layers[0].attn_norm  # held once
    assert draft.backend.weights.final_norm is model.backend.weights.final_norm
    assert model.draft_model("float32") is model  # the model's own dtype: nothing more to load


def test_bad_drafts_are_one_line_errors(stories, tmp_path):
    with pytest.raises(EngineError, match="draft must be one of"):
        stories.complete(PROMPT, speculate=2, draft="")
    with pytest.raises(EngineError, match="weights_dtype must be one of"):
        stories.complete(PROMPT, speculate=2, draft="int3")
    small = engine.load_model(str(make_random_checkpoint(tmp_path / "v", vocab_size=256, max_position_embeddings=512)))
    with pytest.raises(EngineError, match="vocabulary"):
        stories.complete(PROMPT, speculate=2, draft=small)


def test_serving_loop_speculates_with_a_draft_model(stories, int4_draft):
    import queue

    from engine.generation.serving import ServingLoop
    from engine.generation.state import GenerationResult, default_options

    plain = stories.complete(PROMPT, max_new_tokens=30, ignore_eos=True)
    loop = ServingLoop(stories, speculate=4, draft=int4_draft).start()
    try:
        q: queue.Queue = queue.Queue()
        loop.submit(stories.prompt_ids(PROMPT), default_options(stories, max_new_tokens=30, ignore_eos=True), q.put)
        while not isinstance(item := q.get(timeout=60), GenerationResult):
            pass
    finally:
        loop.stop()
    assert item.token_ids == plain.token_ids and item.accepted_draft_tokens > 0


def test_chat_keeps_the_draft_cache_across_turns(tiny_chat_model):
    """A chat with an int8 draft: each reply is plain decoding's, and the draft's cache, like the model's, keeps the
    conversation so a turn feeds the draft only what is new."""
    from engine.generation.chat import ChatSession

    model = engine.load_model(str(tiny_chat_model))
    plain = ChatSession(model, max_new_tokens=12)
    fast = ChatSession(model, max_new_tokens=12, speculate=3, draft="int8")
    for text in ("Hello there", "Tell me more"):
        a, b = plain.reply(text), fast.reply(text)
        assert b.token_ids == a.token_ids and b.draft_tokens > 0
        held = fast.draft_cache.length
        assert 0 < held <= fast.cache.length  # a prefix of what the model's cache holds
    assert fast.stats.draft_tokens == b.draft_tokens


def test_draft_stops_after_a_near_tie_once_its_error_is_known(int4_draft):
    """Until MIN_OBSERVED positions are verified a draft runs to its length; after, a token whose margin is within
    the measured margin error ends the draft (its cache then holds the context plus all but that token)."""
    drafter = DraftModel(int4_draft)
    context = int4_draft.prompt_ids(PROMPT)
    cache = drafter.new_cache()
    first = drafter.propose([(cache, context, 6)])[0]
    assert len(first.tokens) == 6 and drafter.stop_margin == 0.0
    row = int4_draft.logits(context)[-1]
    assert first.margins[0] == pytest.approx(float(np.sort(row)[-1] - np.sort(row)[-2]), rel=1e-5)
    fake = np.zeros((1, int4_draft.config.vocab_size), dtype=np.float32)  # a model seeing a tie everywhere
    threshold = sorted(first.margins)[3]  # errors of this size: the 3 smallest margins are near-ties
    for _ in range(DraftModel.MIN_OBSERVED):
        drafter.observe(Proposal([first.tokens[0]], [first.runner_ups[0]], [threshold]), fake)
    assert drafter.stop_margin == pytest.approx(threshold)  # rms error, z = 1
    cache.truncate(0)
    again = drafter.propose([(cache, context, 6)])[0]
    small = next(i for i, m in enumerate(first.margins) if m < threshold)
    assert again.tokens == first.tokens[: small + 1] and cache.length == len(context) + small
