"""Perplexity: how surprised the model is by a text, token by token, with sliding windows for texts longer than
the model's context.

Windows follow transformers' "Perplexity of fixed-length models" guide: window w starts at w * stride and covers
[begin, end = min(begin + window, N)); it scores the tokens that no earlier window scored, positions
[max(previous end, begin + 1), end), each predicted from the window's tokens before it (at least window - stride
of context once the text is longer than the window). The first window scores tokens 1..end-1 (token 0, BOS, has
nothing to predict it); the last window ends at N. Every token 1..N-1 is scored exactly once, so
perplexity = exp(mean NLL over them), the guide's number when its per-window means are weighted by each window's
scored-token count. With stride >= window the windows do not overlap and each window's first token goes unscored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from engine.errors import EngineError
from engine.model import Model
from engine.runtime.batch import SequenceStep


@dataclass
class Window:
    """One forward pass: tokens [begin, end) go in, tokens [scored_from, end) are scored."""

    begin: int
    end: int
    scored_from: int


@dataclass
class Perplexity:
    """Per-token results for token ids[1:]: nll[j - 1] is -log p(ids[j] | context), natural log, float64."""

    token_ids: np.ndarray  # (N,) int64
    nll: np.ndarray  # (N - 1,) float64
    predicted_ids: np.ndarray  # (N - 1,) int64: the model's most likely token at each scored position
    windows: list[Window]
    window: int  # tokens per forward pass
    stride: int  # tokens each window starts after the previous one

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per scored token (nats)."""
        return float(np.mean(self.nll[self.scored]))

    @property
    def perplexity(self) -> float:
        """exp(mean NLL)."""
        return float(np.exp(self.mean_nll))

    @property
    def scored(self) -> np.ndarray:
        """(N - 1,) bool: which of ids[1:] were scored (all, unless stride >= window left window starts out)."""
        return ~np.isnan(self.nll)

    def worst(self, n: int) -> list[int]:
        """Positions j (into token_ids) of the n least expected tokens, highest NLL first."""
        nll = np.where(self.scored, self.nll, -np.inf)
        order = np.lexsort((np.arange(nll.size), -nll))[: max(0, int(n))]
        return [int(i) + 1 for i in order if np.isfinite(nll[i])]


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows over n_tokens tokens (see the module docstring) as (begin, end, scored_from)."""
    windows, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        windows.append(Window(begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == n_tokens:
            break
    return windows


def perplexity(model: Model, text_or_ids, window: int | None = None, stride: int | None = None,
               progress: bool | None = None) -> Perplexity:
    """Score a text (str, encoded with BOS) or ids. window: tokens per forward (default the model's context);
    stride: how far windows move (default window // 2). progress: a tqdm bar on stderr (None: only on a terminal)."""
    ids = np.asarray(model.prompt_ids(text_or_ids), dtype=np.int64)
    window = model.config.max_position_embeddings if window is None else int(window)
    if not 2 <= window <= model.config.max_position_embeddings:
        raise EngineError(f"window must be in 2..{model.config.max_position_embeddings} (the model's context), "
                          f"got {window}")
    stride = max(1, window // 2) if stride is None else int(stride)
    if stride < 1:
        raise EngineError(f"stride must be >= 1, got {stride}")
    if ids.size < 2:
        raise EngineError("perplexity needs at least 2 tokens (one to predict from, one to predict)")
    windows = sliding_windows(ids.size, window, stride)
    nll = np.full(ids.size - 1, np.nan)
    predicted = np.full(ids.size - 1, -1, dtype=np.int64)
    for w in tqdm(windows, desc="perplexity", unit="window", disable=None if progress is None else not progress,
                  leave=False):
        if w.scored_from >= w.end:
            continue
        logits = model.forward([SequenceStep(model.new_cache(), ids[w.begin : w.end], all_logits=True)])[0]
        # row r of the window's logits predicts token begin + r + 1: the rows for scored_from..end-1
        rows = logits[w.scored_from - 1 - w.begin : w.end - 1 - w.begin].astype(np.float64)
        top = rows.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
        targets = ids[w.scored_from : w.end]
        nll[w.scored_from - 1 : w.end - 1] = log_z - rows[np.arange(targets.size), targets]
        predicted[w.scored_from - 1 : w.end - 1] = rows.argmax(axis=1)
    return Perplexity(token_ids=ids, nll=nll, predicted_ids=predicted, windows=windows, window=window, stride=stride)
