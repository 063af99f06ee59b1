"""Generation for one sequence or a fixed batch of prompts, on the continuous-batching scheduler.

A `Generation` is an iterator of `TokenEvent`s for one sequence (driving a private `Scheduler`); `generate` consumes
it; `generate_batch` runs several prompts through one batched forward per step.
"""
from __future__ import annotations

from engine.generation.scheduler import Scheduler
from engine.generation.speculative import LOOKUP
from engine.generation.state import GenerationOptions, GenerationResult, default_options


class Generation:
    """Streaming generation for one sequence: iterate for TokenEvents; `result` once it is exhausted (or closed).

    With `cache` given (a conversation's cache) only the prompt tokens beyond `cache.length` are prefilled: the cache
    must already hold exactly prompt_ids[:cache.length], and it is kept (not freed) when generation ends.
    `speculate` > 0 drafts up to that many tokens per step (from `draft`: "lookup", "int8", "int4" or a loaded
    model; see Scheduler.submit) and verifies them in one forward.
    """

    def __init__(self, model, prompt_ids, options: GenerationOptions, cache=None, truncate: bool = False,
                 speculate: int = 0, draft=LOOKUP, draft_cache=None):
        self.scheduler = Scheduler(model)
        self.request = self.scheduler.submit(prompt_ids, options, cache=cache, truncate=truncate,
                                             speculate=speculate, draft=draft, draft_cache=draft_cache,
                                             keep_cache=cache is not None)
        self.prompt_ids = self.request.prompt_ids
        self.result: GenerationResult | None = None

    def __iter__(self):
        try:
            yield from self.request
        finally:
            self.cancel()  # a no-op for a finished request; sets `result`

    def cancel(self) -> None:
        """Stop now (Ctrl-C): the result's stop reason is 'cancelled'."""
        if not self.request.finished:
            self.request.cancel()
        self.result = self.request.result


def generate(model, prompt_ids, cache=None, truncate: bool = False, speculate: int = 0, draft=LOOKUP,
             **options) -> GenerationResult:
    """Generate after `prompt_ids` until a stop condition; options as in `default_options`."""
    gen = Generation(model, prompt_ids, default_options(model, **options), cache=cache, truncate=truncate,
                     speculate=speculate, draft=draft)
    for _ in gen:
        pass
    return gen.result


def generate_batch(model, prompts, speculate: int = 0, draft=LOOKUP, **options) -> list[GenerationResult]:
    """Generate for several prompts at once (one batched forward per step, each with its own stop; a draft model's
    forwards batched too). A fault in one sequence's step ends it alone, and is raised once the others are done."""
    scheduler = Scheduler(model)
    opts = default_options(model, **options)
    requests = [scheduler.submit(p, opts, speculate=speculate, draft=draft) for p in prompts]
    for _ in scheduler.run():
        pass
    failed = next((r.error for r in requests if r.error is not None), None)
    if failed is not None:  # a fault ended that sequence alone; the caller asked for all of them
        raise failed
    return [r.result for r in requests]
