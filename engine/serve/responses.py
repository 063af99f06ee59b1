"""OpenAI's response bodies and stream chunks for one request, and the per-token strings of its log-probabilities.

Chat: `chat.completion` / `chat.completion.chunk` (a first delta with the role, content deltas, a final chunk with
the finish reason, the usage chunk with empty choices when asked). Completions: `text_completion` with OpenAI's
legacy logprobs block (tokens, token_logprobs, top_logprobs, text_offset): its tokens joined are the text (a token
that ends inside a multi-byte character reads 'bytes:\\xe2...' and adds nothing; the one completing the character
carries it whole) and each text_offset is where its token starts in the text. Every generated token is counted in
`completion_tokens` and has a log-probability entry, EOS included (its text is empty).
"""
from __future__ import annotations

import codecs
import json
import time
import uuid

from engine.generation.constraints import STOP_CONSTRAINT_DONE, STOP_CONSTRAINT_ERROR
from engine.generation.state import (STOP_CANCELLED, STOP_CONTEXT_FULL, STOP_EOS, STOP_MAX_TOKENS, STOP_STRING,
                                     GenerationResult, TokenEvent, TokenLogprob)

FINISH_REASONS = {STOP_EOS: "stop", STOP_STRING: "stop", STOP_MAX_TOKENS: "length", STOP_CONTEXT_FULL: "length",
                  STOP_CANCELLED: "abort",  # "abort": cancelled by the server (shutdown), vLLM's word for it
                  STOP_CONSTRAINT_DONE: "stop",  # structured output complete
                  STOP_CONSTRAINT_ERROR: "error"}  # the constraint's matcher failed (a resource limit)


def finish_reason(result: GenerationResult) -> str:
    """The engine's stop reason as OpenAI's finish_reason ("stop", "length"; "abort" when the server cancelled)."""
    return FINISH_REASONS.get(result.stop_reason, "stop")


def usage(result: GenerationResult, completion: int | None = None, choices=()) -> dict:
    """{"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details": {"cached_tokens"}}: every
    token of the prompt (cached_tokens of them restored from the prefix cache) and every generated one
    (`completion`: the total over n choices, default this result's). Where the server speculates, also what
    speculation did for the choices (`choices`: every choice's result; default `result` alone): OpenAI's
    completion_tokens_details.accepted_prediction_tokens / rejected_prediction_tokens (draft tokens kept / not kept)
    and "speculation": the decode steps that drafted and those that ran plain (drafting did not pay, or found
    nothing)."""
    done = len(result.token_ids) if completion is None else completion
    out = usage_of(len(result.prompt_token_ids), done, result.cached_tokens)
    results = list(choices) or [result]
    steps = {"draft_steps": sum(r.draft_steps for r in results), "plain_steps": sum(r.plain_steps for r in results)}
    if steps["draft_steps"] or steps["plain_steps"]:
        accepted, drafted = sum(r.accepted_draft_tokens for r in results), sum(r.draft_tokens for r in results)
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": drafted - accepted}
        out["speculation"] = steps
    return out


def usage_of(prompt: int, completion: int, cached: int | None = None) -> dict:
    """OpenAI's usage object for these counts (prompt_tokens_details when the cached count is known)."""
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def sse(payload) -> str:
    """One server-sent event: 'data: <json>\\n\\n' (or the literal '[DONE]')."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class TokenStrings:
    """Each token's own text as it reads inside a text (SentencePiece's leading space kept) and its UTF-8 bytes.

    A byte-fallback token of an ASCII byte (`<0x0A>`) is that character; any other (`<0xE2>`) is its one raw byte,
    shown as 'bytes:\\xe2' as OpenAI shows partial characters.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        anchor = tokenizer.encode("a", add_special_tokens=False)
        self.anchor = anchor[-1:] if anchor else []
        self.anchor_text = tokenizer.decode(self.anchor)
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        """token id -> (text, list of its bytes)."""
        hit = self.cache.get(token_id)
        if hit is None:
            if token_id in self.tokenizer.byte_fallback_ids:
                byte = int(self.tokenizer.id_to_token(token_id)[3:5], 16)
                hit = (chr(byte) if byte < 0x80 else f"bytes:\\x{byte:02x}", [byte])
            else:
                text = self.tokenizer.decode(self.anchor + [token_id])[len(self.anchor_text):]
                hit = (text, list(text.encode("utf-8")))
            self.cache[token_id] = hit
        return hit


class Answer:
    """The response of one request in OpenAI's shape: `kind` 'chat' or 'completion'."""

    def __init__(self, kind: str, model_name: str, strings: TokenStrings, logprobs: int | None,
                 include_usage: bool = False, continuous_usage: bool = False, prompt_tokens: int = 0,
                 index: int = 0):
        self.kind = kind
        self.index = index  # the choice's index (n > 1: one Answer per choice, sharing `id`)
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model_name
        self.strings = strings
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0  # streamed so far
        self.text_offset = 0  # completions' text_offset runs on across stream chunks
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # completions' tokens: characters across tokens

    def choice(self, index: int) -> "Answer":
        """The Answer of another choice of the same response (n > 1): the same id, time and settings, its own index
        and per-choice state."""
        other = Answer(self.kind, self.model, self.strings, self.logprobs, self.include_usage, self.continuous_usage,
                       self.prompt_tokens, index=index)
        other.id, other.created = self.id, self.created
        return other

    # ---- pieces -----------------------------------------------------------------------------------------------
    def _top(self, logprob: TokenLogprob) -> list[dict]:
        out = []
        for token_id, value in logprob.top:
            text, raw = self.strings(token_id)
            out.append({"token": text, "logprob": value, "bytes": raw})
        return out

    def logprobs_block(self, events: list[TokenEvent]) -> dict | None:
        """The logprobs of these tokens (None when the request did not ask for them)."""
        if self.logprobs is None:
            return None
        if self.kind == "chat":
            content = []
            for e in events:
                text, raw = self.strings(e.token_id)
                content.append({"token": text, "logprob": e.logprob.logprob, "bytes": raw,
                                "top_logprobs": self._top(e.logprob)})
            return {"content": content, "refusal": None}
        block = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in events:
            token, added = self.completion_token(e.token_id)
            block["tokens"].append(token)
            block["token_logprobs"].append(e.logprob.logprob)
            block["top_logprobs"].append({t["token"]: t["logprob"] for t in self._top(e.logprob)})
            block["text_offset"].append(self.text_offset)
            self.text_offset += added
        return block

    def completion_token(self, token_id: int) -> tuple[str, int]:
        """Completions' string for the next generated token and the characters it adds to the text: its text (a
        special token such as EOS adds none), or 'bytes:\\xe2' (its raw bytes) and 0 when it ends inside a
        multi-byte character, which the token completing it carries."""
        if token_id in self.strings.tokenizer.special_ids:
            return "", 0
        _, raw = self.strings(token_id)
        text = self.utf8.decode(bytes(raw))
        if raw and not text:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), 0
        return text, len(text)

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                 "created": self.created, "model": self.model, "system_fingerprint": None, "choices": choices}
        if self.continuous_usage:
            chunk["usage"] = usage_of(self.prompt_tokens, self.completion_tokens)
        elif self.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, text: str | None, finish: str | None, logprobs, role: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            return {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": self.index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    # ---- streaming --------------------------------------------------------------------------------------------
    def first_chunk(self) -> dict | None:
        """Chat's opening chunk, whose delta carries the role; None for completions."""
        return self._chunk([self._choice(None, None, None, role=True)]) if self.kind == "chat" else None

    def delta_chunk(self, events: list[TokenEvent]) -> dict | None:
        """A chunk with these tokens' text (and log-probabilities); None when it would carry nothing."""
        text = "".join(e.text for e in events)
        self.completion_tokens += len(events)
        if not text and (self.logprobs is None or not events) and not (self.continuous_usage and events):
            return None
        return self._chunk([self._choice(text, None, self.logprobs_block(events))])

    def final_chunk(self, result: GenerationResult) -> dict:
        """The chunk with the finish reason and an empty delta."""
        return self._chunk([self._choice(None, finish_reason(result), None)])

    def usage_chunk(self, result: GenerationResult) -> dict:
        """stream_options.include_usage: the last chunk, with empty choices and the usage."""
        return dict(self._chunk([]), usage=usage(result))

    # ---- whole ------------------------------------------------------------------------------------------------
    def complete(self, events: list[TokenEvent], result: GenerationResult) -> dict:
        """The non-streamed response body."""
        logprobs = self.logprobs_block(events)
        if self.kind == "chat":
            choice = {"index": self.index, "message": {"role": "assistant", "content": result.text, "refusal": None},
                      "logprobs": logprobs, "finish_reason": finish_reason(result)}
            obj = "chat.completion"
        else:
            choice = {"index": self.index, "text": result.text, "logprobs": logprobs,
                      "finish_reason": finish_reason(result)}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": [choice], "usage": usage(result)}
