"""The prefix cache: blocks hold exactly the K/V a prefill computes, a request that starts from them gives the same
tokens and log-probabilities as one that prefills its whole prompt (bit for bit on the avx512 kernels, within float
tolerance on the others), eviction is least-recently-used and bounded, and forks (n > 1) share one prefill."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.generation.scheduler import Scheduler
from engine.runtime import native
from engine.runtime.batch import SequenceStep
from engine.runtime.prefix_cache import PrefixCache

B = 16  # block tokens in these tests


@pytest.fixture(scope="module")
def stories(stories260k):
    return engine.load_model(str(stories260k))


@pytest.fixture(params=["avx512", "avx2", "portable"])
def isa(request):
    """Each kernel variant this CPU can run, switched in this process (restored afterwards)."""
    if not native.status().available or request.param not in native.usable_isas():
        pytest.skip(f"the {request.param} kernels cannot run here")
    before = native.usable_isas()[0] if native.status().isa is None else native.status().isa
    native.set_isa(request.param)
    yield request.param
    native.set_isa(before)


def prefilled(model, ids):
    cache = model.new_cache()
    model.forward([SequenceStep(cache, ids)])
    return cache


def ids_of(rng, n):
    return [1] + rng.integers(3, 500, size=n - 1).tolist()


def test_restore_copies_exactly_the_stored_blocks_and_never_the_last_token(stories):
    rng = np.random.default_rng(0)
    ids = ids_of(rng, 53)
    pool = PrefixCache.for_model(stories, 10 ** 8, block_tokens=B)
    source = prefilled(stories, ids)
    assert pool.store(source, ids) == 3 and pool.blocks == 3 and pool.nbytes == 3 * pool.block_nbytes
    fresh = stories.new_cache()
    assert pool.restore(fresh, ids) == 48 and fresh.length == 48
    np.testing.assert_array_equal(fresh.k[:, :, :48], source.k[:, :, :48])
    np.testing.assert_array_equal(fresh.v[:, :, :48], source.v[:, :, :48])
    # a prompt that is exactly the cached blocks still leaves its last token to prefill
    assert pool.restore(stories.new_cache(), ids[:48]) == 32 and pool.cached_length(ids[:49]) == 48
    # a prompt that diverges inside block 2 gets block 1 only; one that differs at token 0 nothing
    other = ids[:20] + [7] * 30
    assert pool.restore(stories.new_cache(), other) == 16
    assert pool.restore(stories.new_cache(), [2] + ids[1:]) == 0
    assert pool.hit_tokens == 48 + 32 + 16


def test_blocks_are_read_only_for_the_sequences_that_restore_them(stories):
    rng = np.random.default_rng(1)
    ids = ids_of(rng, 40)
    pool = PrefixCache.for_model(stories, 10 ** 8, block_tokens=B)
    source = prefilled(stories, ids)
    pool.store(source, ids)
    first = stories.new_cache()
    pool.restore(first, ids)
    first.k[:] = 0.0  # a sequence scribbling over its own copy ...
    first.v[:] = 0.0
    second = stories.new_cache()
    pool.restore(second, ids)  # ... does not reach the pool
    np.testing.assert_array_equal(second.k[:, :, :32], source.k[:, :, :32])


def test_eviction_is_lru_leaves_first_and_bounded(stories):
    rng = np.random.default_rng(2)
    a, b = ids_of(rng, 40), ids_of(rng, 40)
    probe = PrefixCache.for_model(stories, 1, block_tokens=B)
    pool = PrefixCache.for_model(stories, 3 * probe.block_nbytes, block_tokens=B)
    assert pool.max_blocks == 3
    pool.store(prefilled(stories, a), a)  # a1, a2
    pool.store(prefilled(stories, b), b)  # b1, then b2 evicts a's leaf a2 (a1, the prefix, is more recent)
    assert pool.blocks == 3 and pool.evictions == 1 and pool.nbytes <= pool.max_bytes
    assert pool.cached_length(a) == 16 and pool.cached_length(b) == 32
    pool.restore(stories.new_cache(), a)  # a1 becomes the most recent
    c = ids_of(rng, 40)
    pool.store(prefilled(stories, c), c)  # c1 evicts b2, c2 then evicts b1
    assert pool.cached_length(a) == 16 and pool.cached_length(b) == 0 and pool.cached_length(c) == 32
    assert pool.evictions == 3
    # a pool of one block never evicts the prefix of the sequence it is storing
    tiny = PrefixCache.for_model(stories, probe.block_nbytes, block_tokens=B)
    assert tiny.store(prefilled(stories, a), a) == 1 and tiny.cached_length(a) == 16
    # an evicted block takes the blocks that continue it along (they could no longer be found)
    pool = PrefixCache.for_model(stories, 3 * probe.block_nbytes, block_tokens=B)
    pool.store(prefilled(stories, a[:33]), a[:33])
    pool._drop(pool._chain(a, 16)[0])
    assert pool.blocks == 0 and pool.evictions == 2
    assert PrefixCache.for_model(stories, 0).store(prefilled(stories, a), a) == 0  # size 0: stores nothing


def run_scheduler(model, prompts, prefix_cache, together: bool, **options):
    """Each prompt through a Scheduler (all submitted at once when `together`, else one after another)."""
    scheduler = Scheduler(model, prefill_chunk=24, prefix_cache=prefix_cache)
    requests = []
    for p in prompts:
        requests.append(scheduler.submit(p, logprobs=3, **options))
        if not together:
            for _ in requests[-1]:
                pass
    for _ in scheduler.run():
        pass
    return [r.result for r in requests]


def assert_same_results(cached, plain, exact: bool):
    for c, p in zip(cached, plain):
        assert c.token_ids == p.token_ids and c.text == p.text
        got = [(x.logprob, x.top) for x in c.logprobs]
        want = [(x.logprob, x.top) for x in p.logprobs]
        if exact:
            assert got == want
        else:
            np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=0, atol=1e-4)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=7)])
def test_a_scheduler_with_a_prefix_cache_gives_the_same_tokens_and_logprobs(stories, isa, sampling):
    rng = np.random.default_rng(3)
    system = ids_of(rng, 70)
    turns = [system + rng.integers(3, 500, size=k).tolist() for k in (9, 30, 1)]
    prompts = turns + [turns[1][:50], turns[0]]  # a strict prefix of a cached prompt; a prompt cached whole
    options = dict(max_new_tokens=12, ignore_eos=True, **sampling)
    plain = run_scheduler(stories, prompts, None, together=False, **options)
    pool = PrefixCache.for_model(stories, 10 ** 8, block_tokens=B)
    sequential = run_scheduler(stories, prompts, pool, together=False, **options)
    assert_same_results(sequential, plain, exact=isa == "avx512")
    assert [r.cached_tokens for r in sequential] == [0, 64, 64, 48, 64]  # the repeated prompt: 64 of 79, by block
    busy = run_scheduler(stories, prompts, pool, together=True, **options)  # all in one batch, chunked prefills
    assert_same_results(busy, plain, exact=isa == "avx512")
    assert all(r.cached_tokens >= 48 for r in busy)
    for r, p in zip(sequential + busy, prompts + prompts):
        assert r.cached_tokens + r.prefill_tokens == len(p) and r.prefill_tokens >= 1


def test_running_sequences_share_their_prompt_blocks(stories):
    """A request admitted while another decodes starts from the blocks of that one's prompt."""
    rng = np.random.default_rng(4)
    system = ids_of(rng, 40)
    pool = PrefixCache.for_model(stories, 10 ** 8, block_tokens=B)
    scheduler = Scheduler(stories, prefix_cache=pool)
    first = scheduler.submit(system + [5, 6], max_new_tokens=30, ignore_eos=True)
    scheduler.step()  # first's prefill: its prompt's blocks are stored now
    second = scheduler.submit(system + [9], max_new_tokens=5, ignore_eos=True)
    for _ in scheduler.run():
        pass
    assert not first.finished or first.result.cached_tokens == 0
    assert second.result.cached_tokens == 32
    assert second.result.token_ids == stories.generate(system + [9], max_new_tokens=5, ignore_eos=True)


def test_forks_share_one_prefill_and_sample_with_their_own_seeds(stories):
    rng = np.random.default_rng(5)
    prompt = ids_of(rng, 45)
    options = dict(max_new_tokens=10, ignore_eos=True, temperature=1.0)
    scheduler = Scheduler(stories)
    leader = scheduler.submit(prompt, seed=100, **options)
    forks = [scheduler.fork(leader, seed=100 + i, **options) for i in (1, 2)]
    for _ in scheduler.run():
        pass
    results = [leader.result] + [f.result for f in forks]
    assert [r.prefill_tokens for r in results] == [45, 0, 0]  # one prefill
    for i, r in enumerate(results):
        alone = Scheduler(stories).submit(prompt, seed=100 + i, **options)
        for _ in alone:
            pass
        assert r.token_ids == alone.result.token_ids
    assert len({tuple(r.token_ids) for r in results}) == 3


def test_a_fork_outlives_a_leader_cancelled_before_its_prefill(stories):
    prompt = [1] + list(range(10, 40))
    scheduler = Scheduler(stories)
    leader = scheduler.submit(prompt, max_new_tokens=6, ignore_eos=True, temperature=0.0)
    dropped = scheduler.fork(leader, max_new_tokens=6, ignore_eos=True, temperature=0.0)
    kept = scheduler.fork(leader, max_new_tokens=6, ignore_eos=True, temperature=0.0)
    dropped.cancel()
    leader.cancel()
    for _ in scheduler.run():
        pass
    assert leader.result.stop_reason == dropped.result.stop_reason == "cancelled"
    assert kept.result.token_ids == stories.generate(prompt, max_new_tokens=6, ignore_eos=True)
    assert kept.result.prefill_tokens == len(prompt)


# ---- issue 34: reuse-weighted eviction (defect 18) and partitions by salt (defect 10) ------------------------------
def test_a_flood_of_blocks_nobody_asks_for_again_never_evicts_a_shared_prefix(stories):
    """A system prompt restored once is protected: 10 sequences of unique junk (30 blocks through a pool of 8) churn
    the blocks nobody re-used, and the shared prefix is still found afterwards, on the protected segment's terms."""
    rng = np.random.default_rng(6)
    probe = PrefixCache.for_model(stories, 1, block_tokens=B)
    pool = PrefixCache.for_model(stories, 8 * probe.block_nbytes, block_tokens=B)
    system = ids_of(rng, 33)
    pool.store(prefilled(stories, system), system)
    assert pool.restore(stories.new_cache(), system) == 32 and pool.protected_blocks == 2
    for _ in range(10):
        junk = ids_of(rng, 49)
        assert pool.store(prefilled(stories, junk), junk) == 3
        assert pool.blocks <= 8
    assert pool.cached_length(system) == 32
    assert pool.evictions == 30 - 6  # every block evicted was junk: 6 junk blocks fit beside the system prompt
    # the protected segment is bounded: most of the pool stays open to new blocks
    assert pool.max_protected == 6
    for _ in range(5):
        shared = ids_of(rng, 33)
        pool.store(prefilled(stories, shared), shared)
        pool.restore(stories.new_cache(), shared)
    assert pool.protected_blocks == 6 and pool.blocks <= 8


def test_salted_blocks_are_found_only_with_the_same_salt(stories):
    rng = np.random.default_rng(7)
    ids = ids_of(rng, 40)
    pool = PrefixCache.for_model(stories, 10 ** 8, block_tokens=B)
    source = prefilled(stories, ids)
    assert pool.store(source, ids, salt=("key", 1)) == 2
    assert pool.cached_length(ids) == 0 and pool.cached_length(ids, salt=("key", 2)) == 0
    assert pool.restore(stories.new_cache(), ids) == 0 and pool.restore(stories.new_cache(), ids, salt="x") == 0
    assert pool.restore(stories.new_cache(), ids, salt=("key", 1)) == 32
    assert pool.store(source, ids) == 2 and pool.blocks == 4  # the same tokens without a salt: blocks of their own
    assert pool.restore(stories.new_cache(), ids) == 32


def test_forks_store_their_prompt_and_not_their_sampled_continuations(stories):
    rng = np.random.default_rng(8)
    prompt = ids_of(rng, 40)
    pool = PrefixCache.for_model(stories, 10 ** 8, block_tokens=B)
    scheduler = Scheduler(stories, prefix_cache=pool)
    options = dict(max_new_tokens=40, ignore_eos=True, temperature=1.0)
    leader = scheduler.submit(prompt, seed=1, cache_salt="client", **options)
    forks = [scheduler.fork(leader, seed=1 + i, **options) for i in (1, 2, 3)]
    for _ in scheduler.run():
        pass
    assert all(len(r.result.token_ids) == 40 for r in [leader] + forks)
    assert pool.blocks == 2 and pool.cached_length(prompt + [5], salt="client") == 32
    single = scheduler.submit(prompt, seed=1, cache_salt="client", **options)  # one choice: its reply is kept
    for _ in single:
        pass
    assert single.result.cached_tokens == 32 and pool.blocks == (40 + 40 - 1) // B
