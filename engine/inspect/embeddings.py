"""Text embeddings: one vector per input, pooled from the model's last hidden state (after the final RMSNorm, the
state lm_head reads: transformers' `last_hidden_state`), as llama.cpp's `--pooling` does for a decoder model.

Pooling (POOLINGS): "mean" (the default) averages every position's state, BOS included (llama.cpp's `mean`,
sentence-transformers' mean over an all-ones attention mask); "last" takes the last token's state (llama.cpp's
`last`: in a causal model the only position that has read the whole input). With `normalize` (the default, as
llama.cpp's `--embd-normalize 2`, OpenAI's and Ollama's vectors) the vector is scaled to unit Euclidean length, so a
dot product is the cosine similarity. Sums run in float64; the vector is returned as float32.
"""
from __future__ import annotations

import numpy as np

from engine.errors import EngineError
from engine.inspect.sliced import FLOAT32_BYTES, INSPECTION_MEMORY_LIMIT, SlicedTrace
from engine.runtime.batch import SequenceStep
from engine.runtime.numpy_backend import NumpyBackend
from engine.runtime.trace import TraceRecorder

POOLINGS = ("mean", "last")
DEFAULT_POOLING = "mean"


def check_pooling(pooling: str) -> str:
    """`pooling` if it is one of POOLINGS, else EngineError naming the choices."""
    if pooling not in POOLINGS:
        raise EngineError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def pool(hidden: np.ndarray, pooling: str = DEFAULT_POOLING, normalize: bool = True) -> np.ndarray:
    """hidden (T, hidden_size) float32 -> (hidden_size,) float32: mean or last row, L2-normalized when asked."""
    check_pooling(pooling)
    states = np.asarray(hidden, dtype=np.float64)
    if states.ndim != 2 or states.shape[0] == 0:
        raise EngineError(f"pooling needs a (tokens, hidden) array with at least one token, got {states.shape}")
    vector = states.mean(axis=0) if pooling == "mean" else states[-1]
    if normalize:
        norm = np.linalg.norm(vector)
        if norm > 0:
            vector = vector / norm
    return vector.astype(np.float32)


def embed(model, token_ids, pooling: str = DEFAULT_POOLING, normalize: bool = True) -> np.ndarray:
    """One input's embedding: token_ids (T,) ints (the caller adds BOS as it tokenizes) -> (hidden_size,) float32.

    Runs one forward pass over the ids on a fresh cache (recording only the last hidden state; the NumPy backend), so
    call it where the model is free (a server runs a SlicedEmbedding between its decode steps instead). EngineError
    for an empty input, one longer than the window, ids outside the vocabulary or an unknown pooling.
    """
    ids = checked_ids(model, token_ids, pooling)
    return pool(last_hidden_state(model, ids), pooling, normalize)


def checked_ids(model, token_ids, pooling: str) -> list[int]:
    """token_ids as a list of ints; EngineError for an empty input, one longer than the window, ids outside the
    vocabulary or an unknown pooling."""
    check_pooling(pooling)
    ids = [int(t) for t in token_ids]
    config = model.config
    if not ids:
        raise EngineError("an input to embed needs at least one token")
    if len(ids) > config.max_position_embeddings:
        raise EngineError(f"the input has {len(ids)} tokens, more than the model's context window of "
                          f"{config.max_position_embeddings}")
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise EngineError(f"token id {bad[0]} is outside the vocabulary (0..{config.vocab_size - 1})")
    return ids


class SlicedEmbedding(SlicedTrace):
    """`embed` a slice of positions at a time (engine.inspect.sliced), so a server runs it between decode steps
    (ServingLoop.submit_work) and a long input never stalls the batch: every position's final-normed state is kept,
    (T, hidden_size) float32, and pooled at the end -> `result()` is embed()'s vector. max_bytes: the most it may
    hold (its KV cache, those states, one slice's work)."""

    def __init__(self, model, token_ids, pooling: str = DEFAULT_POOLING, normalize: bool = True,
                 max_bytes: int = INSPECTION_MEMORY_LIMIT):
        ids = checked_ids(model, token_ids, pooling)
        self.pooling, self.normalize = pooling, normalize
        self.states: np.ndarray | None = None
        super().__init__(model, ids, max_bytes)

    def kept_bytes(self) -> int:
        return len(self.ids) * self.config.hidden_size * FLOAT32_BYTES

    def allocate(self) -> None:
        self.states = np.empty((len(self.ids), self.config.hidden_size), dtype=np.float32)

    def reduce_hidden(self, index: int, x: np.ndarray) -> None:
        if index == self.config.num_hidden_layers:  # after the final norm: what lm_head reads
            self.states[self.start:self.start + len(x)] = x

    def result(self) -> np.ndarray:
        return pool(self.states, self.pooling, self.normalize)


def last_hidden_state(model, ids: list[int]) -> np.ndarray:
    """(T,) ids -> (T, hidden_size) float32: every position's state after the final norm, from one forward pass that
    computes logits for the last position only (a traced pass: NumPy backend; EngineError on another)."""
    if not isinstance(model.backend, NumpyBackend):
        raise EngineError(f"embeddings run on the numpy backend only (this model runs on {model.backend.name})")
    config = model.config
    recorder = TraceRecorder(config, len(ids), hidden_states=True, layers=[config.num_hidden_layers])
    model.backend.forward([SequenceStep(model.new_cache(), ids)], recorder=recorder)
    return recorder.hidden_states[config.num_hidden_layers]
