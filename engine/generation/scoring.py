"""Scoring a prompt: the log-probability of each of its tokens given the ones before, from the logits a prefill
computes at every position when asked (SequenceStep.all_logits) — what eval harnesses call loglikelihood.

Row r of a prefill chunk's logits (the chunk starting at prompt position `start`) predicts the token at position
start + r + 1, so a chunk scores the next chunk's first token too; the prompt's first token has nothing before it
(its entry is None). The log-softmax is exact to float32 rounding of the logits: the shifted exponentials are summed
in float64. Each entry carries the `top` most likely tokens (ties: lower id first, as engine.generation.state's
token_logprob) and the scored token's 1-based rank in the vocabulary (vLLM's `rank`: 1 + how many tokens are more
likely).
"""
from __future__ import annotations

import numpy as np

from engine.generation.state import TokenLogprob

SLICE_ROWS = 256  # logits rows scored at once: bounds the float temporaries (256 x 32000 x 4 bytes = 33 MB each)


def score_rows(logits: np.ndarray, targets, top: int = 0) -> list[TokenLogprob]:
    """logits (n, vocab) float32, targets (n,) token ids (row i's next token) -> n TokenLogprob (logprob, top, rank).

    Cost: one pass of exp over the rows (float32, summed in float64), a comparison pass for the ranks, and for `top`
    > 1 an argpartition per row; `top` == 1 is the argmax."""
    rows = np.asarray(logits, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    n = targets.size
    if n == 0:
        return []
    rows = rows[:n]
    peak = rows.max(axis=1)
    log_z = peak.astype(np.float64) + np.log(np.exp(rows - peak[:, None]).sum(axis=1, dtype=np.float64))
    chosen = rows[np.arange(n), targets]
    logprobs = chosen.astype(np.float64) - log_z
    ranks = 1 + (rows > chosen[:, None]).sum(axis=1)
    best = _top_ids(rows, top)
    out = []
    for i in range(n):
        alternatives = () if best is None else tuple(
            (int(t), float(np.float64(rows[i, t]) - log_z[i])) for t in best[i])
        out.append(TokenLogprob(float(logprobs[i]), alternatives, int(ranks[i])))
    return out


def _top_ids(rows: np.ndarray, top: int) -> np.ndarray | None:
    """(n, vocab) -> (n, k) ids of each row's k largest, largest first, ties lower id first; None for top <= 0."""
    if top <= 0:
        return None
    vocab = rows.shape[1]
    k = min(int(top), vocab)
    if k == 1:
        return rows.argmax(axis=1)[:, None]  # the first maximum: the lowest id among ties
    candidates = np.argpartition(-rows, k - 1, axis=1)[:, :k]
    out = np.empty_like(candidates)
    for i, ids in enumerate(candidates):
        out[i] = ids[np.lexsort((ids, -rows[i, ids]))]
    return out


class PromptScorer:
    """One prompt's log-probabilities, filled chunk by chunk as its prefill runs: `add(start, logits)` after the
    chunk of prompt positions [start, start + len(logits)), `entries` the list so far ([None] for the first
    token, then one TokenLogprob per scored token), complete once every chunk has been added."""

    def __init__(self, prompt_ids, top: int = 0):
        self.prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        self.top = int(top)
        self.entries: list[TokenLogprob | None] = [None]

    def add(self, start: int, logits: np.ndarray) -> None:
        """Score the tokens that the chunk's rows predict (positions start + 1 .. start + len(logits), those that
        exist); `start` must be where the previous chunk ended."""
        if start + 1 != len(self.entries):
            raise ValueError(f"prompt chunks out of order: expected one starting at {len(self.entries) - 1}, "
                             f"got {start}")
        targets = self.prompt_ids[start + 1 : start + 1 + len(logits)]
        for row in range(0, len(targets), SLICE_ROWS):  # a few temporaries of (SLICE_ROWS, vocab) at a time
            self.entries.extend(score_rows(logits[row : row + SLICE_ROWS], targets[row : row + SLICE_ROWS], self.top))

    @property
    def complete(self) -> bool:
        """Whether every prompt token has its entry."""
        return len(self.entries) == len(self.prompt_ids)
