"""Next-token selection: logits processors with transformers' semantics, and sampling.

Every processor is pure: it takes a (vocab,) float32 logits row and returns a new (vocab,)
float32 row in which removed tokens are -inf. `process_logits` chains them in the order
`transformers.GenerationMixin._get_logits_processor` uses when sampling:
repetition penalty -> temperature -> top-k -> top-p -> min-p, with OpenAI's presence / frequency
penalties (which transformers lacks) between the repetition penalty and the temperature, and OpenAI's
logit_bias (token id -> bias in [-100, 100] added to the raw logits; -100 bans the token) first of all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

__all__ = [
    "SamplingError",
    "SamplingParams",
    "apply_logit_bias",
    "apply_repetition_penalty",
    "apply_presence_frequency_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "apply_min_p",
    "process_logits",
    "probabilities",
    "sample_token",
    "make_rng",
]

_REMOVED = np.float32(-np.inf)


class SamplingError(ValueError):
    """An invalid sampling parameter."""


def _is_real_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token; the defaults mean greedy decoding."""

    temperature: float = 0.0  # 0 => greedy
    top_k: int = 0  # 0 => disabled
    top_p: float = 1.0  # in (0, 1]; 1 => disabled
    min_p: float = 0.0  # in [0, 1]; 0 => disabled
    repetition_penalty: float = 1.0  # > 0; 1 => disabled
    seed: int | None = None
    presence_penalty: float = 0.0  # in [-2, 2] (OpenAI's range); 0 => disabled; counts generated tokens only
    frequency_penalty: float = 0.0  # in [-2, 2]; 0 => disabled; counts generated tokens only
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) pairs; -100 bans the token

    def __post_init__(self) -> None:
        """Reject bad values with a one-line SamplingError naming the field and the value."""
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))
        for pair in self.logit_bias:
            token, bias = pair if isinstance(pair, tuple) and len(pair) == 2 else (None, None)
            if not isinstance(token, (int, np.integer)) or isinstance(token, bool) or token < 0:
                raise SamplingError(f"logit_bias: keys must be token ids (integers >= 0), got {pair!r}")
            if not _is_real_number(bias) or not -100 <= bias <= 100:
                raise SamplingError(f"logit_bias: a bias must be a number in [-100, 100], got {bias!r} for {token}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real_number(value) or not math.isfinite(value):
                raise SamplingError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty <= 0:
            raise SamplingError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool)
                                      or self.seed < 0):
            raise SamplingError(f"seed must be an integer >= 0 or None, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SamplingError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")

    @property
    def penalizes_presence(self) -> bool:
        """True when a presence or frequency penalty is set (they need the generated token ids)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature == 0)."""
        return self.temperature == 0


def _as_logits(logits) -> np.ndarray:
    row = np.asarray(logits)
    if row.ndim != 1:
        raise SamplingError(f"logits must be one row of shape (vocab,), got shape {row.shape}")
    return row.astype(np.float32, copy=False)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax in the logits' own dtype; -inf entries get probability 0."""
    shifted = logits - logits.max()
    exp = np.exp(shifted)
    return exp / exp.sum(dtype=exp.dtype)


def apply_logit_bias(logits, bias: tuple[tuple[int, float], ...]) -> np.ndarray:
    """logits: (vocab,) float32 -> (vocab,) float32 with each (token id, bias) added; a bias of -100 makes the token
    -inf (banned), as OpenAI documents it; ids outside [0, vocab) are ignored."""
    row = _as_logits(logits)
    out = row.copy()
    for token, value in bias:
        if 0 <= token < row.shape[0]:
            out[token] = _REMOVED if value <= -100 else np.float32(row[token] + np.float32(value))
    return out


def apply_repetition_penalty(logits, previous_ids: Iterable[int], penalty: float) -> np.ndarray:
    """logits: (vocab,) float32 -> (vocab,) float32; each id seen once or more: x<0 ? x*penalty : x/penalty.

    Ids outside [0, vocab) are ignored, as transformers ignores ids the output layer cannot produce.
    """
    row = _as_logits(logits)
    out = row.copy()
    if penalty == 1.0:
        return out
    ids = np.fromiter((int(i) for i in previous_ids), dtype=np.int64)
    ids = np.unique(ids[(ids >= 0) & (ids < row.shape[0])])
    if ids.size == 0:
        return out
    seen = row[ids]
    factor = np.float32(penalty)
    out[ids] = np.where(seen < 0, seen * factor, seen / factor)
    return out


def apply_presence_frequency_penalty(logits, generated_ids: Iterable[int], presence_penalty: float,
                                     frequency_penalty: float) -> np.ndarray:
    """logits: (vocab,) float32 -> (vocab,) float32 with OpenAI's penalties on the generated tokens.

    logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0), where count[t] is how often t
    occurs in `generated_ids`. Callers pass the tokens generated so far, not the prompt (vLLM's choice; OpenAI
    does not say). Computed in float64, rounded once to float32. Ids outside [0, vocab) are ignored.
    """
    row = _as_logits(logits)
    out = row.copy()
    if presence_penalty == 0 and frequency_penalty == 0:
        return out
    ids = np.fromiter((int(i) for i in generated_ids), dtype=np.int64)
    ids = ids[(ids >= 0) & (ids < row.shape[0])]
    if ids.size == 0:
        return out
    seen, counts = np.unique(ids, return_counts=True)
    penalty = float(frequency_penalty) * counts.astype(np.float64) + float(presence_penalty)
    out[seen] = (row[seen].astype(np.float64) - penalty).astype(np.float32)
    return out


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """logits: (vocab,) float32 -> (vocab,) float32 divided by temperature (> 0)."""
    if not temperature > 0:
        raise SamplingError(f"temperature for scaling must be > 0, got {temperature!r}")
    return _as_logits(logits) / np.float32(temperature)


def apply_top_k(logits, top_k: int) -> np.ndarray:
    """logits: (vocab,) float32 -> (vocab,) float32 keeping every token >= the k-th largest (ties kept)."""
    if int(top_k) < 1:
        raise SamplingError(f"top_k for filtering must be >= 1, got {top_k!r}")
    row = _as_logits(logits)
    k = min(int(top_k), row.shape[0])
    kth_largest = np.partition(row, row.shape[0] - k)[row.shape[0] - k]
    return np.where(row < kth_largest, _REMOVED, row).astype(np.float32, copy=False)


def apply_top_p(logits, top_p: float) -> np.ndarray:
    """logits: (vocab,) float32 -> (vocab,) float32 keeping the smallest top set whose mass reaches top_p.

    Like transformers: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p,
    always keep the most likely token; the token that crosses the threshold is kept. Ties at the
    boundary (where torch's unstable sort decides) keep the lower ids first.
    """
    row = _as_logits(logits)
    # ascending by logit; among equal logits the lower id sorts last, so it is kept first (like argmax)
    order = np.lexsort((-np.arange(row.shape[0]), row))
    cumulative = np.cumsum(_softmax(row[order]), dtype=np.float32)
    remove_sorted = cumulative <= np.float32(1 - float(top_p))
    remove_sorted[-1] = False  # min_tokens_to_keep = 1
    remove = np.empty_like(remove_sorted)
    remove[order] = remove_sorted
    return np.where(remove, _REMOVED, row).astype(np.float32, copy=False)


def apply_min_p(logits, min_p: float) -> np.ndarray:
    """logits: (vocab,) float32 -> (vocab,) float32 dropping tokens with prob < min_p * max prob (top token kept)."""
    row = _as_logits(logits)
    probs = _softmax(row)
    remove = probs < np.float32(min_p) * probs.max()
    remove[np.argmax(probs)] = False
    return np.where(remove, _REMOVED, row).astype(np.float32, copy=False)


def process_logits(logits, params: SamplingParams, previous_ids: Iterable[int] = (),
                   generated_ids: Iterable[int] = ()) -> np.ndarray:
    """logits: (vocab,) -> (vocab,) float32 after every enabled processor, in transformers' sampling order.

    previous_ids: the whole context (prompt + generated) for the repetition penalty; generated_ids: the generated
    part alone, for the presence / frequency penalties. For greedy params only the penalties apply (transformers
    applies warpers only when sampling).
    """
    row = _penalized(logits, params, previous_ids, generated_ids)
    if params.greedy:
        return row
    if params.temperature != 1.0:
        row = apply_temperature(row, params.temperature)
    if params.top_k != 0:
        row = apply_top_k(row, params.top_k)
    if params.top_p < 1.0:
        row = apply_top_p(row, params.top_p)
    if params.min_p > 0.0:
        row = apply_min_p(row, params.min_p)
    return row


def _penalized(logits, params: SamplingParams, previous_ids, generated_ids) -> np.ndarray:
    """The logit bias, the repetition penalty, then the presence / frequency penalties: (vocab,) -> (vocab,) float32."""
    if params.logit_bias:
        logits = apply_logit_bias(logits, params.logit_bias)
    row = apply_repetition_penalty(logits, previous_ids, params.repetition_penalty)
    if params.penalizes_presence:
        row = apply_presence_frequency_penalty(row, generated_ids, params.presence_penalty, params.frequency_penalty)
    return row


def probabilities(logits, params: SamplingParams, previous_ids: Iterable[int] = (),
                  generated_ids: Iterable[int] = ()) -> np.ndarray:
    """logits: (vocab,) -> (vocab,) float64 distribution (sums to 1) after `process_logits`."""
    processed = process_logits(logits, params, previous_ids, generated_ids).astype(np.float64)
    return _softmax(processed)


def sample_token(
    logits, params: SamplingParams, rng: np.random.Generator, previous_ids: Iterable[int] = (),
    generated_ids: Iterable[int] = (),
) -> int:
    """logits: (vocab,) -> token id; greedy: argmax after the penalties, else a draw from `probabilities`.

    previous_ids: prompt + generated ids (repetition penalty); generated_ids: generated ids (presence / frequency).
    """
    previous_ids = tuple(previous_ids)
    if params.greedy:
        return int(np.argmax(_penalized(logits, params, previous_ids, generated_ids)))
    probs = probabilities(logits, params, previous_ids, generated_ids)
    return int(rng.choice(probs.shape[0], p=probs))


def make_rng(seed: int | None) -> np.random.Generator:
    """A NumPy Generator; the same seed gives the same stream of draws, None gives fresh entropy."""
    return np.random.default_rng(seed)
