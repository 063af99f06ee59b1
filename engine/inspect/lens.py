"""The logit lens: read every layer's residual stream through the model's own final RMSNorm and lm_head, to see the
prediction form layer by layer. Row i reads hidden_states[i] (transformers' convention: row 0 the embeddings, row i
the output of layer i-1); the last row is the model's logits (its hidden state is already final-normed)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    """Softmax over the last axis in float64: (..., vocab) -> (..., vocab)."""
    x = logits.astype(np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def logit_lens(model: Model, prompt, max_bytes: int = TRACE_MEMORY_LIMIT) -> LogitLens:
    """Trace `prompt` (text or ids) with hidden states and read each through the lens, one row at a time."""
    trace = model.trace(prompt, hidden_states=True, max_bytes=max_bytes)
    ids = trace.token_ids
    n_rows, t = len(trace.hidden_states), ids.size
    top_ids = np.empty((n_rows, t), dtype=np.int64)
    top_probs = np.empty((n_rows, t))
    next_probs = np.empty((n_rows, t - 1))
    for i in range(n_rows):
        probs = softmax64(lens_logits(model, trace, i))  # (T, vocab): one row of the table at a time
        top_ids[i] = probs.argmax(axis=1)
        top_probs[i] = probs[np.arange(t), top_ids[i]]
        next_probs[i] = probs[np.arange(t - 1), ids[1:]]
    return LogitLens(token_ids=ids, top_ids=top_ids, top_probs=top_probs, next_probs=next_probs)
