"""The logit lens: read every layer's residual stream through the model's own final RMSNorm and lm_head, to see the
prediction form layer by layer. Row i reads hidden_states[i] (transformers' convention: row 0 the embeddings, row i
the output of layer i-1); the last row is the model's logits (its hidden state is already final-normed).

`LensInspection` computes the table a slice of positions at a time (engine.inspect.sliced): a forward piece keeps the
slice's residual stream at every layer, then pending pieces read it through the lens a row at a time (each a few
positions' (rows, vocab) probabilities), so it never holds the whole (T, vocab) logits nor every layer's hidden
states, and its pieces stay small beside a decode step."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.inspect.sliced import FLOAT32_BYTES, FLOAT64_BYTES, SlicedTrace
from engine.model import Model
from engine.runtime.layers import linear, rms_norm
from engine.runtime.trace import TRACE_MEMORY_LIMIT, Trace


@dataclass
class LogitLens:
    """Per row (L + 1: embeddings, after layer 0, ..., after layer L-1 = the logits) and position (T):
    the top token and its probability, and the probability given to the real next token."""

    token_ids: np.ndarray  # (T,) int64
    top_ids: np.ndarray  # (L + 1, T) int64
    top_probs: np.ndarray  # (L + 1, T) float64
    next_probs: np.ndarray  # (L + 1, T - 1) float64: p(token_ids[t + 1]) read at position t

    @property
    def row_labels(self) -> list[str]:
        """'embeddings', 'layer 0', ..., 'layer L-1' (the last row is the model's output)."""
        return ["embeddings"] + [f"layer {i}" for i in range(self.top_ids.shape[0] - 1)]


def lens_logits(model: Model, trace: Trace, index: int) -> np.ndarray:
    """Row `index` of the lens: lm_head(final_norm(hidden_states[index])) (T, vocab) float32; the last is the logits."""
    weights = model.backend.weights
    hidden = trace.hidden_states[index]
    if index == len(trace.hidden_states) - 1:  # transformers' last hidden state is already final-normed
        return linear(hidden, weights.lm_head)
    return linear(rms_norm(hidden, weights.final_norm, model.backend.eps), weights.lm_head)


def softmax64(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64: (..., vocab) -> (..., vocab) (one float64 copy, worked in place)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


class LensInspection(SlicedTrace):
    """The logit lens of `ids`, a slice of positions at a time (see the module docstring); `run()` -> LogitLens.
    max_bytes bounds everything it holds (engine.inspect.sliced.SlicedTrace)."""

    def __init__(self, model: Model, ids, max_bytes: int = TRACE_MEMORY_LIMIT, answer_bytes: int = 0):
        super().__init__(model, ids, max_bytes, answer_bytes)
        self.top_ids = self.top_probs = self.next_probs = None
        self.hidden: list = []  # the last forward piece's hidden states, index 0..L: (rows, hidden) float32 each
        self.read = (0, 0)  # the next pending piece: (index, row of the slice)

    def allocate(self) -> None:
        """The table's three arrays."""
        rows, t = self.config.num_hidden_layers + 1, len(self.ids)
        self.top_ids = np.zeros((rows, t), dtype=np.int64)
        self.top_probs = np.zeros((rows, t))
        self.next_probs = np.zeros((rows, t - 1))

    def kept_bytes(self) -> int:
        """The table: top ids, top probabilities and next-token probabilities per row and position."""
        return (self.config.num_hidden_layers + 1) * len(self.ids) * 3 * FLOAT64_BYTES

    def row_bytes(self) -> int:
        """One position's hidden state at every layer, its lens logits and their float64 softmax (with room for a
        temporary)."""
        c = self.config
        return (c.num_hidden_layers + 1) * c.hidden_size * FLOAT32_BYTES + c.vocab_size * (
            FLOAT32_BYTES + 2 * FLOAT64_BYTES)

    def reduce_hidden(self, index: int, x: np.ndarray) -> None:
        """Keep this slice's hidden_states[index] (rows, hidden) for the pending pieces."""
        if index == 0:
            self.hidden = []
            self.read = (0, 0)
        self.hidden.append(np.array(x, dtype=np.float32, copy=True))

    def pending_rows(self) -> int:
        """(index, position) pairs of the last slice not yet read through the lens."""
        if not self.hidden:
            return 0
        index, row = self.read
        n = self.hidden[0].shape[0]
        return (len(self.hidden) - index) * n - row

    def reduce_pending(self, rows: int) -> None:
        """Read up to `rows` positions of one row of the table (hidden state `index`) through the lens."""
        index, row = self.read
        x = self.hidden[index][row:row + rows]
        weights = self.model.backend.weights
        if index == self.config.num_hidden_layers:  # already final-normed: these are the model's logits
            logits = linear(x, weights.lm_head)
        else:
            logits = linear(rms_norm(x, weights.final_norm, self.model.backend.eps), weights.lm_head)
        probs = softmax64(logits)
        del logits
        n, start = x.shape[0], self.start + row
        top = probs.argmax(axis=1)
        self.top_ids[index, start:start + n] = top
        self.top_probs[index, start:start + n] = probs[np.arange(n), top]
        following = self.ids[start + 1:start + n + 1]  # the real next token of each position that has one
        self.next_probs[index, start:start + len(following)] = probs[np.arange(len(following)), following]
        row += n
        if row >= self.hidden[index].shape[0]:
            index, row = index + 1, 0
        self.read = (index, row)
        if index == len(self.hidden):
            self.hidden = []  # the slice is read: its states go

    def result(self) -> LogitLens:
        """The finished table."""
        return LogitLens(token_ids=np.asarray(self.ids, dtype=np.int64), top_ids=self.top_ids,
                         top_probs=self.top_probs, next_probs=self.next_probs)


def logit_lens(model: Model, prompt, max_bytes: int = TRACE_MEMORY_LIMIT) -> LogitLens:
    """Read every layer's residual stream over `prompt` (text or ids) through the lens (LensInspection, its slices
    run back to back); EngineError when it would hold more than max_bytes."""
    return LensInspection(model, model.prompt_ids(prompt), max_bytes).run()
