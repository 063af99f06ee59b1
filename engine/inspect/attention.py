"""Attention summaries: one number per head (how much it attends to the first token, to the previous token, and
the entropy of its rows), for choosing which heads to look at. Averages are over query positions 1..T-1 (position 0
can only attend to itself).

`AttentionInspection` computes them (and, if asked, one head's whole map) a slice of query positions at a time
(engine.inspect.sliced): each slice's (n_heads, rows, T) probabilities are reduced to three numbers per head and
row as soon as the forward hands them over, so it holds T numbers per head and statistic and one slice's
probabilities, never a layer's (n_heads, T, T). A row's numbers do not depend on how the rows were sliced."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import EngineError
from engine.inspect.sliced import FLOAT32_BYTES, FLOAT64_BYTES, SlicedTrace
from engine.model import Model
from engine.runtime.trace import TRACE_MEMORY_LIMIT


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


class AttentionInspection(SlicedTrace):
    """Attention over `ids`, a slice of queries at a time: layer `layer`'s head `head` as a (T, T) float32 map (None:
    no map) and, with `summary`, every head's HeadSummary. `run()` -> (map or None, HeadSummary or None).
    max_bytes bounds everything it holds (engine.inspect.sliced.SlicedTrace); EngineError for a layer or head the
    model lacks, or fewer than 2 tokens with a summary."""

    def __init__(self, model: Model, ids, layer: int | None = None, head: int = 0, summary: bool = True,
                 max_bytes: int = TRACE_MEMORY_LIMIT, answer_bytes: int = 0):
        c = model.config
        if layer is not None and not 0 <= layer < c.num_hidden_layers:
            raise EngineError(f"layer: this model has layers 0..{c.num_hidden_layers - 1}, got {layer}")
        if not 0 <= head < c.num_attention_heads:
            raise EngineError(f"head: this model has heads 0..{c.num_attention_heads - 1}, got {head}")
        if summary and len(ids) < 2:
            raise EngineError("attention summaries need at least 2 tokens")
        self.layer, self.head, self.summary = layer, head, summary
        super().__init__(model, ids, max_bytes, answer_bytes)
        self.map = self.rows = None

    def allocate(self) -> None:
        """The map, and the summary's numbers: per layer, head and query 1..T-1, attention to key 0, to the previous
        key, and the row's entropy."""
        c, t = self.config, len(self.ids)
        self.map = np.zeros((t, t), dtype=np.float32) if self.layer is not None else None
        self.rows = np.zeros((3, c.num_hidden_layers, c.num_attention_heads, t - 1)) if self.summary else None

    def kept_bytes(self) -> int:
        """The map (T x T float32) and the summary's three numbers per layer, head and query (float64)."""
        c, t = self.config, len(self.ids)
        kept = t * t * FLOAT32_BYTES if self.layer is not None else 0
        if self.summary:
            kept += 3 * c.num_hidden_layers * c.num_attention_heads * (t - 1) * FLOAT64_BYTES
        return kept

    def row_bytes(self) -> int:
        """One query's probabilities in two layers at once (the forward's and the one being reduced), and a head's
        float64 row with its temporaries."""
        t = len(self.ids)
        return 2 * self.config.num_attention_heads * t * FLOAT32_BYTES + 4 * t * FLOAT64_BYTES

    def wants_attention(self, layer: int) -> bool:
        """Every layer for a summary, else only the map's."""
        return self.summary or layer == self.layer

    def reduce_attention(self, layer: int, probs: np.ndarray) -> None:
        """This slice's queries of layer `layer`, probs (n_heads, rows, start + rows): the map's rows, and three
        numbers per head and query (each computed over the whole T-key row, zeros included, as for one pass)."""
        start, n = self.start, probs.shape[1]
        if layer == self.layer:
            self.map[start:start + n, :start + n] = probs[self.head]
        if not self.summary:
            return
        skip = 1 if start == 0 else 0  # query 0 can only attend to itself: left out of the averages
        queries = np.arange(start + skip, start + n)
        if queries.size == 0:
            return
        p = probs[:, skip:, :]
        first, previous, entropy = self.rows[:, layer, :, queries[0] - 1:queries[-1]]
        first[:] = p[:, :, 0]
        previous[:] = p[:, np.arange(queries.size), queries - 1]
        row = np.zeros((queries.size, len(self.ids)))
        for h in range(p.shape[0]):
            row[:, :start + n] = p[h]
            with np.errstate(divide="ignore", invalid="ignore"):
                plogp = np.where(row > 0, row * np.log(row), 0.0)
            entropy[h] = -plogp.sum(axis=1)

    def result(self) -> tuple[np.ndarray | None, HeadSummary | None]:
        """The map (or None) and the summary (or None)."""
        summary = None
        if self.summary:
            first, previous, entropy = self.rows.mean(axis=3)
            summary = HeadSummary(to_first=first, to_previous=previous, entropy=entropy)
        return self.map, summary


def head_summary(model: Model, prompt, max_bytes: int = TRACE_MEMORY_LIMIT) -> HeadSummary:
    """Summaries of every head of every layer over `prompt` (text or ids, at least 2 tokens): AttentionInspection,
    its slices run back to back. EngineError when it would hold more than `max_bytes`."""
    return AttentionInspection(model, model.prompt_ids(prompt), summary=True, max_bytes=max_bytes).run()[1]
