"""Continuous batching: many sequences, each with its own cache and sampling, through one forward per step.

Every step stacks the next tokens of all decoding sequences (plus, for speculative decoding, their draft tokens)
and a budget of prompt tokens from sequences still prefilling, so a new request joins without stalling the
others; a finished sequence leaves at once and its cache is freed (unless the caller keeps it, as chat does).

With a PrefixCache (engine.runtime.prefix_cache), a request admitted to the batch starts from the longest cached
prefix of its prompt and prefills only the rest; its prompt's blocks are stored when its prefill ends (so requests
running at the same time share them) and the rest of its blocks when it finishes. `fork` adds more continuations
of one prompt (OpenAI's n): they wait for the first one's prefill and start from a copy of its cache and its last
prompt token's logits, each with its own sampling state. A request and its forks are admitted together and count
as that many of `max_active` (n > max_active can never run: `fork` refuses it). Only a request without forks hands
its generated tokens to the prefix cache: n sampled continuations are rarely anyone's next prompt, and would push
shared prefixes out.

With `prefill_share`, the prompt tokens a step takes beside decoding sequences are also held to about that share
of a decode-only step's time (from the measured time of recent steps: a decode-only step, and a prompt token), at
least MIN_PREFILL_TOKENS: a flood of new prompts then makes a step at most about 1 + share times a decode step,
whoever sends them, instead of one chunk of up to prefill_chunk tokens every step.

A fault in one sequence's part of a step (its draft, its constraint's mask, its sampling, even its rows of a batched
forward that fails) ends that sequence alone: it finishes with `error` set (the exception, logged with its
traceback), and the other sequences of the batch go on as if it had never been there.

A request whose options ask for prompt_logprobs prefills with logits at every position and scores each chunk as it
runs (engine.generation.scoring), in the same batched forwards as everyone else; it prefills its whole prompt (no
prefix-cache restore: the skipped positions would have no logits). Its first TokenEvent and its result carry the
scores; with max_new_tokens=0 it ends when its prefill does, having generated nothing.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from engine.runtime.batch import SequenceStep
from engine.errors import EngineError
from engine.generation.scoring import PromptScorer
from engine.generation.state import (STOP_MAX_TOKENS, GenerationOptions, GenerationResult, SequenceState,
                                     check_prompt, default_options)
from engine.generation.speculative import LOOKUP, DraftModel, check_draft, prompt_lookup_draft, split_draft
from engine.generation.draft_payoff import CostTable, DraftPayoff, lookup_source
from engine.generation.constraints import MaskBatch

WAITING, PREFILLING, DECODING, FINISHED = "waiting", "prefilling", "decoding", "finished"
MIN_PREFILL_TOKENS = 16  # the fewest prompt tokens a step takes beside decoding sequences under prefill_share
TIME_WEIGHT = 0.2  # the weight of the latest step in the running averages of step times
log = logging.getLogger(__name__)


@dataclass
class Request:
    """One sequence in the scheduler: its cache, generation state, queued events, and timings."""

    id: int
    prompt_ids: list[int]
    state: SequenceState
    cache: object
    speculate: int = 0  # most draft tokens per step; 0: plain decoding
    payoff: DraftPayoff | None = None  # with speculate: each step's draft length, 0 where drafting does not pay
    drafter: DraftModel | None = None  # a draft model proposing tokens (None: prompt lookup only)
    draft_cache: object = None  # the draft model's KV cache for this sequence: a prefix of its context
    lookup_first: bool = False  # with a draft model: use a prompt-lookup match when there is one (no draft forwards)
    draft_from: int | None = None  # this step's model draft: context length it was drafted after (None: lookup)
    proposal: object = None  # this step's model draft (speculative.Proposal)
    keep_cache: bool = False
    status: str = WAITING
    prefilled: int = 0  # prompt tokens in the cache
    prefill_tokens: int = 0  # prompt tokens this request ran through the model (excludes a re-used prefix)
    events: deque = field(default_factory=deque)
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    t_submit: float = 0.0
    t_start: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0
    scheduler: "Scheduler | None" = None
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache (or a forked sibling's prefill)
    leader: "Request | None" = field(default=None, repr=False)  # a fork: the request whose prefill it waits for
    followers: list = field(default_factory=list, repr=False)  # forks waiting for this request's prefill
    cache_salt: object = None  # prefix cache partition (hashable): only requests with an equal salt share blocks
    store_reply: bool = True  # hand the generated tokens to the prefix cache at the end (not for n > 1 choices)
    error: BaseException | None = None  # what ended this request when a fault in its own step did
    scorer: PromptScorer | None = field(default=None, repr=False)  # the prompt's log-probabilities, when asked

    @property
    def finished(self) -> bool:
        """Whether the request's status is FINISHED."""
        return self.status == FINISHED

    def __iter__(self):
        """This request's TokenEvents as they are produced, driving the scheduler as needed; re-raises the
        exception that ended it, if a fault in its step did."""
        while True:
            while self.events:
                yield self.events.popleft()
            if self.finished:
                if self.error is not None:
                    raise self.error
                return
            self.scheduler.step()

    @property
    def slots(self) -> int:
        """Places in the batch this request takes with the forks waiting for its prefill."""
        return 1 + len(self.followers)

    def cancel(self) -> None:
        """Stop this request now (stop reason 'cancelled'); the others go on."""
        self.scheduler.finish(self, cancelled=True)

    @property
    def result(self) -> GenerationResult:
        """A GenerationResult of the request so far (stop_reason None while it runs), with its timings."""
        s = self.state
        return GenerationResult(
            token_ids=list(s.generated), text=s.text, stop_reason=s.stop_reason, prompt_token_ids=self.prompt_ids,
            prefill_tokens=self.prefill_tokens, prefill_seconds=max(0.0, self.t_first - self.t_start),
            time_to_first_token=max(0.0, self.t_first - self.t_submit), decode_seconds=max(0.0, self.t_last - self.t_first),
            draft_tokens=self.draft_tokens, accepted_draft_tokens=self.accepted_draft_tokens,
            draft_steps=self.payoff.draft_steps if self.payoff else 0,
            plain_steps=self.payoff.plain_steps if self.payoff else 0,
            logprobs=None if s.logprobs is None else list(s.logprobs), cached_tokens=self.cached_tokens,
            prompt_logprobs=None if self.scorer is None else list(self.scorer.entries),
        )


class Scheduler:
    """Runs submitted requests to completion, one batched forward per `step()`.

    prefill_chunk: prompt tokens per step while other sequences are decoding (a lone sequence prefills its whole
    prompt in one pass). max_active: sequences in flight at once; more requests wait their turn. prefix_cache: a
    PrefixCache shared by the requests (None: every prompt is prefilled whole). prefill_share: hold the prompt
    tokens of a step beside decoding sequences to about this share of a decode step's time (None: prefill_chunk
    alone bounds them; see the module docstring).
    """

    def __init__(self, model, prefill_chunk: int = 256, max_active: int = 64, prefix_cache=None,
                 prefill_share: float | None = None):
        if prefill_chunk < 1 or max_active < 1:
            raise EngineError("prefill_chunk and max_active must be >= 1")
        if prefill_share is not None and not prefill_share > 0:
            raise EngineError(f"prefill_share must be > 0, got {prefill_share}")
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.prefill_share = prefill_share
        self.decode_seconds: float | None = None  # running average of a decode-only forward's time
        self.prompt_token_seconds: float | None = None  # running average of a prompt token's share of a forward
        self.max_active = max_active
        self.prefix_cache = prefix_cache
        self.overlap_masks = True  # constrained sequences: compute the step's token masks while the forward runs
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self._ids = itertools.count()
        self._drafters: dict = {}
        self._failed: list[Request] = []  # ended by a fault during this step: returned by step() with the others

    def submit(self, prompt_ids, options: GenerationOptions | None = None, cache=None, speculate: int = 0,
               keep_cache: bool = False, truncate: bool = False, draft=LOOKUP, draft_cache=None,
               cache_salt=None, **overrides) -> Request:
        """Queue a request; bad parameters raise EngineError here, for this request only.

        `cache` may already hold a prefix of prompt_ids (a conversation's cache): only the rest is prefilled.
        speculate: most draft tokens per step (0: plain decoding); draft: where they come from: "lookup" (the context
        itself), "int8" / "int4" (the model's own quantized copy, loaded on first use and shared by every request),
        "int8+lookup" / "int4+lookup" (a prompt-lookup match when there is one, the quantized copy otherwise), or a
        loaded model over the same vocabulary. draft_cache: the draft model's cache kept by the caller (a
        conversation's, like `cache`), holding a prefix of prompt_ids; None: a new one. cache_salt: the prefix cache
        partition of this request (any hashable; None: the shared one), so one client never finds another's prompts.
        """
        options = options if options is not None else default_options(self.model, **overrides)
        if isinstance(speculate, bool) or not isinstance(speculate, int) or speculate < 0:
            raise EngineError(f"speculate must be an integer >= 0, got {speculate!r}")
        check_draft(draft)
        ids = check_prompt(self.model, prompt_ids, truncate, options.max_new_tokens)
        cache = cache if cache is not None else self.model.new_cache()
        if cache.length >= len(ids):
            raise EngineError("the cache already holds the whole prompt: nothing to prefill")
        if options.prompt_logprobs is not None and cache.length:
            raise EngineError("scoring a prompt (prompt_logprobs) needs it prefilled whole, from an empty cache")
        state = SequenceState(self.model, ids, options, cache)
        draft, lookup_first = split_draft(draft)
        drafter = self.drafter(draft) if speculate and draft != LOOKUP else None
        request = Request(next(self._ids), ids, state, cache, speculate=speculate,
                          payoff=self._payoff(speculate, drafter), drafter=drafter,
                          draft_cache=self._draft_cache(drafter, draft_cache, ids), lookup_first=lookup_first,
                          cache_salt=cache_salt,
                          keep_cache=keep_cache, prefilled=cache.length, t_submit=time.perf_counter(), scheduler=self)
        if options.prompt_logprobs is not None:
            request.scorer = PromptScorer(ids, options.prompt_logprobs)
        self.waiting.append(request)
        return request

    def drafter(self, draft) -> DraftModel:
        """The DraftModel for `draft` ("int8", "int4", ... or a loaded model), one per draft model (kept across
        schedulers), so the draft forwards of every request using it are batched; a named kind is loaded by the model
        on first use."""
        key = draft if isinstance(draft, str) else id(draft)
        if key not in self._drafters:
            model = self.model.draft_model(draft) if isinstance(draft, str) else draft
            c, d = self.model.config, model.config
            if d.vocab_size != c.vocab_size or d.max_position_embeddings < c.max_position_embeddings:
                raise EngineError(f"the draft model's vocabulary ({d.vocab_size}) and window "
                                  f"({d.max_position_embeddings}) must match the model's ({c.vocab_size}, "
                                  f"{c.max_position_embeddings})")
            self._drafters[key] = DraftModel.of(model)
        return self._drafters[key]

    def _payoff(self, speculate: int, drafter: DraftModel | None) -> DraftPayoff | None:
        """A new request's payoff estimate (None without speculation): this model's measured forward costs, the
        draft model's (none for prompt lookup) and the draft source's long-run acceptance as its prior."""
        if not speculate:
            return None
        if drafter is None:
            return DraftPayoff(speculate, CostTable.of(self.model), None, lookup_source(self.model))
        return DraftPayoff(speculate, CostTable.of(self.model), drafter.costs, drafter.source)

    @staticmethod
    def _draft_cache(drafter: DraftModel | None, given, ids: list[int]):
        """The draft cache of a new request: the caller's (which must hold less than the prompt), or a new one."""
        if drafter is None:
            return None
        if given is None:
            return drafter.new_cache()
        if given.length >= len(ids):
            raise EngineError("the draft cache must hold a prefix of the prompt, not all of it")
        return given
    def fork(self, request: Request, options: GenerationOptions | None = None, **overrides) -> Request:
        """Another continuation of `request`'s prompt that shares its prefill (OpenAI's n > 1).

        The fork waits until `request` has prefilled its prompt, then starts from a copy of its cache and samples
        its first token from the same logits with its own options (its own seed): one prefill for all of them.
        `request` must not have started decoding yet. If `request` ends before its prefill does, the first of its
        forks prefills in its place. The request and its forks enter the batch together, each taking a place of
        `max_active`: EngineError when they would be more than max_active.
        """
        if request.status not in (WAITING, PREFILLING) or request.leader is not None:
            raise EngineError("fork a request that has not started decoding (and is not a fork itself)")
        if request.slots + 1 > self.max_active:
            raise EngineError(f"{request.slots + 1} continuations of one prompt cannot run together: at most "
                              f"{self.max_active} sequences run at once")
        options = options if options is not None else default_options(self.model, **overrides)
        state = SequenceState(self.model, request.prompt_ids, options, None)
        fork = Request(next(self._ids), request.prompt_ids, state, None, speculate=request.speculate,
                       payoff=self._payoff(request.speculate, request.drafter), drafter=request.drafter,
                       draft_cache=self._draft_cache(request.drafter, None, request.prompt_ids),
                       lookup_first=request.lookup_first, t_submit=time.perf_counter(), scheduler=self,
                       leader=request, cache_salt=request.cache_salt, store_reply=False)
        request.followers.append(fork)
        request.store_reply = False
        return fork

    @property
    def has_work(self) -> bool:
        """Whether any request is still waiting or active."""
        return bool(self.waiting or self.active)

    def run(self):
        """Step until every request is finished, yielding (request, TokenEvent) as tokens are produced."""
        while self.has_work:
            for request in self.step():  # finished ones too: their last token is queued in this step
                while request.events:
                    yield request, request.events.popleft()

    def finish(self, request: Request, cancelled: bool = False, reusable: bool = True) -> None:
        """Take a request out of the batch; its cache is dropped unless the caller keeps it.

        With a prefix cache its full blocks are stored first, unless `reusable` is False (a step that failed may
        have left the cache half-written)."""
        if request.finished:
            return
        if cancelled:
            request.state.cancel()
        was_prefilling = request.status in (WAITING, PREFILLING)
        request.status = FINISHED
        if request.leader is not None:  # a fork that never started
            request.leader.followers.remove(request)
            request.leader = None
        elif was_prefilling and request.followers:
            self._promote(request.followers)
        request.followers = []
        if reusable and request.cache is not None and self.prefix_cache is not None:
            held = request.prompt_ids + (request.state.generated if request.store_reply else [])
            self._store(request, held[: request.cache.length])
        if request in self.active:
            self.active.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        request.draft_cache = None
        if not request.keep_cache:
            request.cache = None
            request.state.cache = None

    def _promote(self, forks: list[Request]) -> None:
        """The leader of `forks` ended before its prefill did: the first fork prefills for the rest."""
        head, rest = forks[0], forks[1:]
        head.leader, head.followers = None, rest
        for f in rest:
            f.leader = head
        head.cache = self.model.new_cache()
        head.state.cache = head.cache
        self.waiting.appendleft(head)

    def _store(self, request: Request, token_ids: list[int]) -> None:
        """Hand the request's cached blocks of `token_ids` to the prefix cache (a failure there is logged: the
        request's own result does not depend on it)."""
        try:
            self.prefix_cache.store(request.cache, token_ids, salt=request.cache_salt)
        except Exception:  # noqa: BLE001 - an engine bug, not the request's: it goes on without the blocks
            log.exception("storing request %d's blocks in the prefix cache failed", request.id)

    @property
    def occupied(self) -> int:
        """Places in the batch taken: active sequences and the forks waiting for their leader's prefill."""
        return sum(r.slots for r in self.active)

    def _admit(self, request: Request) -> None:
        request.status = PREFILLING
        request.t_start = time.perf_counter()
        if self.prefix_cache is not None and request.cache.length == 0 and request.scorer is None:
            request.cached_tokens = self.prefix_cache.restore(request.cache, request.prompt_ids,
                                                              salt=request.cache_salt)
            request.prefilled = request.cache.length
        self.active.append(request)

    def _fail(self, request: Request, error: BaseException) -> None:
        """End `request` alone after a fault in its part of the step: logged with its traceback, `error` kept on
        it, its cache not handed to the prefix cache. Forks still waiting for its prefill share its prompt: they
        end with the same error."""
        if request.finished:
            return
        log.error("request %d failed in its step; the rest of the batch goes on", request.id,
                  exc_info=(type(error), error, error.__traceback__))
        waiting_forks = list(request.followers) if request.status in (WAITING, PREFILLING) else []
        request.followers = []
        for r in [request] + waiting_forks:
            r.leader = None
            r.error = error
            self.finish(r, cancelled=True, reusable=False)
            self._failed.append(r)

    def _start_forks(self, r: Request, logits, now: float) -> list[Request]:
        """`r` has prefilled its prompt: each fork waiting for it gets a copy of its cache and samples from
        `logits` (the last prompt token's row) -> the forks started."""
        started = []
        for f in r.followers:
            f.leader = None
            f.prefilled = len(f.prompt_ids)
            f.cached_tokens = r.cached_tokens
            f.status = DECODING
            f.t_start = r.t_start
            f.scorer = r.scorer
            self.active.append(f)
            started.append(f)
            try:
                f.cache = self.model.new_cache()
                f.cache.copy_prefix_from(r.cache, r.cache.length)
                f.state.cache = f.cache
                self._accept(f, logits, [], now)
            except Exception as error:  # noqa: BLE001 - this choice's fault: it ends alone
                self._fail(f, error)
        r.followers = []
        return started

    def step(self) -> list[Request]:
        """One batched forward over every active sequence's next tokens (and a chunk of waiting prompts).

        Returns the requests that took part (each may have new events queued, and may have finished), and those
        a fault in their own part of the step ended (`error` set).
        """
        self._failed = []
        while self.waiting and self.occupied + self.waiting[0].slots <= self.max_active:
            self._admit(self.waiting.popleft())  # in order: a request with forks is never passed by smaller ones
        if not self.active:
            return []
        decoding = [r for r in self.active if r.status == DECODING]
        budget = self.prefill_budget() if decoding else None  # a lone prefill runs whole
        plan: list[tuple[Request, list[int], list[int]]] = []  # (request, tokens fed, draft part)
        prefill_rows = sum(len(r.prompt_ids) - r.prefilled for r in self.active if r.status == PREFILLING)
        drafts = self._drafts(decoding, len(decoding) + (prefill_rows if budget is None else min(prefill_rows, budget)))
        for r in list(self.active):
            if r.finished:  # a fault in its draft ended it
                continue
            if r.status == DECODING:
                try:
                    draft = self._checked_draft(r, drafts.get(r.id, []))
                except Exception as error:  # noqa: BLE001 - this sequence's fault: it ends alone
                    self._fail(r, error)
                    continue
                plan.append((r, [r.state.generated[-1]] + draft, draft))
            elif budget is None or budget > 0:
                todo = r.prompt_ids[r.prefilled:]
                chunk = todo if budget is None else todo[:budget]
                if budget is not None:
                    budget -= len(chunk)
                plan.append((r, chunk, []))
        masks = self._masks(plan)
        outputs = self._forward(plan)
        try:
            masks.wait()
        except Exception:  # noqa: BLE001 - each sequence computes its own mask when it samples: faults end it alone
            log.exception("the batched mask computation failed; each constrained sequence computes its own")
            for r, _, _ in plan:
                if r.state.constraint is not None and not r.finished:
                    r.state.constraint.plan([])
        now = time.perf_counter()
        stepped = []
        for (r, tokens, draft), logits in zip(plan, outputs):
            if r.finished:  # its forward failed (or a fault ended it meanwhile)
                continue
            stepped.append(r)
            try:
                if r.status == PREFILLING:
                    if r.scorer is not None:  # every row of the chunk: score it, keep the last for sampling
                        r.scorer.add(r.prefilled, logits)
                        logits = logits[-1:]
                    r.prefilled += len(tokens)
                    r.prefill_tokens += len(tokens)
                    if r.prefilled < len(r.prompt_ids):
                        continue
                    r.status = DECODING
                    if self.prefix_cache is not None:
                        self._store(r, r.prompt_ids)
                    if r.followers:
                        stepped += self._start_forks(r, logits, now)
                self._accept(r, logits, draft, now)
            except Exception as error:  # noqa: BLE001 - this sequence's fault: it ends alone
                self._fail(r, error)
        return stepped + [r for r in self._failed if r not in stepped]

    def prefill_budget(self) -> int:
        """Prompt tokens this step may take beside decoding sequences: prefill_chunk, and with prefill_share no more
        than fit that share of a decode step's time (at least MIN_PREFILL_TOKENS)."""
        if self.prefill_share is None or not self.decode_seconds or not self.prompt_token_seconds:
            return self.prefill_chunk
        fits = int(self.prefill_share * self.decode_seconds / self.prompt_token_seconds)
        return max(min(MIN_PREFILL_TOKENS, self.prefill_chunk), min(self.prefill_chunk, fits))

    def _time_step(self, plan, seconds: float) -> None:
        """Fold a forward's time into the running averages: a decode-only step's, and a prompt token's (what a step
        took beyond a decode-only step, over its prompt tokens)."""
        prompt = sum(len(tokens) for r, tokens, _ in plan if r.status == PREFILLING)
        if not prompt:
            self.decode_seconds = seconds if self.decode_seconds is None else (
                self.decode_seconds + TIME_WEIGHT * (seconds - self.decode_seconds))
            return
        if self.decode_seconds is None:  # a forward's own cost is not known yet: a prompt token's cannot be told
            return
        per_token = max(0.0, seconds - self.decode_seconds) / prompt
        self.prompt_token_seconds = per_token if self.prompt_token_seconds is None else (
            self.prompt_token_seconds + TIME_WEIGHT * (per_token - self.prompt_token_seconds))

    def _checked_draft(self, r: Request, draft: list[int]) -> list[int]:
        """A decoding request's draft for this step, cut at the first token its constraint forbids."""
        if draft and r.state.constraint is not None:
            draft = r.state.constraint.cut_draft(draft)
            if r.proposal is not None and r.draft_from is not None:  # a model draft: verify only what is left
                r.proposal = r.proposal.cut(len(draft))
        return draft

    def _masks(self, plan) -> MaskBatch:
        """The token masks of the constrained sequences that sample this step, computed while the forward runs
        (step t's masks depend only on tokens already chosen). If the batched computation cannot start, each
        sequence computes its own when it samples (a fault there ends it alone)."""
        items = [(r.state.constraint, draft) for r, tokens, draft in plan if r.state.constraint is not None
                 and (r.status == DECODING or r.prefilled + len(tokens) >= len(r.prompt_ids))]
        try:
            return MaskBatch(items, overlap=self.overlap_masks)
        except Exception:  # noqa: BLE001 - each sequence computes its own mask when it samples
            log.exception("the batched mask computation failed to start; each constrained sequence computes its own")
            for state, _ in items:
                state.plan([])
            return MaskBatch([])

    def _forward(self, plan) -> list:
        """The batched forward of the plan -> logits per entry. If it raises, each sequence runs alone from where
        its cache stood, and one that fails alone ends alone (its logits None): one sequence's fault never ends the
        others."""
        steps = [SequenceStep(r.cache, tokens, all_logits=bool(draft) or (r.status == PREFILLING
                                                                           and r.scorer is not None))
                 for r, tokens, draft in plan]
        lengths = [s.cache.length for s in steps]
        try:
            started = time.perf_counter()
            outputs = self.model.forward(steps)
            seconds = time.perf_counter() - started
            self._time_step(plan, seconds)
            if any(r.payoff is not None for r, _, _ in plan):  # what a pass of these rows costs: the payoff's input
                CostTable.of(self.model).add(sum(len(tokens) for _, tokens, _ in plan), seconds)
            return outputs
        except Exception:  # noqa: BLE001 - find the sequence at fault: run each alone
            log.exception("a batched forward of %d sequences failed; running each alone", len(steps))
        out = []
        for (r, _, _), step, length in zip(plan, steps, lengths):
            try:
                step.cache.truncate(min(length, step.cache.length))  # where it stood before the failed forward
                out.append(self.model.forward([step])[0])
            except Exception as error:  # noqa: BLE001 - this sequence's fault: it ends alone
                out.append(None)
                self._fail(r, error)
        return out

    def _drafts(self, decoding: list[Request], rows: int) -> dict[int, list[int]]:
        """This step's draft tokens per speculating request id: prompt lookup where it matches (or is the only
        source), else the request's draft model, one batched draft forward per draft position for all of them.
        Each request asks for the length its payoff estimate picks (0: none this step) in a step of `rows` rows."""
        out: dict[int, list[int]] = {}
        by_drafter: dict[int, tuple[DraftModel, list]] = {}
        for r in decoding:
            r.draft_from = None
            if r.finished or r.payoff is None:
                continue
            context = r.prompt_ids + r.state.generated
            options = r.state.options
            remaining = options.max_new_tokens - len(r.state.generated)  # tokens it may still make, this step's too
            room = min(r.state.max_length - r.cache.length - 1, remaining - 1)
            behind = len(context) - r.draft_cache.length if r.draft_cache is not None else 1
            want = r.payoff.plan(room, tokens=len(decoding), rows=rows, behind=behind,
                                 sharing=r.drafter.sharing if r.drafter is not None else 1,
                                 remaining=remaining)
            if want <= 0:
                continue
            if r.drafter is None or r.lookup_first:
                draft = prompt_lookup_draft(context, want)
                if draft or r.drafter is None:
                    out[r.id] = draft
                    continue
            by_drafter.setdefault(id(r.drafter), (r.drafter, []))[1].append((r, context, want))
        for drafter, jobs in by_drafter.values():
            for (r, context, _), proposal in zip(jobs, self._propose(drafter, jobs)):
                if proposal is None:  # its draft failed alone: the request has ended
                    continue
                out[r.id] = proposal.tokens
                r.proposal = proposal
                r.draft_from = len(context)  # the draft cache is valid up to here plus the accepted tokens
        return out

    def _propose(self, drafter: DraftModel, jobs: list) -> list:
        """The draft model's proposals for jobs [(request, context, want)], batched; if that raises, each job is
        drafted alone from where its draft cache stood, and a request whose draft fails alone ends (None)."""
        lengths = [r.draft_cache.length for r, _, _ in jobs]
        try:
            return drafter.propose([(r.draft_cache, context, want) for r, context, want in jobs])
        except Exception:  # noqa: BLE001 - find the sequence at fault: draft each alone
            log.exception("a batched draft of %d sequences failed; drafting each alone", len(jobs))
        out = []
        for (r, context, want), length in zip(jobs, lengths):
            try:
                r.draft_cache.truncate(min(length, r.draft_cache.length))
                out.append(drafter.propose([(r.draft_cache, context, want)])[0])
            except Exception as error:  # noqa: BLE001 - this sequence's fault: it ends alone
                out.append(None)
                self._fail(r, error)
        return out

    def _accept(self, r: Request, logits, draft: list[int], now: float) -> None:
        """Sample from each logits row in turn; with a draft, keep going while the sampled token equals the draft.
        A request that only scores its prompt (max_new_tokens 0) ends here instead."""
        if r.state.options.max_new_tokens == 0:
            r.state.stop_reason = STOP_MAX_TOKENS
            self.finish(r)
            return
        fed_before = r.cache.length - len(logits)
        for i, row in enumerate(logits):
            event = r.state.accept(row, context_length=fed_before + i + 1)
            if r.scorer is not None and len(r.state.generated) == 1:
                event.prompt_logprobs = list(r.scorer.entries)
            r.events.append(event)
            if not r.t_first:
                r.t_first = now
            r.t_last = now
            if r.state.finished or i >= len(draft) or event.token_id != draft[i]:
                break
            r.accepted_draft_tokens += 1
        if draft:
            r.draft_tokens += len(draft)
            # The cache holds the fed token and every draft token; keep those the accepted tokens vouch for.
            r.cache.truncate(fed_before + i + 1)
        if r.draft_from is not None:  # a draft model proposed this step (a constraint may have cut it to nothing)
            # Its cache holds the context it drafted after and all but its last proposed token: keep what was kept.
            r.draft_cache.truncate(min(r.draft_cache.length, r.draft_from + i))
            r.drafter.observe(r.proposal, logits)  # every drafted row left was verified: the draft's margin error
            r.draft_from = None
        if r.payoff is not None and len(r.state.generated) > i + 1:  # a decode step, not the prompt's first token
            r.payoff.record(len(draft), i, ended=r.state.finished)
        if r.state.finished:
            self.finish(r)
