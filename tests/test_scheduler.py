"""Continuous batching and speculative decoding: batched and speculative greedy output equal plain decoding."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import engine
from engine.errors import EngineError
from engine.generation.scheduler import Scheduler
from engine.generation.speculative import prompt_lookup_draft

PASSAGE = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
           "One day, she saw a big, red ball.")


@pytest.fixture(scope="module")
def stories(stories260k):
    return engine.load_model(str(stories260k))


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    from tests.conftest import make_random_checkpoint

    folder = make_random_checkpoint(tmp_path_factory.mktemp("sched"), num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, seed=3)
    return engine.load_model(str(folder))


def test_batched_sequences_equal_single_sequences(random_model):
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 256, size=n)) for n in (3, 17, 1, 40, 9)]
    lengths = [12, 5, 20, 8, 15]
    scheduler = Scheduler(random_model, prefill_chunk=16)
    requests = [scheduler.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts, lengths)]
    for _ in scheduler.run():
        pass
    for p, n, r in zip(prompts, lengths, requests):
        assert r.result.token_ids == random_model.generate(p, max_new_tokens=n, ignore_eos=True)
        assert r.cache is None  # a finished sequence frees its cache at once


def test_requests_join_and_leave_mid_run(random_model):
    scheduler = Scheduler(random_model, prefill_chunk=8)
    first = scheduler.submit([1, 5, 9], max_new_tokens=30, ignore_eos=True)
    short = scheduler.submit([1, 7], max_new_tokens=3, ignore_eos=True)
    for _ in range(6):
        scheduler.step()
    assert short.finished and short not in scheduler.active  # left after 3 tokens
    late_prompt = list(range(10, 60))  # 50 tokens: prefilled in chunks of 8 while `first` keeps decoding
    late = scheduler.submit(late_prompt, max_new_tokens=10, ignore_eos=True)
    produced_during_prefill = []
    while late.prefilled < len(late_prompt):
        before = len(first.state.generated)
        scheduler.step()
        produced_during_prefill.append(len(first.state.generated) - before)
    assert len(produced_during_prefill) >= 50 // 8 and all(n == 1 for n in produced_during_prefill[:-1])
    for _ in scheduler.run():
        pass
    assert first.result.token_ids == random_model.generate([1, 5, 9], max_new_tokens=30, ignore_eos=True)
    assert late.result.token_ids == random_model.generate(late_prompt, max_new_tokens=10, ignore_eos=True)
    assert short.result.token_ids == random_model.generate([1, 7], max_new_tokens=3, ignore_eos=True)


def test_bad_request_fails_alone(random_model):
    scheduler = Scheduler(random_model)
    good = scheduler.submit([1, 2, 3], max_new_tokens=5, ignore_eos=True)
    for bad in (dict(temperature=-1.0), dict(top_p=3.0), dict(max_new_tokens=0), dict(speculate=-2)):
        with pytest.raises(EngineError):
            scheduler.submit([1, 2, 3], **bad)
    with pytest.raises(EngineError):
        scheduler.submit([1, 999999])  # token outside the vocabulary
    with pytest.raises(EngineError):
        scheduler.submit(list(range(200)))  # longer than the window
    list(scheduler.run())
    assert good.result.stop_reason == "max_new_tokens" and len(good.result.token_ids) == 5


def test_streaming_one_request_among_many(random_model):
    scheduler = Scheduler(random_model)
    a = scheduler.submit([1, 2, 3], max_new_tokens=6, ignore_eos=True)
    b = scheduler.submit([4, 5], max_new_tokens=9, ignore_eos=True)
    ids_a = [e.token_id for e in a]  # drives the scheduler: b advances too
    assert ids_a == a.result.token_ids and len(b.state.generated) >= 6
    ids_b = [e.token_id for e in b]
    assert ids_b == random_model.generate([4, 5], max_new_tokens=9, ignore_eos=True)


def test_cancel_one_request(random_model):
    scheduler = Scheduler(random_model)
    a = scheduler.submit([1, 2, 3], max_new_tokens=50, ignore_eos=True)
    b = scheduler.submit([1, 2, 3], max_new_tokens=8, ignore_eos=True)
    scheduler.step()
    scheduler.step()
    a.cancel()
    list(scheduler.run())
    assert a.result.stop_reason == "cancelled" and len(a.result.token_ids) == 2
    assert b.result.stop_reason == "max_new_tokens"


@pytest.mark.usefixtures("always_draft")
@pytest.mark.parametrize("prompt", [PASSAGE + " Repeat the story: " + PASSAGE[:40], "Once upon a time"])
def test_speculative_greedy_equals_plain(stories, prompt):
    plain = stories.complete(prompt, max_new_tokens=60)
    fast = stories.complete(prompt, max_new_tokens=60, speculate=6)
    assert fast.token_ids == plain.token_ids and fast.text == plain.text and fast.stop_reason == plain.stop_reason
    assert fast.draft_tokens > 0 and 0 < fast.acceptance_rate <= 1


def test_speculative_batch_with_stops_equals_plain(stories):
    prompts = [PASSAGE + " Again: " + PASSAGE[:30], "The cat", PASSAGE]
    plain = stories.generate_batch(prompts, max_new_tokens=40, stop=["ball"])
    fast = stories.generate_batch(prompts, max_new_tokens=40, stop=["ball"], speculate=4)
    for p, f in zip(plain, fast):
        assert (f.token_ids, f.text, f.stop_reason) == (p.token_ids, p.text, p.stop_reason)


def test_speculative_seeded_sampling_equals_plain(stories):
    """Each accepted token is one draw from the same distribution and RNG stream as plain decoding."""
    kw = dict(max_new_tokens=40, temperature=0.8, seed=7)
    assert stories.generate(PASSAGE + " " + PASSAGE, speculate=5, **kw) == stories.generate(PASSAGE + " " + PASSAGE, **kw)


def test_scheduler_asks_prompt_lookup_for_the_payoffs_length(stories, monkeypatch):
    """Each step asks prompt lookup for the length the request's payoff estimate picks (0: nothing asked, a plain
    step), and the output stays the plain one."""
    from engine.generation import scheduler as scheduler_module
    from engine.generation.draft_payoff import DraftPayoff

    asked, planned = [], []
    plan = DraftPayoff.plan

    def recording_plan(self, room, **kw):
        planned.append(plan(self, room, **kw))
        return planned[-1]

    def recording_draft(context, max_draft):
        asked.append(max_draft)
        return prompt_lookup_draft(context, max_draft)

    monkeypatch.setattr(DraftPayoff, "plan", recording_plan)
    monkeypatch.setattr(scheduler_module, "prompt_lookup_draft", recording_draft)
    prompt = "Tom had a red ball. " * 3 + "Then"
    result = stories.complete(prompt, max_new_tokens=40, speculate=8)
    assert result.token_ids == stories.complete(prompt, max_new_tokens=40).token_ids
    assert asked == [k for k in planned if k > 0] and all(0 <= k <= 8 for k in planned)
    assert result.draft_steps + result.plain_steps == len(planned) and result.draft_tokens <= sum(asked)


def test_speculative_respects_the_window(stories, always_draft):
    """Drafts stop one token short of the window (always_draft: the payoff estimate alone would not draft at all
    in these few steps, and the bound would go untested)."""
    prompt = [1] + [403, 407, 261, 378] * 126  # 505 tokens of a repeating pattern: drafts would run past 512
    plain = stories.complete(prompt, max_new_tokens=50)
    fast = stories.complete(prompt, max_new_tokens=50, speculate=8)
    assert fast.token_ids == plain.token_ids and fast.stop_reason == plain.stop_reason == "context_full"


def test_run_streams_every_token_of_every_request(random_model):
    """The (request, event) stream of Scheduler.run() carries each request's tokens, its last one included."""
    scheduler = Scheduler(random_model)
    requests = [scheduler.submit([1, 2, 3], max_new_tokens=n, ignore_eos=True) for n in (4, 9, 1)]
    streamed = {r.id: [] for r in requests}
    for request, event in scheduler.run():
        streamed[request.id].append(event.token_id)
    for r in requests:
        assert streamed[r.id] == r.result.token_ids and len(r.result.token_ids) == r.state.options.max_new_tokens


def test_a_lone_prompt_is_prefilled_in_one_forward(random_model, monkeypatch):
    """prefill_chunk applies while others decode; a sequence alone prefills its whole prompt in one pass."""
    calls = []
    forward = random_model.forward
    monkeypatch.setattr(random_model, "forward", lambda steps: calls.append([len(s.token_ids) for s in steps])
                        or forward(steps))
    scheduler = Scheduler(random_model, prefill_chunk=16)
    r = scheduler.submit(list(range(3, 103)), max_new_tokens=3, ignore_eos=True)
    list(scheduler.run())
    assert calls == [[100], [1], [1]] and r.result.prefill_tokens == 100


def test_prefill_budget_is_shared_without_empty_chunks(random_model):
    """Two long prompts join a decoding sequence: each step gives them prefill_chunk tokens in all, first come first
    served (a request whose turn has no budget left waits), and every result equals its request run alone. Their
    lengths, 17 and 21, put chunk ends one token before a prompt's end (16 of 17): decoding starts after the last."""
    scheduler = Scheduler(random_model, prefill_chunk=8)
    first = scheduler.submit([1, 5, 9], max_new_tokens=20, ignore_eos=True)
    scheduler.step()
    late = [scheduler.submit(list(range(10 + k, 10 + k + n)), max_new_tokens=6, ignore_eos=True)
            for k, n in ((0, 17), (40, 21))]
    scheduler.step()
    assert [r.prefilled for r in late] == [8, 0]
    list(scheduler.run())
    for r in [first] + late:
        assert r.result.token_ids == random_model.generate(r.prompt_ids, max_new_tokens=r.state.options.max_new_tokens,
                                                           ignore_eos=True)


def test_max_active_holds_the_rest_back(random_model):
    scheduler = Scheduler(random_model, max_active=2)
    requests = [scheduler.submit([1, 2 + k, 3], max_new_tokens=4 + k, ignore_eos=True) for k in range(3)]
    scheduler.step()
    assert len(scheduler.active) == 2 and list(scheduler.waiting) == requests[2:]
    while scheduler.has_work:
        scheduler.step()
        assert len(scheduler.active) <= 2
    for k, r in enumerate(requests):
        assert r.result.token_ids == random_model.generate([1, 2 + k, 3], max_new_tokens=4 + k, ignore_eos=True)


@pytest.mark.usefixtures("always_draft")
def test_run_streams_every_accepted_draft_token(stories):
    """With speculative decoding a step may produce several tokens per request; run() yields them all, in order."""
    scheduler = Scheduler(stories)
    prompt = stories.prompt_ids(PASSAGE + " Repeat the story: " + PASSAGE[:40])
    r = scheduler.submit(prompt, max_new_tokens=40, speculate=6)
    streamed = [event.token_id for request, event in scheduler.run()]
    assert r.result.accepted_draft_tokens > 5  # several tokens per step happened
    assert streamed == r.result.token_ids == stories.generate(prompt, max_new_tokens=40)


def test_timings_measure_prefill_and_decode_apart(random_model, monkeypatch):
    """On a clock that only the model's forward passes move (1 s each): 1 s of prefill, 4 s for tokens 2-5."""
    from engine.generation import scheduler as scheduler_module

    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(scheduler_module, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    forward = random_model.forward

    def timed_forward(steps):
        clock.now += 1.0
        return forward(steps)

    monkeypatch.setattr(random_model, "forward", timed_forward)
    scheduler = Scheduler(random_model)
    r = scheduler.submit(list(range(3, 13)), max_new_tokens=5, ignore_eos=True)
    clock.now += 0.5  # queued for half a second before the first step
    list(scheduler.run())
    res = r.result
    assert (res.time_to_first_token, res.prefill_seconds, res.decode_seconds) == (1.5, 1.0, 4.0)
    assert (res.prompt_tokens_per_s, res.generated_tokens_per_s) == (10.0, 1.0)


# ---- a fault in one sequence's step ends that sequence alone (issue 34, defect 2) ----------------------------------
def test_a_sampler_that_raises_ends_its_sequence_alone(random_model):
    """One request's sampling raises mid-run (a constraint or sampler bug): it ends with the error, its neighbours
    in the same batched steps give exactly what they give alone."""
    scheduler = Scheduler(random_model)
    good = [scheduler.submit([1, 2 + k, 3], max_new_tokens=12, ignore_eos=True) for k in range(2)]
    bad = scheduler.submit([1, 9, 3], max_new_tokens=12, ignore_eos=True)
    accept = bad.state.accept
    calls = []

    def faulty(logits, context_length=None):
        calls.append(1)
        if len(calls) == 4:
            raise ValueError("a planted sampler bug")
        return accept(logits, context_length)

    bad.state.accept = faulty
    stepped = []
    while scheduler.has_work:
        stepped.append(scheduler.step())
    assert isinstance(bad.error, ValueError) and bad.finished and len(bad.result.token_ids) == 3
    assert any(bad in s for s in stepped)  # step() hands back the request it ended
    assert bad.cache is None and bad not in scheduler.active
    for k, r in enumerate(good):
        assert r.error is None and r.result.token_ids == random_model.generate([1, 2 + k, 3], max_new_tokens=12,
                                                                               ignore_eos=True)
    with pytest.raises(ValueError, match="planted"):
        list(bad)  # iterating the request re-raises what ended it


def test_a_forward_that_fails_for_one_sequence_ends_it_alone(random_model, monkeypatch):
    """The batched forward raises whenever one sequence's cache is in it: each sequence is rerun alone from where
    its cache stood, the faulty one ends, the others' tokens are exactly their solo run's."""
    scheduler = Scheduler(random_model, prefill_chunk=8)
    prompts = [[1, 5, 9], list(range(10, 40)), [1, 7]]
    requests = [scheduler.submit(p, max_new_tokens=10, ignore_eos=True) for p in prompts]
    bad = scheduler.submit([1, 4, 4], max_new_tokens=10, ignore_eos=True)
    forward = random_model.forward

    def faulty(steps):
        if len(bad.state.generated) >= 2 and any(s.cache is bad.cache for s in steps):
            raise MemoryError("a planted fault")
        return forward(steps)

    monkeypatch.setattr(random_model, "forward", faulty)
    list(scheduler.run())
    monkeypatch.undo()
    assert isinstance(bad.error, MemoryError) and len(bad.result.token_ids) == 2
    for p, r in zip(prompts, requests):
        assert r.error is None and r.result.token_ids == random_model.generate(p, max_new_tokens=10, ignore_eos=True)


def test_generate_batch_raises_what_ended_a_sequence(random_model, monkeypatch):
    from engine.generation import generate as generate_module
    from engine.generation.state import SequenceState

    accept = SequenceState.accept

    def faulty(self, logits, context_length=None):
        if self.prompt_ids == [1, 8]:
            raise RuntimeError("planted")
        return accept(self, logits, context_length)

    monkeypatch.setattr(SequenceState, "accept", faulty)
    with pytest.raises(RuntimeError, match="planted"):
        generate_module.generate_batch(random_model, [[1, 2], [1, 8]], max_new_tokens=3)


# ---- n > 1: each choice takes a place in the batch (issue 34, defects 4 and 9) ----------------------------------
def test_forks_count_toward_max_active(random_model):
    scheduler = Scheduler(random_model, max_active=4)
    first = scheduler.submit([1, 2, 3], max_new_tokens=6, ignore_eos=True)
    leader = scheduler.submit([1, 5, 6, 7], max_new_tokens=5, ignore_eos=True)
    forks = [scheduler.fork(leader, max_new_tokens=5, ignore_eos=True, temperature=1.0, seed=k) for k in range(2)]
    late = scheduler.submit([1, 9], max_new_tokens=4, ignore_eos=True)
    with pytest.raises(EngineError, match="at most 4 sequences"):
        for k in range(2):  # 1 + 2 forks fit; a fourth choice of the same prompt would too, a fifth never
            forks.append(scheduler.fork(leader, max_new_tokens=5, ignore_eos=True, temperature=1.0, seed=9 + k))
    assert len(forks) == 3
    most = 0
    while scheduler.has_work:
        scheduler.step()
        most = max(most, len(scheduler.active))
        if not first.finished and not leader.finished:
            assert late.status == "waiting"  # 1 + 4 places are taken: it waits its turn
    assert most == 4
    assert late.result.token_ids == random_model.generate([1, 9], max_new_tokens=4, ignore_eos=True)
    assert all(len(f.result.token_ids) == 5 for f in forks)


def test_prefill_share_holds_prompt_chunks_to_a_share_of_a_decode_step(random_model, monkeypatch):
    """On a clock the forwards move (a decode-only step 1 s, each prompt token 1/16 s more): with prefill_share 2 a
    late prompt is taken 32 tokens a step (2 s of prompt beside a 1 s step), not prefill_chunk's 48; the tokens are
    those of a run without it."""
    from engine.generation import scheduler as scheduler_module

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(scheduler_module, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    forward = random_model.forward
    chunks = []

    def timed_forward(steps):
        prompt = sum(len(s.token_ids) for s in steps if len(s.token_ids) > 1)
        chunks.append(prompt)
        clock.now += 1.0 + prompt / 16
        return forward(steps)

    monkeypatch.setattr(random_model, "forward", timed_forward)
    scheduler = Scheduler(random_model, prefill_chunk=48, prefill_share=2.0)
    first = scheduler.submit([1, 5, 9], max_new_tokens=40, ignore_eos=True)
    for _ in range(3):
        scheduler.step()
    late = scheduler.submit(list(range(10, 130)), max_new_tokens=4, ignore_eos=True)  # 120 tokens
    while late.status != "decoding":
        scheduler.step()
    # the first chunk before a prompt token's cost is known: prefill_chunk; then 2 s / (1/16 s) = 32 a step
    assert chunks[-4:] == [48, 32, 32, 8] and scheduler.prefill_budget() == 32
    monkeypatch.undo()
    list(scheduler.run())
    assert late.result.token_ids == random_model.generate(list(range(10, 130)), max_new_tokens=4, ignore_eos=True)
    assert first.result.token_ids == random_model.generate([1, 5, 9], max_new_tokens=40, ignore_eos=True)
    with pytest.raises(EngineError, match="prefill_share"):
        Scheduler(random_model, prefill_share=0)
