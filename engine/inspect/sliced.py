"""A traced forward pass run a slice of positions at a time, reduced as it goes: the base of the inspections.

`SlicedTrace` runs a prompt through the model a few positions at a time over a KV cache of its own (the same
computation as one whole pass, to the bit with the compiled kernels: slices start at multiples of SLICE_ALIGN
positions, as the attention kernel's tiles of queries do in one pass), and hands each slice's intermediates (the
residual stream after every layer, the attention probabilities of the layers asked for) to its own `reduce_*`
methods, which keep only what the answer needs, or leave work for later (`pending_rows` / `reduce_pending`: the
lens reads each layer's rows apart). `run_slice(budget)` works for about `budget` seconds, in pieces sized from
their measured cost per row (at least one smallest piece). So an inspection holds its answer and one slice's work,
never every layer's (n_heads, T, T) attention or a (T, vocab) table, and a server can run it between two decode
steps (engine.generation.serving.ServingLoop.submit_work) without stalling them. `bytes_needed` is the memory it will take, answer included, checked against `max_bytes` before it starts.
"""
from __future__ import annotations

import math
import time

import numpy as np

from engine.errors import EngineError
from engine.runtime.batch import SequenceStep
from engine.runtime.numpy_backend import NumpyBackend

FLOAT32_BYTES, FLOAT64_BYTES = 4, 8
INSPECTION_MEMORY_LIMIT = 512 << 20  # the server's default --trace-memory-limit: a whole 2,048-token window of
# TinyLlama (attention map and summary, or lens) takes about half of it
DEFAULT_ROWS = 256  # positions per slice when nobody asks for fewer (a library call runs them back to back)
SLICE_ALIGN = 4  # a slice's positions: a multiple of this (the last excepted), so its rows' bits are one pass's
COST_WEIGHT = 0.5  # the weight of the latest piece in the running cost per row


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
        self.costs: dict[str, float] = {}  # seconds per row of a forward piece and of a pending piece

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
        """Whether every position has been traced and reduced."""
        return self.done >= len(self.ids) and not self.pending_rows()

    def pending_rows(self) -> int:
        """Rows of reduction left from the last forward piece (0: none; see reduce_pending)."""
        return 0

    def reduce_pending(self, rows: int) -> None:
        """Do about `rows` rows of the pending reduction."""

    def run_slice(self, budget: float = math.inf) -> bool:
        """Work for about `budget` seconds (at least one smallest piece: SLICE_ALIGN positions, or one row of a
        pending reduction), in pieces sized from their measured cost -> whether everything is done."""
        started = time.perf_counter()
        first = True
        while not self.finished:
            left = budget - (time.perf_counter() - started)
            pending = self.pending_rows()
            kind = "pending" if pending else "forward"
            if pending:
                rows = self._rows_within(left, kind, 1, pending)
            else:
                rows = self._rows_within(left, kind, SLICE_ALIGN, min(self.max_rows, len(self.ids) - self.done))
                if rows < len(self.ids) - self.done:
                    rows = rows // SLICE_ALIGN * SLICE_ALIGN
            if not rows:
                if not first:
                    break
                rows = 1 if pending else min(SLICE_ALIGN, len(self.ids) - self.done)
            t = time.perf_counter()
            if pending:
                self.reduce_pending(rows)
            else:
                self._forward(rows)
            cost = (time.perf_counter() - t) / rows
            self.costs[kind] = cost if kind not in self.costs else cost + COST_WEIGHT * (self.costs[kind] - cost)
            first = False
        return self.finished

    def _rows_within(self, left: float, kind: str, smallest: int, most: int) -> int:
        """Rows of a `kind` piece that fit `left` seconds (0 when not even `smallest` do; the smallest piece while
        its cost is unknown)."""
        if kind not in self.costs:
            return min(smallest, most)
        if math.isinf(left):
            return most
        fit = int(left / max(self.costs[kind], 1e-9))
        return min(fit, most) if fit >= min(smallest, most) else 0

    def _forward(self, n: int) -> None:
        """The traced forward of the next n positions."""
        if self.done == 0:
            self.cache = self.model.new_cache()
            self.cache.reserve(len(self.ids))  # all at once: no growth (and no copy) while slices run
            self.allocate()
        self.start = self.done
        step = SequenceStep(self.cache, self.ids[self.done:self.done + n])
        self.model.backend.forward([step], recorder=self)
        self.done += n
        if self.done >= len(self.ids):
            self.cache = None  # the KV is no longer needed: give it back before the answer is built

    def run(self):
        """Run every piece back to back -> result()."""
        self.run_slice()
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
