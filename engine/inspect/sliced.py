"""A traced forward pass run a slice of positions at a time, reduced as it goes: the base of the inspections.

`SlicedTrace` runs a prompt through the model `rows` positions per call (`run_slice`), over a KV cache of its own
(the same computation as one whole pass, to the bit with the compiled kernels: slices start at multiples of
SLICE_ALIGN positions, as the attention kernel's tiles of queries do in one pass), and hands each slice's intermediates (the residual stream after every layer, the attention probabilities
of the layers asked for) to its own `reduce_*` methods, which keep only what the answer needs. So an inspection
holds its answer and one slice's work, never every layer's (n_heads, T, T) attention or a (T, vocab) table, and a
server can run it between two decode steps (engine.generation.serving.ServingLoop.submit_work) without stalling
them. `bytes_needed` is the memory it will take, answer included, checked against `max_bytes` before it starts.
"""
from __future__ import annotations

import numpy as np

from engine.errors import EngineError
from engine.runtime.batch import SequenceStep
from engine.runtime.numpy_backend import NumpyBackend

FLOAT32_BYTES, FLOAT64_BYTES = 4, 8
INSPECTION_MEMORY_LIMIT = 512 << 20  # the server's default --trace-memory-limit: a whole 2,048-token window of
# TinyLlama (attention map and summary, or lens) takes about half of it
DEFAULT_ROWS = 256  # positions per slice when nobody asks for fewer (a library call runs them back to back)
SLICE_ALIGN = 8  # a slice's positions: a multiple of this (the last excepted), so its rows' bits are one pass's


class SlicedTrace:
    """A traced forward over `ids` a slice at a time; subclasses reduce each slice (see the module docstring).

    max_bytes: the most memory it may take (its KV cache, what it keeps, one slice's work, and `answer_bytes` more
    for what its caller builds from it); EngineError naming both sizes when even one row per slice would not fit.
    """

    def __init__(self, model, ids, max_bytes: int, answer_bytes: int = 0):
        if not isinstance(model.backend, NumpyBackend):
            raise EngineError(f"inspection runs on the numpy backend only (this model runs on {model.backend.name}); "
                              "load it with backend='numpy'")
        self.model = model
        self.ids = [int(t) for t in ids]
        if not self.ids:
            raise EngineError("cannot trace an empty prompt")
        config = model.config
        self.config = config
        fixed = (self.kv_bytes(config, len(self.ids)) + self.kept_bytes() + answer_bytes
                 + config.vocab_size * FLOAT32_BYTES)  # a slice's one row of logits (its last position's)
        per_row = self.row_bytes() + activation_bytes(config)
        needed = fixed + SLICE_ALIGN * per_row
        self.bytes_needed = needed  # with the smallest slices
        if needed > max_bytes:
            raise EngineError(f"this inspection would hold {needed / 1e6:.1f} MB ({len(self.ids)} tokens), above the "
                              f"{max_bytes / 1e6:.1f} MB limit: inspect a shorter text")
        self.max_rows = (max_bytes - fixed) // per_row // SLICE_ALIGN * SLICE_ALIGN
        self.cache = None  # allocated by the first slice (a job may wait its turn holding nothing)
        self.done = 0  # positions traced so far
        self.start = 0  # the first position of the slice running now

    @staticmethod
    def kv_bytes(config, n_tokens: int) -> int:
        """Bytes of a KV cache reserved for n_tokens (whole blocks of 128)."""
        capacity = min(config.max_position_embeddings, -(-n_tokens // 128) * 128)
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * capacity * FLOAT32_BYTES

    def kept_bytes(self) -> int:
        """Bytes of what the inspection keeps across slices (its answer's arrays)."""
        return 0

    def allocate(self) -> None:
        """Allocate what the inspection keeps across slices (called before the first slice runs)."""

    def row_bytes(self) -> int:
        """Bytes one more position in a slice takes while the slice runs (beyond the forward's activations)."""
        return 0

    @property
    def finished(self) -> bool:
        """Whether every position has been traced."""
        return self.done >= len(self.ids)

    def run_slice(self, rows: int = DEFAULT_ROWS) -> bool:
        """Trace the next `rows` positions (rounded down to a multiple of SLICE_ALIGN, at least that, at most
        max_rows) -> whether every position is now traced."""
        if self.finished:
            return True
        n = min(max(SLICE_ALIGN, rows // SLICE_ALIGN * SLICE_ALIGN), self.max_rows, len(self.ids) - self.done)
        if self.done == 0:
            self.cache = self.model.new_cache()
            self.cache.reserve(len(self.ids))  # all at once: no growth (and no copy) while slices run
            self.allocate()
        self.start = self.done
        step = SequenceStep(self.cache, self.ids[self.done:self.done + n])
        self.model.backend.forward([step], recorder=self)
        self.done += n
        if self.finished:
            self.cache = None  # the KV is no longer needed: give it back before the answer is built
        return self.finished

    def run(self):
        """Run every slice -> result()."""
        while not self.run_slice():
            pass
        return self.result()

    def result(self):
        """What the inspection computed (once finished)."""
        raise NotImplementedError

    # ---- the backend's recorder interface (engine.runtime.trace.TraceRecorder's methods) ------------------------
    def wants_attention(self, layer: int) -> bool:
        """Whether the forward should compute layer `layer`'s attention probabilities for this slice."""
        return False

    def record_hidden(self, index: int, x: np.ndarray) -> None:
        """hidden_states[index] of this slice's rows: x (rows, hidden) float32 (0: embeddings; L: final-normed)."""
        self.reduce_hidden(index, x)

    def record_attention(self, layer: int, probs: np.ndarray) -> None:
        """Layer `layer`'s probabilities for this slice's queries: (n_heads, rows, start + rows) float32."""
        self.reduce_attention(layer, probs)

    def reduce_hidden(self, index: int, x: np.ndarray) -> None:
        """Keep what the answer needs of a slice's residual stream (see record_hidden)."""

    def reduce_attention(self, layer: int, probs: np.ndarray) -> None:
        """Keep what the answer needs of a slice's attention probabilities (see record_attention)."""


def activation_bytes(config) -> int:
    """Bytes one position takes in a traced forward's activations (residual stream, norms, q/k/v, MLP, attention
    output), with room for temporaries."""
    c = config
    return (4 * c.hidden_size + 2 * (c.q_size + 2 * c.kv_size) + 3 * c.intermediate_size + c.q_size) * FLOAT32_BYTES
