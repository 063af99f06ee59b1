"""Recording a forward pass: the `Trace` it produces and the `TraceRecorder` the NumPy backend hands its intermediates.

A traced forward is the backend's own forward (`NumpyBackend.forward(steps, recorder=...)`), with the recorder
called at a few points of the layer loop; with `recorder=None` (every normal call) nothing is recorded or computed
twice. Indices follow transformers (`output_hidden_states` / `output_attentions` under eager attention):

- hidden_states[0] is the embeddings, hidden_states[i] the residual stream after layer i-1 (the input of layer i),
  hidden_states[L] the last layer's output after the final RMSNorm (so lm_head(hidden_states[L]) = logits);
- attentions[i] is layer i's post-softmax probabilities (n_heads, T, T), query head h reading KV head h // group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.config import ModelConfig
from engine.errors import EngineError

TRACE_MEMORY_LIMIT = 4 << 30  # bytes a trace may hold: every layer's attention of TinyLlama at 2048 tokens is 11.8 GB
FLOAT32_BYTES = 4


@dataclass
class Trace:
    """One recorded forward pass over a prompt of T tokens (L layers); arrays are float32 NumPy.

    token_ids: (T,) int64; logits: (T, vocab).
    attentions: None unless asked for; else a list of L entries, entry i (n_heads, T, T) for a recorded layer (rows
      sum to 1, exact zeros above the diagonal) and None for a layer left out by `layers=`.
    hidden_states: None unless asked for; else a list of L + 1 entries (T, hidden), None where left out.
    """

    token_ids: np.ndarray
    logits: np.ndarray
    attentions: list[np.ndarray | None] | None = None
    hidden_states: list[np.ndarray | None] | None = None
    layers: tuple[int, ...] = field(default=())  # the indices recorded (0..L; L has a hidden state only)


def recorded_layers(n_layers: int, layers) -> tuple[int, ...]:
    """`layers` (None: all; ints, negative counting from the end of 0..L) -> sorted indices in 0..L.

    Index i names attentions[i] (i < L) and hidden_states[i]; EngineError for anything out of range.
    """
    if layers is None:
        return tuple(range(n_layers + 1))
    if isinstance(layers, (int, np.integer)):
        layers = [layers]
    chosen = set()
    for value in layers:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise EngineError(f"layers= takes layer indices (ints), got {value!r}")
        index = int(value) + (n_layers + 1 if value < 0 else 0)
        if not 0 <= index <= n_layers:
            raise EngineError(f"layer {value} is out of range: this model has layers 0..{n_layers - 1} "
                              f"(and hidden state {n_layers}, after the final norm)")
        chosen.add(index)
    return tuple(sorted(chosen))


def trace_bytes(config: ModelConfig, n_tokens: int, attentions: bool, hidden_states: bool,
                layers: tuple[int, ...]) -> int:
    """Bytes a trace of `n_tokens` will hold: logits, plus (n_heads, T, T) per attention and (T, hidden) per state."""
    total = n_tokens * config.vocab_size
    if attentions:
        total += sum(1 for i in layers if i < config.num_hidden_layers) * config.num_attention_heads * n_tokens ** 2
    if hidden_states:
        total += len(layers) * n_tokens * config.hidden_size
    return total * FLOAT32_BYTES


class TraceRecorder:
    """Collects what one traced forward pass hands it (one sequence; the backend calls the `record_*` methods)."""

    def __init__(self, config: ModelConfig, n_tokens: int, attentions: bool = False, hidden_states: bool = False,
                 layers=None, max_bytes: int = TRACE_MEMORY_LIMIT):
        """Check the request and its size first: EngineError (one line) above `max_bytes`."""
        n_layers = config.num_hidden_layers
        self.layers = recorded_layers(n_layers, layers)
        needed = trace_bytes(config, n_tokens, attentions, hidden_states, self.layers)
        if needed > max_bytes:
            raise EngineError(
                f"this trace would hold {needed / 1e9:.2f} GB ({n_tokens} tokens), above the {max_bytes / 1e9:.2f} GB "
                f"limit: record fewer layers with layers=[...] or use a shorter prompt (or raise max_bytes=)")
        self.n_layers = n_layers
        self.attentions: list | None = [None] * n_layers if attentions else None
        self.hidden_states: list | None = [None] * (n_layers + 1) if hidden_states else None
        self._attention_layers = frozenset(i for i in self.layers if i < n_layers) if attentions else frozenset()
        self._hidden_layers = frozenset(self.layers) if hidden_states else frozenset()

    def wants_attention(self, layer: int) -> bool:
        """Whether layer `layer`'s attention probabilities are to be recorded."""
        return layer in self._attention_layers

    def record_hidden(self, index: int, x: np.ndarray) -> None:
        """hidden_states[index] = x (T, hidden) float32 (index 0..L, transformers' convention); copied."""
        if index in self._hidden_layers:
            self.hidden_states[index] = np.array(x, dtype=np.float32, copy=True)

    def record_attention(self, layer: int, probs: np.ndarray) -> None:
        """attentions[layer] = probs (n_heads, T, T) float32, post-softmax."""
        if layer in self._attention_layers:
            self.attentions[layer] = np.ascontiguousarray(probs, dtype=np.float32)

    def result(self, token_ids: np.ndarray, logits: np.ndarray) -> Trace:
        """The Trace of this recording, with the forward's token ids (T,) and logits (T, vocab)."""
        return Trace(token_ids=np.asarray(token_ids, dtype=np.int64), logits=logits, attentions=self.attentions,
                     hidden_states=self.hidden_states, layers=self.layers)
