"""Sources of speculative draft tokens: prompt lookup (the context itself) and a draft model (a second, cheaper copy
of the model, e.g. its int8/int4 quantization), each verified by the exact model in one forward of k+1 tokens.

A draft model keeps one KV cache per sequence, holding a prefix of that sequence's context; each drafting round first
feeds it what it has not seen yet (the tokens the exact model accepted since), then proposes greedily, one forward
per draft position for every sequence drafting in the same scheduler step. After verification the cache is cut back
(`KVCache.truncate`) to the part the accepted tokens vouch for.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from engine.errors import EngineError
from engine.generation.draft_payoff import CostTable, DraftSource
from engine.runtime.batch import SequenceStep

LOOKUP = "lookup"
WITH_LOOKUP = "+lookup"  # "int4+lookup": a prompt-lookup match when the context has one, the draft model otherwise
MODEL_DRAFTS = ("int8", "int4")  # quantized copies of the model itself (self-speculation)
DRAFT_CHOICES = (LOOKUP,) + MODEL_DRAFTS + tuple(d + WITH_LOOKUP for d in MODEL_DRAFTS)
_DRAFTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # draft model -> its DraftModel (DraftModel.of)


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


@dataclass
class Proposal:
    """A draft model's proposal for one sequence: its greedy tokens, and for each the runner-up token and the margin
    (top logit - runner-up logit) the draft saw."""

    tokens: list[int] = field(default_factory=list)
    runner_ups: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)

    def cut(self, n: int) -> "Proposal":
        """The first n draft tokens of this proposal (what is left after a constraint cut the draft)."""
        return Proposal(self.tokens[:n], self.runner_ups[:n], self.margins[:n])


class DraftModel:
    """A model that proposes draft tokens greedily for many sequences at once (the draft side of self-speculation).

    model: anything with `forward(steps)` and `new_cache()` over the same vocabulary as the exact model (a quantized
    copy from `Model.draft_model`, or another loaded Model). Its outputs are only proposals: the exact model decides.

    A sequence stops drafting after a token whose margin over the runner-up is within `stop_z` x the measured error of
    the draft's margins (root mean square of draft margin - model margin over the same two tokens, from every verified
    position, once `MIN_OBSERVED` are in): such a near-tie is where a quantized copy picks another token than the
    model, so drafting past it mostly buys rejected tokens. Measured on TinyLlama's shape with the int8 copy (90.6% of
    top tokens agree; 8 of 9 disagreements had a draft margin below 0.05 while the median margin was 0.15), this
    stops at a fifth of the positions and raises tokens per unit of work by ~9%.
    """

    MIN_OBSERVED = 16
    stop_z = 1.0

    def __init__(self, model):
        self.model = model
        self.forwards = 0  # draft forwards run (one per draft position per scheduler step)
        self.rows = 0  # token rows they ran
        self.costs = CostTable()  # seconds of its forwards by rows, measured as they run (DraftPayoff's input)
        self.source = DraftSource()  # its long-run acceptance and probe schedule, shared by the requests it serves
        self.sharing = 1  # sequences its last proposal served (they share the cost of each forward)
        self._error_sq = 0.0
        self._observed = 0

    @classmethod
    def of(cls, model) -> "DraftModel":
        """The DraftModel of `model`, one per model object for as long as it lives, so what it has learned of its
        error carries over from one generation (one Scheduler) to the next."""
        drafter = _DRAFTERS.get(model)
        if drafter is None:
            drafter = _DRAFTERS[model] = cls(model)
        return drafter

    def new_cache(self):
        """An empty draft KV cache for one sequence."""
        return self.model.new_cache()

    @property
    def stop_margin(self) -> float:
        """Draft no further after a token whose margin is below this (0.0 until enough positions are observed)."""
        if self._observed < self.MIN_OBSERVED:
            return 0.0
        return self.stop_z * float(np.sqrt(self._error_sq / self._observed))

    def observe(self, proposal: Proposal, logits: np.ndarray) -> None:
        """Learn the draft's margin error from the model's verification rows: logits (>= len(tokens), vocab), row i
        computed on the same context as the draft's token i."""
        for i, (token, runner_up, margin) in enumerate(zip(proposal.tokens, proposal.runner_ups, proposal.margins)):
            error = margin - float(logits[i][token] - logits[i][runner_up])
            self._error_sq += error * error
            self._observed += 1

    def propose(self, jobs: list[tuple[object, list[int], int]]) -> list[Proposal]:
        """Draft tokens for several sequences: jobs are (draft cache, context ids, tokens wanted >= 1); each cache
        holds a prefix of its context (shorter than it). Returns per job a Proposal of 1 to `wanted` greedy tokens
        (fewer after a near-tie, see the class); afterwards each cache holds its context plus all but the last."""
        drafts = [Proposal() for _ in jobs]
        live = [j for j, (_, _, wanted) in enumerate(jobs) if wanted > 0]
        feeds = {j: jobs[j][1][jobs[j][0].length:] for j in live}
        stop_margin = self.stop_margin
        self.sharing = max(1, len(live))
        while live:
            steps = [SequenceStep(jobs[j][0], feeds[j]) for j in live]
            t0 = time.perf_counter()
            outputs = self.model.forward(steps)
            rows = sum(len(s.token_ids) for s in steps)
            self.costs.add(rows, time.perf_counter() - t0)
            self.forwards += 1
            self.rows += rows
            still = []
            for j, logits in zip(live, outputs):
                row = logits[-1]
                runner_up, token = (int(t) for t in np.argpartition(row, -2)[-2:])
                if row[runner_up] > row[token] or (row[runner_up] == row[token] and runner_up < token):
                    token, runner_up = runner_up, token  # argmax's choice: the first of equal maxima
                margin = float(row[token] - row[runner_up])
                d = drafts[j]
                d.tokens.append(token)
                d.runner_ups.append(runner_up)
                d.margins.append(margin)
                if len(d.tokens) < jobs[j][2] and margin >= stop_margin:
                    feeds[j] = [token]
                    still.append(j)
            live = still
        return drafts


def split_draft(draft) -> tuple[object, bool]:
    """(the draft model's kind or object, whether prompt lookup goes first): "int4+lookup" -> ("int4", True)."""
    if isinstance(draft, str) and draft.endswith(WITH_LOOKUP) and draft != WITH_LOOKUP:
        return draft[: -len(WITH_LOOKUP)], True
    return draft, False
