"""One sequence's generation state above the backend seam: options, results, sampling and stop detection per token.

`SequenceState.accept(logits)` is the per-token step every way of generating shares (a lone sequence, the
scheduler's batch, speculative verification): sample, record, detect EOS / stop strings / length / a full window.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.errors import ContextOverflowError, EngineError
from engine.generation.constraints import (CONSTRAINT_FIELDS, STOP_CONSTRAINT_DONE, STOP_CONSTRAINT_ERROR, Constraint,
                                           make_constraint)
from engine.generation.sampling import SamplingParams, make_rng, sample_token
from engine.text.stopping import StopStringFilter

STOP_EOS = "eos"
STOP_STRING = "stop_string"
STOP_MAX_TOKENS = "max_new_tokens"
STOP_CONTEXT_FULL = "context_full"
STOP_CANCELLED = "cancelled"
CONTEXT_TOKENS = 8


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate: length, sampling, and stop conditions (eos_ids None: the model's own EOS ids)."""

    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_strings: tuple[str, ...] = ()
    eos_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # record each token's log-probability and this many top alternatives; None: none
    constraint: Constraint | None = None  # structured output (engine.generation.constraints); None: free text
    # score the prompt (engine.generation.scoring): each prompt token's log-probability and this many alternatives;
    # None: not scored. Only a scoring request may set max_new_tokens=0 (score the prompt, generate nothing).
    prompt_logprobs: int | None = None

    def __post_init__(self):
        least = 0 if self.prompt_logprobs is not None else 1  # 0: score the prompt, generate nothing
        count = self.max_new_tokens
        if isinstance(count, bool) or not isinstance(count, int) or count < least:
            raise EngineError(f"max_new_tokens must be an integer >= {least}, got {self.max_new_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise EngineError(f"{name} must be None or an integer >= 0, got {value!r}")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw logits (before any sampling processor), and the `top` most
    likely tokens as (id, log-probability) pairs, most likely first (ties: lower id first); `rank` (a scored prompt
    token's): 1 + how many tokens were more likely."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None


@dataclass
class TokenEvent:
    """One generated token and the text it made final (may be '' while a character or stop string is incomplete);
    `logprob` only when the options asked for log-probabilities."""

    token_id: int
    text: str
    logprob: TokenLogprob | None = None
    # a request's first token, when its options asked to score the prompt: one entry per prompt token (None first)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class GenerationResult:
    """A finished generation: new token ids, their text (stop string and EOS excluded), why it stopped, timings."""

    token_ids: list[int]
    text: str
    stop_reason: str
    prompt_token_ids: list[int]
    prefill_tokens: int = 0  # tokens run through the model before the first new token (< prompt when a cache is re-used)
    prefill_seconds: float = 0.0
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0  # from the first new token to the last
    draft_tokens: int = 0  # speculative decoding: draft tokens proposed (prompt lookup or a draft model) ...
    accepted_draft_tokens: int = 0  # ... and how many of them the model confirmed
    draft_steps: int = 0  # decode steps that verified draft tokens ...
    plain_steps: int = 0  # ... and, with speculation on, those that ran plain (drafting did not pay, or found nothing)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when the options asked for them
    cached_tokens: int = 0  # prompt tokens restored from a prefix cache instead of prefilled
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when the options asked: one per prompt token (None first)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of speculative draft tokens the model accepted (0.0 without drafts)."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        """Prefill speed: prefill_tokens over prefill_seconds (0.0 when no time was measured)."""
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def generated_tokens_per_s(self) -> float:
        """Decode speed: tokens after the first, over the time they took."""
        n = len(self.token_ids) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def default_options(model, **overrides) -> GenerationOptions:
    """GenerationOptions from the model's generation_config.json defaults, with `overrides` (sampling fields too)."""
    gen = getattr(model, "generation_config", {}) or {}
    sampling_fields = {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "presence_penalty",
                       "frequency_penalty", "logit_bias"}
    sampling = {}
    if gen.get("do_sample"):
        for key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
            if gen.get(key) is not None:
                sampling[key] = gen[key]
    elif gen.get("repetition_penalty") is not None:
        sampling["repetition_penalty"] = gen["repetition_penalty"]
    sampling.update({k: v for k, v in overrides.items() if k in sampling_fields and v is not None})
    constraint_fields = (*CONSTRAINT_FIELDS, "json_object", "json_whitespace")
    wanted = {k: overrides.pop(k) for k in constraint_fields if k in overrides}
    rest = {k: v for k, v in overrides.items() if k not in sampling_fields and v is not None}
    if "stop" in rest:
        stop = rest.pop("stop")
        rest["stop_strings"] = (stop,) if isinstance(stop, str) else tuple(stop)
    try:
        params = SamplingParams(**sampling)
    except ValueError as e:
        raise EngineError(str(e)) from None
    options = GenerationOptions(sampling=params, **rest)
    if any(v is not None and v is not False for v in wanted.values()):
        tokenizer = _tokenizer_or_none(model)
        if tokenizer is None:
            raise EngineError("constraints need the model's tokenizer (tokenizer.json), which this model folder lacks")
        constraint = make_constraint(tokenizer, model.config.vocab_size, constraint_eos_ids(model, options), **wanted)
        options = GenerationOptions(sampling=params, constraint=constraint, **rest)
    return options


def constraint_eos_ids(model, options: GenerationOptions) -> tuple[int, ...]:
    """The EOS ids a constraint for these options is compiled with: none with ignore_eos, else the options' own or
    the model's (eos_ids_of)."""
    if options.ignore_eos:
        return ()
    return tuple(options.eos_ids if options.eos_ids is not None else eos_ids_of(model))


def eos_ids_of(model) -> tuple[int, ...]:
    """EOS ids from config.json, generation_config.json and the tokenizer, in that order, without repeats."""
    ids = list(model.config.eos_token_ids)
    gen = getattr(model, "generation_config", {}) or {}
    eos = gen.get("eos_token_id")
    ids += eos if isinstance(eos, list) else ([] if eos is None else [eos])
    tokenizer = _tokenizer_or_none(model)
    if tokenizer is not None:
        ids += list(tokenizer.eos_ids)
    return tuple(dict.fromkeys(ids))


class SequenceState:
    """One sequence's generation state: sampling RNG, generated ids, streamed text, stop detection."""

    def __init__(self, model, prompt_ids: list[int], options: GenerationOptions, cache):
        self.options = options
        self.cache = cache
        self.max_length = model.config.max_position_embeddings
        self.prompt_ids = list(prompt_ids)
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if options.logprobs is not None else None
        self.text_parts: list[str] = []
        self.stop_reason: str | None = None
        self.rng = make_rng(options.sampling.seed)
        self.eos = set() if options.ignore_eos else set(options.eos_ids if options.eos_ids is not None else eos_ids_of(model))
        tokenizer = _tokenizer_or_none(model)
        if options.stop_strings and tokenizer is None:
            raise EngineError("stop strings need the model's tokenizer (tokenizer.json), which this model folder lacks")
        # The prompt's last tokens give the text its context (a leading space after the prompt, none after a newline).
        self.decoder = (tokenizer.stream_decoder(skip_special_tokens=True, context_ids=self.prompt_ids[-CONTEXT_TOKENS:])
                        if tokenizer is not None else None)
        self.stops = StopStringFilter(options.stop_strings)
        self.constraint = options.constraint.start() if options.constraint is not None else None

    @property
    def finished(self) -> bool:
        """Whether a stop reason has been set."""
        return self.stop_reason is not None

    def accept(self, logits: np.ndarray, context_length: int | None = None) -> TokenEvent:
        """Sample the next token from logits (vocab,), record it, and decide whether the sequence stops here.

        context_length: tokens the logits were computed from (default: the cache's length; a verification step
        passes each row's own position).
        """
        allowed = logits if self.constraint is None else self.constraint.apply(logits)
        token = sample_token(allowed, self.options.sampling, self.rng, self.prompt_ids + self.generated,
                             generated_ids=self.generated)
        self.generated.append(token)
        if self.constraint is not None:
            self.constraint.consume(token)
        logprob = None
        if self.logprobs is not None:
            logprob = token_logprob(logits, token, self.options.logprobs)
            self.logprobs.append(logprob)
        text = ""
        if token in self.eos:
            self.stop_reason = STOP_EOS
        elif self.decoder is not None:
            text, hit = self.stops.push(self.decoder.push(token))
            if hit:
                self.stop_reason = STOP_STRING
        if self.stop_reason is None and self.constraint is not None:
            self.stop_reason = self.constraint.stop_reason  # complete, or (a matcher limit) no token allowed
        if self.stop_reason is None:
            if len(self.generated) >= self.options.max_new_tokens:
                self.stop_reason = STOP_MAX_TOKENS
            elif (self.cache.length if context_length is None else context_length) >= self.max_length:
                self.stop_reason = STOP_CONTEXT_FULL
        if self.stop_reason in (STOP_MAX_TOKENS, STOP_CONTEXT_FULL, STOP_EOS, STOP_CONSTRAINT_DONE,
                                STOP_CONSTRAINT_ERROR) and self.decoder is not None:
            text += self.stops.push(self.decoder.flush())[0] + self.stops.flush()
        self.text_parts.append(text)
        return TokenEvent(token, text, logprob)

    def cancel(self) -> None:
        """Stop with reason 'cancelled', unless the sequence has already stopped."""
        if self.stop_reason is None:
            self.stop_reason = STOP_CANCELLED

    @property
    def text(self) -> str:
        """All text streamed so far, joined."""
        return "".join(self.text_parts)


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The exact log-softmax (float64) of one raw logits row (vocab,) at `token`, and its `top` best entries."""
    row = np.asarray(logits, dtype=np.float64)
    peak = row.max()
    logprobs = row - (peak + np.log(np.exp(row - peak).sum()))
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        k = min(top, row.shape[0])
        candidates = np.argpartition(-logprobs, k - 1)[:k]
        # the k largest, most likely first; among equal values the lower id first (a stable, documented order)
        order = np.lexsort((candidates, -logprobs[candidates]))
        best = tuple((int(candidates[i]), float(logprobs[candidates[i]])) for i in order)
    return TokenLogprob(float(logprobs[token]), best)


def _tokenizer_or_none(model):
    try:
        return model.tokenizer
    except Exception:  # noqa: BLE001 - a model folder without tokenizer files generates ids only
        return None


def check_prompt(model, prompt_ids, truncate: bool = False, max_new_tokens: int = 1) -> list[int]:
    """Validate a prompt's ids (list of ints) -> the ids to run.

    A prompt must leave room for at least one new token in the window (else ContextOverflowError), unless
    max_new_tokens is 0 (scoring the prompt only: it may fill the window). With `truncate`
    the oldest tokens are dropped so that prompt + max_new_tokens fits the window (at least one token is kept):
    the one rule of `truncate=True` in the API and `--truncate` on the command line.
    """
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise EngineError("the prompt is empty: give at least one token")
    vocab = model.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise EngineError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    window = model.config.max_position_embeddings
    if truncate:
        keep = max(1, window - max_new_tokens)
        return ids[len(ids) - keep:] if len(ids) > keep else ids
    if len(ids) + min(max_new_tokens, 1) > window:
        raise ContextOverflowError(
            f"the prompt has {len(ids)} tokens but the context window is {window} "
            f"(at most {window - 1} leave room to generate); shorten it or use --truncate"
        )
    return ids
