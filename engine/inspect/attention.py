"""Attention summaries: one number per head (how much it attends to the first token, to the previous token, and
the entropy of its rows), for choosing which heads to look at. Averages are over query positions 1..T-1 (position 0
can only attend to itself)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import EngineError
from engine.model import Model
from engine.runtime.trace import TRACE_MEMORY_LIMIT, FLOAT32_BYTES


@dataclass
class HeadSummary:
    """(L, n_heads) float64 arrays: mean attention to key 0 (BOS: the "sink"), mean attention to the previous token,
    mean row entropy in nats (0: one key; log(t + 1) at most for query t)."""

    to_first: np.ndarray
    to_previous: np.ndarray
    entropy: np.ndarray


def summarise_heads(attention: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's attention (n_heads, T, T), T >= 2 -> (to_first, to_previous, entropy), each (n_heads,) float64."""
    p = attention[:, 1:, :].astype(np.float64)  # queries 1..T-1
    t = attention.shape[1]
    to_first = p[:, :, 0].mean(axis=1)
    to_previous = p[:, np.arange(t - 1), np.arange(t - 1)].mean(axis=1)  # query q (row q - 1 of p) -> key q - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    entropy = (-plogp.sum(axis=2)).mean(axis=1)
    return to_first, to_previous, entropy


def head_summary(model: Model, prompt, max_bytes: int = TRACE_MEMORY_LIMIT) -> HeadSummary:
    """Summaries of every head of every layer over `prompt` (text or ids, at least 2 tokens).

    Traces as many layers' attention per forward pass as fit in `max_bytes` (one pass for short prompts), so the
    whole model's map never holds every layer's (n_heads, T, T) at once.
    """
    ids = model.prompt_ids(prompt)
    if len(ids) < 2:
        raise EngineError("attention summaries need at least 2 tokens")
    c = model.config
    logits_bytes = len(ids) * c.vocab_size * FLOAT32_BYTES
    per_layer = c.num_attention_heads * len(ids) ** 2 * FLOAT32_BYTES
    chunk = max(1, (max_bytes - logits_bytes) // per_layer)
    rows = {name: np.empty((c.num_hidden_layers, c.num_attention_heads)) for name in ("first", "previous", "entropy")}
    for start in range(0, c.num_hidden_layers, chunk):
        layers = list(range(start, min(start + chunk, c.num_hidden_layers)))
        trace = model.trace(ids, attentions=True, layers=layers, max_bytes=max_bytes)
        for i in layers:
            rows["first"][i], rows["previous"][i], rows["entropy"][i] = summarise_heads(trace.attentions[i])
    return HeadSummary(to_first=rows["first"], to_previous=rows["previous"], entropy=rows["entropy"])
