"""Continuous batching: many sequences, each with its own cache and sampling, through one forward per step.

Every step stacks the next tokens of all decoding sequences (plus, for speculative decoding, their draft tokens)
and a budget of prompt tokens from sequences still prefilling, so a new request joins without stalling the
others; a finished sequence leaves at once and its cache is freed (unless the caller keeps it, as chat does).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from engine.runtime.batch import SequenceStep
from engine.errors import EngineError
from engine.generation.state import (GenerationOptions, GenerationResult, SequenceState, check_prompt,
                             default_options)
from engine.generation.speculative import prompt_lookup_draft
from engine.generation.constraints import MaskBatch

WAITING, PREFILLING, DECODING, FINISHED = "waiting", "prefilling", "decoding", "finished"


@dataclass
class Request:
    """One sequence in the scheduler: its cache, generation state, queued events, and timings."""

    id: int
    prompt_ids: list[int]
    state: SequenceState
    cache: object
    speculate: int = 0  # most draft tokens per step (prompt lookup); 0: plain decoding
    draft_len: int = 0  # draft tokens asked for next step: adapts between 1 and `speculate` (see _adapt_draft)
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

    @property
    def finished(self) -> bool:
        """Whether the request's status is FINISHED."""
        return self.status == FINISHED

    def __iter__(self):
        """This request's TokenEvents as they are produced, driving the scheduler as needed."""
        while True:
            while self.events:
                yield self.events.popleft()
            if self.finished:
                return
            self.scheduler.step()

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
            logprobs=None if s.logprobs is None else list(s.logprobs),
        )


class Scheduler:
    """Runs submitted requests to completion, one batched forward per `step()`.

    prefill_chunk: prompt tokens per step while other sequences are decoding (a lone sequence prefills its whole
    prompt in one pass). max_active: sequences in flight at once; more requests wait their turn.
    """

    def __init__(self, model, prefill_chunk: int = 256, max_active: int = 64):
        if prefill_chunk < 1 or max_active < 1:
            raise EngineError("prefill_chunk and max_active must be >= 1")
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.max_active = max_active
        self.overlap_masks = True  # constrained sequences: compute the step's token masks while the forward runs
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self._ids = itertools.count()

    def submit(self, prompt_ids, options: GenerationOptions | None = None, cache=None, speculate: int = 0,
               keep_cache: bool = False, truncate: bool = False, **overrides) -> Request:
        """Queue a request; bad parameters raise EngineError here, for this request only.

        `cache` may already hold a prefix of prompt_ids (a conversation's cache): only the rest is prefilled.
        """
        options = options if options is not None else default_options(self.model, **overrides)
        if isinstance(speculate, bool) or not isinstance(speculate, int) or speculate < 0:
            raise EngineError(f"speculate must be an integer >= 0, got {speculate!r}")
        ids = check_prompt(self.model, prompt_ids, truncate, options.max_new_tokens)
        cache = cache if cache is not None else self.model.new_cache()
        if cache.length >= len(ids):
            raise EngineError("the cache already holds the whole prompt: nothing to prefill")
        state = SequenceState(self.model, ids, options, cache)
        request = Request(next(self._ids), ids, state, cache, speculate=speculate, draft_len=speculate,
                          keep_cache=keep_cache, prefilled=cache.length, t_submit=time.perf_counter(), scheduler=self)
        self.waiting.append(request)
        return request

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

    def finish(self, request: Request, cancelled: bool = False) -> None:
        """Take a request out of the batch; its cache is dropped unless the caller keeps it."""
        if cancelled:
            request.state.cancel()
        request.status = FINISHED
        if request in self.active:
            self.active.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        if not request.keep_cache:
            request.cache = None
            request.state.cache = None

    def step(self) -> list[Request]:
        """One batched forward over every active sequence's next tokens (and a chunk of waiting prompts).

        Returns the requests that took part (each may have new events queued, and may have finished).
        """
        while self.waiting and len(self.active) < self.max_active:
            request = self.waiting.popleft()
            request.status = PREFILLING
            request.t_start = time.perf_counter()
            self.active.append(request)
        if not self.active:
            return []
        decoding = [r for r in self.active if r.status == DECODING]
        budget = self.prefill_chunk if decoding else None  # a lone prefill runs whole
        plan: list[tuple[Request, list[int], list[int]]] = []  # (request, tokens fed, draft part)
        for r in self.active:
            if r.status == DECODING:
                context = r.prompt_ids + r.state.generated
                room = r.state.max_length - r.cache.length - 1
                draft = prompt_lookup_draft(context, min(r.draft_len, room)) if r.speculate and room > 0 else []
                if draft and r.state.constraint is not None:
                    draft = r.state.constraint.cut_draft(draft)  # cut at the first token the constraint forbids
                plan.append((r, [r.state.generated[-1]] + draft, draft))
            elif budget is None or budget > 0:
                todo = r.prompt_ids[r.prefilled:]
                chunk = todo if budget is None else todo[:budget]
                if budget is not None:
                    budget -= len(chunk)
                plan.append((r, chunk, []))
        steps = [SequenceStep(r.cache, tokens, all_logits=bool(draft)) for r, tokens, draft in plan]
        masks = MaskBatch([(r.state.constraint, draft) for r, tokens, draft in plan if r.state.constraint is not None
                           and (r.status == DECODING or r.prefilled + len(tokens) >= len(r.prompt_ids))],
                          overlap=self.overlap_masks)  # step t's masks depend only on tokens already chosen
        outputs = self.model.forward(steps)
        masks.wait()
        now = time.perf_counter()
        for (r, tokens, draft), logits in zip(plan, outputs):
            if r.status == PREFILLING:
                r.prefilled += len(tokens)
                r.prefill_tokens += len(tokens)
                if r.prefilled < len(r.prompt_ids):
                    continue
                r.status = DECODING
            self._accept(r, logits, draft, now)
        return [r for r, _, _ in plan]

    @staticmethod
    def _adapt_draft(r: Request, drafted: int, accepted: int) -> None:
        """Longer drafts while they are accepted whole, shorter when rejected (transformers' assisted-generation
        heuristic): verifying drafts that keep failing costs rows in every matmul for nothing. `drafted` is what
        prompt lookup found, which may be fewer tokens than asked for."""
        if accepted == drafted:
            r.draft_len = min(r.speculate, r.draft_len + 2)
        else:
            r.draft_len = max(1, r.draft_len - 1)

    def _accept(self, r: Request, logits, draft: list[int], now: float) -> None:
        """Sample from each logits row in turn; with a draft, keep going while the sampled token equals the draft."""
        fed_before = r.cache.length - len(logits)
        for i, row in enumerate(logits):
            event = r.state.accept(row, context_length=fed_before + i + 1)
            r.events.append(event)
            if not r.t_first:
                r.t_first = now
            r.t_last = now
            if r.state.finished or i >= len(draft) or event.token_id != draft[i]:
                break
            r.accepted_draft_tokens += 1
        if draft:
            r.draft_tokens += len(draft)
            self._adapt_draft(r, drafted=len(draft), accepted=i)
            # The cache holds the fed token and every draft token; keep those the accepted tokens vouch for.
            r.cache.truncate(fed_before + i + 1)
        if r.state.finished:
            self.finish(r)
