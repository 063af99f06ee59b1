"""Structured output: a constraint (JSON Schema, regex, choice, grammar) as a mask over the next token's logits.

The grammar engine is llguidance: it compiles the constraint against the model's tokenizer and, for each position,
writes a bitmask of the tokens that keep the output inside the language. Disallowed logits become -inf and every
allowed logit stays exactly as the model computed it, so the sampling pipeline that follows (penalties, temperature,
top-k/p, min-p, greedy argmax) sees the model's own distribution renormalised over the allowed set, and knows nothing
of where the mask came from.

`make_constraint` compiles what the user asked for into a `Constraint` (shared by every request that uses it);
each sequence follows it with its own `ConstraintState` (one llguidance matcher per request). `MaskBatch` computes the
masks of a whole batch (and of speculative draft positions) in one parallel llguidance call, on a thread while the
forward pass runs: step t's mask depends only on the tokens chosen before it.
"""
from __future__ import annotations

import json
import os
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

import llguidance
import llguidance.numpy as llg_numpy
from llguidance.gbnf_to_lark import any_to_lark

from engine.errors import EngineError
from engine.generation.constraint_limits import (MAX_JSON_NESTING, check_choices, check_grammar, check_schema,
                                                 check_size)
from engine.generation.constraint_worker import on_thread
from engine.generation.json_schemas import prepare_schema

CONSTRAINT_FIELDS = ("json_schema", "regex", "choice", "grammar")
STOP_CONSTRAINT_DONE = "constraint_done"  # the constraint's language admits no further token: the output is complete
STOP_CONSTRAINT_ERROR = "constraint_error"  # the matcher failed (a resource limit): no allowed token is left

_LL_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Tokenizer -> {(vocab, eos): LLTokenizer}
_LOCK = threading.Lock()
COMPILE_STACK_MB = 256  # the stack llguidance compiles on (up to ~5.6 KiB a schema level: 8 MiB failed at 1,508)
MAX_ERROR_CHARS = 400
EMPTY_LANGUAGE = "no text satisfies this constraint (nothing can start it: its language is empty)"
_EXECUTOR = None


class ConstraintError(EngineError):
    """An invalid or unsupported constraint; `field` names the option ("json_schema", "regex", "choice", "grammar")."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled constraint: its kind ("json_schema", "regex", "choice", "grammar"), llguidance's grammar text, and a
    matcher in its start state that every request copies."""

    kind: str
    grammar: str
    prototype: object  # llguidance.LLMatcher, never advanced itself
    vocab_size: int

    def start(self) -> "ConstraintState":
        """A fresh per-sequence state at the start of the constrained text."""
        return ConstraintState(self)


def ll_tokenizer(tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
    """llguidance's view of our Tokenizer with `vocab_size` (the logits' width) and these EOS ids; built once (~0.3 s
    for 32,000 tokens) and cached while the tokenizer lives."""
    key = (vocab_size, tuple(eos_ids))
    with _LOCK:
        per_tokenizer = _LL_TOKENIZERS.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            if tokenizer.vocab_size > vocab_size:
                raise ConstraintError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's output layer "
                                      f"only {vocab_size}: constraints need them to agree", "json_schema")
            per_tokenizer[key] = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size,
                                                        eos_token=list(eos_ids) or None)
        return per_tokenizer[key]


def grammar_for(kind: str, value, json_whitespace: str = "compact") -> str:
    """llguidance's grammar text for one constraint (value as the user gave it); ConstraintError naming `kind` when it
    is malformed before compilation (not JSON, a choice that is not a list of strings, ...) or past a limit of
    engine.generation.constraint_limits (the message names the limit)."""
    try:
        return _grammar_for(kind, value, json_whitespace)
    except RecursionError:  # the limits are checked without recursion; this is Python's JSON reader or writer
        raise ConstraintError(f"{kind}: nested more than {MAX_JSON_NESTING} levels deep (the limit)", kind) from None


def _grammar_for(kind: str, value, json_whitespace: str) -> str:
    if kind == "json_schema":
        if isinstance(value, str):
            _within_limits(kind, check_size, value, "the schema")
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ConstraintError(f"json_schema: not valid JSON: {e}", kind) from None
        if value is False:
            raise ConstraintError("json_schema: the schema false admits no value", kind)
        if value is True:
            value = {}
        if not isinstance(value, dict):
            raise ConstraintError(f"json_schema: must be a JSON object (a schema), got {type(value).__name__}", kind)
        json_whitespace = json_whitespace or "compact"
        if json_whitespace not in ("compact", "flexible"):
            raise ConstraintError(f"json_whitespace: 'compact' or 'flexible', got {json_whitespace!r}",
                                  "json_whitespace")
        _within_limits(kind, check_schema, value)
        try:  # "any JSON" ({}): OpenAI's json_object mode asks for an object, so an empty schema means one
            schema = prepare_schema(value) if value else {"type": "object"}
        except ValueError as e:
            raise ConstraintError(f"json_schema: {e}", kind) from None
        guidance = schema.get("x-guidance") if isinstance(schema.get("x-guidance"), dict) else {}
        schema["x-guidance"] = {"whitespace_flexible": json_whitespace == "flexible", **guidance}
        try:
            text = json.dumps(schema, ensure_ascii=False)
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"json_schema: {e}", kind) from None
        _within_limits(kind, check_size, text, "the schema")
        return _exact("start: %json " + text)
    if kind == "regex":
        if not isinstance(value, str):
            raise ConstraintError(f"regex: must be a string, got {type(value).__name__}", kind)
        _within_limits(kind, check_size, value, "the regex")
        return _exact(json.loads(llguidance.LLMatcher.grammar_from_regex(value))["grammars"][0]["lark_grammar"])
    if kind == "choice":
        if (isinstance(value, str) or not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(c, str) and c for c in value)):
            raise ConstraintError("choice: must be a non-empty list of non-empty strings", kind)
        _within_limits(kind, check_choices, value)
        return _exact("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    if kind == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise ConstraintError("grammar: must be a non-empty Lark or GBNF grammar", kind)
        _within_limits(kind, check_size, value, "the grammar")
        try:
            lark = any_to_lark(value)
        except Exception as e:  # noqa: BLE001 - the GBNF converter raises whatever it meets
            raise ConstraintError(f"grammar: cannot read it as Lark or GBNF: {one_line_error(str(e))}", kind) from None
        _within_limits(kind, check_grammar, lark)
        return _exact(lark)
    raise ConstraintError(f"unknown constraint kind {kind!r}", kind)


def _within_limits(kind: str, check, *args) -> None:
    """Run one check of engine.generation.constraint_limits; its ValueError becomes a ConstraintError naming kind."""
    try:
        check(*args)
    except ValueError as e:
        raise ConstraintError(f"{kind}: {e}", kind) from None


def _exact(lark: str) -> str:
    """A Lark grammar with llguidance's `no_forcing` option: where the grammar leaves one possible continuation,
    every token that spells a prefix of it stays allowed (by default llguidance would allow only the first token of
    its canonical tokenization), so the mask is exactly the set of tokens the grammar allows."""
    if "%llguidance" in lark:
        return lark  # the user's own grammar options win
    return '%llguidance {"no_forcing": true}\n' + lark


def make_constraint(tokenizer, vocab_size: int, eos_ids: tuple[int, ...], json_schema=None, regex=None, choice=None,
                    grammar=None, json_object: bool = False, json_whitespace: str = "compact") -> Constraint | None:
    """The compiled constraint the options ask for, or None when they ask for none.

    json_schema: a schema (dict or JSON text; {} = any JSON object; an object schema with properties and without
    additionalProperties is closed, integers lie within +-2**53: see engine.generation.json_schemas); regex: the
    whole output matches it (Rust regex syntax); choice: the output is one of these strings; grammar: Lark
    (llguidance's syntax) or llama.cpp's GBNF; json_object: any JSON object. At most one. json_whitespace:
    "compact" (no whitespace between JSON tokens, the default) or "flexible". ConstraintError names the field and
    carries llguidance's reason, or the limit (engine.generation.constraint_limits) the constraint is past.
    """
    wanted = constraint_grammar(json_schema=json_schema, regex=regex, choice=choice, grammar=grammar,
                                json_object=json_object, json_whitespace=json_whitespace)
    return None if wanted is None else compile_constraint(tokenizer, vocab_size, eos_ids, *wanted)


def constraint_grammar(json_schema=None, regex=None, choice=None, grammar=None, json_object: bool = False,
                       json_whitespace: str = "compact") -> tuple[str, str] | None:
    """make_constraint's options -> (kind, llguidance grammar text), or None when they ask for no constraint: every
    check that needs no compiler (one constraint at most, well-formed, within the limits), in time linear in the
    constraint's size. ConstraintError names the field."""
    given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("choice", choice),
                               ("grammar", grammar)) if v is not None}
    if json_object:
        if given and "json_schema" not in given:
            raise ConstraintError(f"json_object: cannot be combined with {next(iter(given))}", "json_object")
        given.setdefault("json_schema", {})
    if not given:
        return None
    if len(given) > 1:
        names = list(given)
        raise ConstraintError(f"{names[1]}: give one constraint at a time (also got {names[0]})", names[1])
    (kind, value), = given.items()
    return kind, grammar_for(kind, value, json_whitespace)


def compile_constraint(tokenizer, vocab_size: int, eos_ids: tuple[int, ...], kind: str, grammar: str,
                       verify: Callable[[str, str, tuple], None] | None = None) -> Constraint:
    """Compile one grammar (constraint_grammar's text) against the tokenizer -> Constraint.

    `verify(kind, grammar, eos_ids)`, when given, runs first and raises ConstraintError for a grammar that must not
    be compiled here, or admits no text (the server's compile workers: engine.generation.constraint_compiler). The
    compile runs on a thread with a COMPILE_STACK_MB stack (llguidance recurses on it). A constraint that admits no
    text at all (an empty regex, a rule that only refers to itself) is a ConstraintError, as is every error
    llguidance reports (one line, without its internals)."""
    try:
        ll_tok = ll_tokenizer(tokenizer, vocab_size, eos_ids)
    except ConstraintError as e:
        raise ConstraintError(str(e), kind) from None
    if verify is not None:
        verify(kind, grammar, tuple(eos_ids))  # it checked that the grammar admits some text, too
    matcher = on_big_stack(lambda: llguidance.LLMatcher(ll_tok, grammar, log_level=0))
    if matcher.is_error():
        raise ConstraintError(f"{kind}: {one_line_error(matcher.get_error())}", kind)
    if verify is None and not _admits_text(matcher, vocab_size, eos_ids):
        raise ConstraintError(f"{kind}: {EMPTY_LANGUAGE}", kind)
    return Constraint(kind, grammar, matcher, vocab_size)


def _admits_text(matcher, vocab_size: int, eos_ids: tuple[int, ...]) -> bool:
    """Whether the fresh matcher admits some text: it accepts the empty text, or its first mask allows a token
    other than EOS (llguidance reports an empty language as an error once it computes the first mask)."""
    probe = matcher.deep_copy()
    if probe.is_accepting():
        return True
    mask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)
    llg_numpy.fill_next_token_bitmask(probe, mask, 0)
    allowed = np.unpackbits(mask[0].view(np.uint8), bitorder="little")[:vocab_size].astype(bool)
    allowed[[i for i in eos_ids if i < vocab_size]] = False
    return not probe.is_error() and bool(allowed.any())


def on_big_stack(function: Callable[[], object], stack_mb: int | None = None):
    """function() run on a new thread with a stack of stack_mb MiB (COMPILE_STACK_MB; address space, touched only
    as used) -> its result, its exception re-raised here."""
    return on_thread(function, stack_mb or COMPILE_STACK_MB)


def one_line_error(message: str) -> str:
    """llguidance's error text on one line (a regex error points at the spot over several lines), without internals
    (a Rust panic's backtrace, source paths) and at most MAX_ERROR_CHARS long."""
    if "panic" in message or "backtrace" in message.lower():
        return "the constraint compiler failed on it (an internal limit): make the constraint smaller or simpler"
    lines = [line.strip() for line in message.strip().splitlines()
             if line.strip() and set(line.strip()) != {"^"} and not re.match(r"\d+ \|", line.strip())]
    text = re.sub(r"^at \d+\(\d+\): ", "", "; ".join(lines))  # positions in llguidance's own wrapping grammar
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


class ConstraintState:
    """One sequence's position in its constraint: the matcher (advanced by every accepted token) and the masks
    precomputed for the next positions of this step (the fed token's and each draft token's)."""

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self.matcher = constraint.prototype.deep_copy()
        self.words = (constraint.vocab_size + 31) // 32
        self._masks: np.ndarray | None = None  # (len(draft) + 1, words) int32: row k after consuming draft[:k]
        self._draft: list[int] = []
        self._used = 0  # draft tokens consumed since the masks were computed

    @property
    def stop_reason(self) -> str | None:
        """STOP_CONSTRAINT_ERROR when the matcher failed, STOP_CONSTRAINT_DONE when no token may follow, else None."""
        if self.matcher.is_error():
            return STOP_CONSTRAINT_ERROR
        if self.matcher.is_stopped():
            return STOP_CONSTRAINT_DONE
        return None

    @property
    def error(self) -> str:
        """llguidance's error message ('' when none)."""
        return self.matcher.get_error()

    def cut_draft(self, draft: list[int]) -> list[int]:
        """The longest prefix of `draft` (token ids after the last consumed token) that the constraint allows."""
        return list(draft[:self.matcher.validate_tokens(list(draft))]) if draft else []

    def plan(self, draft: list[int], masks: np.ndarray | None = None) -> np.ndarray:
        """This step's masks for the next token and each of `draft`'s positions -> (len+1, words) int32 (`masks`, a
        view the caller fills, or a new array)."""
        self._draft = list(draft)
        self._used = 0
        self._masks = masks if masks is not None else np.zeros((len(draft) + 1, self.words), dtype=np.int32)
        return self._masks

    def bitmask(self) -> np.ndarray:
        """(words,) int32 bitmask of the tokens allowed next (bit t%32 of word t//32); computed now unless planned."""
        if self._masks is None or self._used >= len(self._masks) or not self._masks[self._used].any():
            mask = self.plan([])  # not planned (or a draft position llguidance left blank): compute it now
            llg_numpy.fill_next_token_bitmask(self.matcher, mask, 0)
        return self._masks[self._used]

    def allowed(self) -> np.ndarray:
        """(vocab,) bool: the tokens allowed next."""
        bits = np.unpackbits(self.bitmask().view(np.uint8), bitorder="little")
        return bits[:self.constraint.vocab_size].astype(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """(vocab,) float32 logits -> a copy with every disallowed token at -inf, allowed ones unchanged."""
        allowed = self.allowed()
        if not allowed.any():  # llguidance always leaves a token (EOS at the end); an empty mask is a bug here
            raise EngineError(f"the {self.constraint.kind} constraint allows no next token: {self.error or 'empty mask'}")
        return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def consume(self, token: int) -> None:
        """Advance the matcher past an accepted token (keeping the masks planned for the draft while it is followed)."""
        if self._used < len(self._draft) and token == self._draft[self._used]:
            self._used += 1
        else:
            self._masks, self._draft, self._used = None, [], 0
        self.matcher.consume_token(int(token))


def _executor():
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor(num_threads=max(1, min(8, os.cpu_count() or 1)))
        return _EXECUTOR


class MaskBatch:
    """The masks of a batch's constrained sequences for one step, computed in one parallel llguidance call, on a
    thread (`overlap=True`: while the forward pass runs) or at once. `wait()` before sampling."""

    def __init__(self, items: list[tuple[ConstraintState, list[int]]], overlap: bool = True):
        self._thread = None
        self._failure: BaseException | None = None
        if not items:
            return
        rows = sum(len(draft) + 1 for _, draft in items)
        words = items[0][0].words
        self.buffer = np.zeros((rows, words), dtype=np.int32)
        jobs, offset = [], 0
        for state, draft in items:
            state.plan(draft, self.buffer[offset:offset + len(draft) + 1])  # a view: the call writes into it
            jobs.append((state.matcher, offset, list(draft)))
            offset += len(draft) + 1
        if overlap:
            self._thread = threading.Thread(target=self._fill, args=(jobs,), name="tinyllama-masks", daemon=True)
            self._thread.start()
        else:
            self._fill(jobs)

    def _fill(self, jobs) -> None:
        try:
            plain = [(matcher, offset) for matcher, offset, draft in jobs if not draft]
            drafted = [job for job in jobs if job[2]]
            if plain:
                llg_numpy.fill_next_token_bitmask_par(_executor(), plain, self.buffer)
            if drafted:
                llg_numpy.fill_next_token_bitmask_par_with_draft_tokens(_executor(), drafted, self.buffer)
        except BaseException as error:  # noqa: BLE001 - re-raised by wait() on the scheduler's thread
            self._failure = error

    def wait(self) -> None:
        """Block until the masks are written (re-raises what the mask computation raised)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            raise self._failure
