"""Sources of speculative draft tokens: prompt lookup (the context itself) and a draft model (a second, cheaper copy
of the model, e.g. its int8/int4 quantization), each verified by the exact model in one forward of k+1 tokens.

A draft model keeps one KV cache per sequence, holding a prefix of that sequence's context; each drafting round first
feeds it what it has not seen yet (the tokens the exact model accepted since), then proposes greedily, one forward
per draft position for every sequence drafting in the same scheduler step. After verification the cache is cut back
(`KVCache.truncate`) to the part the accepted tokens vouch for.
"""
from __future__ import annotations

import numpy as np

from engine.errors import EngineError
from engine.runtime.batch import SequenceStep

LOOKUP = "lookup"
WITH_LOOKUP = "+lookup"  # "int4+lookup": a prompt-lookup match when the context has one, the draft model otherwise
MODEL_DRAFTS = ("int8", "int4")  # quantized copies of the model itself (self-speculation)
DRAFT_CHOICES = (LOOKUP,) + MODEL_DRAFTS + tuple(d + WITH_LOOKUP for d in MODEL_DRAFTS)


def prompt_lookup_draft(context: list[int], max_draft: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to `max_draft` draft tokens for `context` (prompt + generated ids), [] when no n-gram recurs.

    Tries the longest suffix n-gram first (max_ngram down to min_ngram) and the most recent earlier match.
    """
    n_ctx = len(context)
    for n in range(min(max_ngram, n_ctx - 1), min_ngram - 1, -1):
        suffix = context[n_ctx - n:]
        for start in range(n_ctx - n - 1, -1, -1):
            if context[start:start + n] == suffix:
                follow = context[start + n:start + n + max_draft]
                if follow:
                    return follow
    return []


def check_draft(draft) -> None:
    """EngineError unless `draft` is "lookup", "int8", "int4", another weights dtype name, or a model object (one with
    `forward` and `new_cache`)."""
    if isinstance(draft, str):
        if not draft or draft == WITH_LOOKUP:
            raise EngineError(f"draft must be one of {', '.join(DRAFT_CHOICES)} (or a loaded model), got {draft!r}")
        return
    if not (hasattr(draft, "forward") and hasattr(draft, "new_cache")):
        raise EngineError(f"draft must be one of {', '.join(DRAFT_CHOICES)} (or a loaded model), got {draft!r}")


class DraftModel:
    """A model that proposes draft tokens greedily for many sequences at once (the draft side of self-speculation).

    model: anything with `forward(steps)` and `new_cache()` over the same vocabulary as the exact model (a quantized
    copy from `Model.draft_model`, or another loaded Model). Its outputs are only proposals: the exact model decides.
    """

    def __init__(self, model):
        self.model = model
        self.forwards = 0  # draft forwards run (one per draft position per scheduler step)
        self.rows = 0  # token rows they ran

    def new_cache(self):
        """An empty draft KV cache for one sequence."""
        return self.model.new_cache()

    def propose(self, jobs: list[tuple[object, list[int], int]]) -> list[list[int]]:
        """Draft tokens for several sequences: jobs are (draft cache, context ids, tokens wanted >= 1); each cache
        holds a prefix of its context (shorter than it). Returns per job up to `wanted` greedy tokens; afterwards each
        cache holds its context plus all but the last proposed token."""
        drafts: list[list[int]] = [[] for _ in jobs]
        live = [j for j, (_, _, wanted) in enumerate(jobs) if wanted > 0]
        feeds = {j: jobs[j][1][jobs[j][0].length:] for j in live}
        while live:
            steps = [SequenceStep(jobs[j][0], feeds[j]) for j in live]
            outputs = self.model.forward(steps)
            self.forwards += 1
            self.rows += sum(len(s.token_ids) for s in steps)
            still = []
            for j, logits in zip(live, outputs):
                token = int(np.argmax(logits[-1]))
                drafts[j].append(token)
                if len(drafts[j]) < jobs[j][2]:
                    feeds[j] = [token]
                    still.append(j)
            live = still
        return drafts


def split_draft(draft) -> tuple[object, bool]:
    """(the draft model's kind or object, whether prompt lookup goes first): "int4+lookup" -> ("int4", True)."""
    if isinstance(draft, str) and draft.endswith(WITH_LOOKUP) and draft != WITH_LOOKUP:
        return draft[: -len(WITH_LOOKUP)], True
    return draft, False
