"""OpenAI's response bodies and stream chunks for one request, and the per-token strings of its log-probabilities.

Chat: `chat.completion` / `chat.completion.chunk` (a first delta with the role, content deltas, a final chunk with
the finish reason, the usage chunk with empty choices when asked). Completions: `text_completion` with OpenAI's
legacy logprobs block (tokens, token_logprobs, top_logprobs, text_offset): its tokens joined are the text (a token
that ends inside a multi-byte character reads 'bytes:\\xe2...' and adds nothing; the one completing the character
carries it whole) and each text_offset is where its token starts in the text. Every generated token is counted in
`completion_tokens` and has a log-probability entry, EOS included (its text is empty); a completions top_logprobs
entry always holds the sampled token too (OpenAI's and vLLM's `logprobs: 0` gives just that one).

With `echo` (an `Echo`) a completions choice's text starts with the prompt's text, and with logprobs its block starts
with the prompt's tokens (BOS and other special tokens as '', the first token's log-probability and top_logprobs
null); vLLM's `prompt_logprobs` field lists, per prompt token (null first), {"<id>": {"logprob", "rank",
"decoded_token"}} for the prompt's token and the top alternatives. A stream sends the prompt part with its first
chunk.
"""
from __future__ import annotations

import codecs
import json
import time
import uuid
from dataclasses import dataclass

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


def usage(result: GenerationResult, completion: int | None = None) -> dict:
    """{"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details": {"cached_tokens"}}: every
    token of the prompt (cached_tokens of them restored from the prefix cache) and every generated one
    (`completion`: the total over n choices, default this result's); and where the server speculates, what
    speculation did (speculation_usage)."""
    done = len(result.token_ids) if completion is None else completion
    out = usage_of(len(result.prompt_token_ids), done, result.cached_tokens)
    out.update(speculation_usage([result]))
    return out


def speculation_usage(results: list[GenerationResult]) -> dict:
    """What speculation did for these results (the choices of a request), as usage fields: OpenAI's
    completion_tokens_details.accepted_prediction_tokens / rejected_prediction_tokens (draft tokens kept / not kept)
    and "speculation": {"draft_steps", "plain_steps"} (decode steps that drafted / that ran plain: drafting did not
    pay, or found nothing); {} where nothing speculated."""
    steps = {"draft_steps": sum(r.draft_steps for r in results), "plain_steps": sum(r.plain_steps for r in results)}
    if not (steps["draft_steps"] or steps["plain_steps"]):
        return {}
    accepted, drafted = sum(r.accepted_draft_tokens for r in results), sum(r.draft_tokens for r in results)
    return {"completion_tokens_details": {"accepted_prediction_tokens": accepted,
                                          "rejected_prediction_tokens": drafted - accepted},
            "speculation": steps}


def usage_of(prompt: int, completion: int, cached: int | None = None) -> dict:
    """OpenAI's usage object for these counts (prompt_tokens_details when the cached count is known)."""
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


# Characters JSON leaves unescaped that Python's str.splitlines() (httpx's iter_lines, the ollama client's) takes for a
# line break: one of them in a token would cut an event in two for those clients. Escaped, the JSON is the same.
LINE_BREAKS_JSON_KEEPS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def json_line(payload) -> str:
    """`payload` as compact JSON on one line for every line splitter (UTF-8 text, the line-breaking characters
    escaped)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).translate(LINE_BREAKS_JSON_KEEPS)


def sse(payload) -> str:
    """One server-sent event: 'data: <json>\\n\\n' (or the literal '[DONE]')."""
    data = payload if isinstance(payload, str) else json_line(payload)
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


@dataclass
class Echo:
    """What a completions choice puts before its own text: the prompt's text (None: no echo), and whether its tokens
    go in the logprobs block (echo with logprobs); `prompt_logprobs`: vLLM's field with this many alternatives
    (None: no such field)."""

    text: str | None
    prompt_ids: list[int]
    logprobs: bool = False
    prompt_logprobs: int | None = None


class Answer:
    """The response of one request in OpenAI's shape: `kind` 'chat' or 'completion'."""

    def __init__(self, kind: str, model_name: str, strings: TokenStrings, logprobs: int | None,
                 include_usage: bool = False, continuous_usage: bool = False, prompt_tokens: int = 0,
                 index: int = 0, echo: Echo | None = None):
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
        self.echo = echo
        self.prompt_sent = echo is None  # a stream sends the prompt part (echo, prompt_logprobs) once

    def choice(self, index: int, echo: Echo | None = None) -> "Answer":
        """The Answer of another choice of the same response (n > 1, or another prompt's with its own `echo`): the
        same id, time and settings, its own index and per-choice state."""
        other = Answer(self.kind, self.model, self.strings, self.logprobs, self.include_usage, self.continuous_usage,
                       self.prompt_tokens, index=index, echo=echo if echo is not None else self.echo)
        other.id, other.created = self.id, self.created
        return other

    # ---- the prompt part (completions' echo and prompt_logprobs) ----------------------------------------------
    def _prompt_part(self, scores) -> tuple[str, dict | None, dict]:
        """(echoed text, the prompt's logprobs block or None, extra choice fields) from the prompt's scores (one
        TokenLogprob per prompt token, None first; None when the request did not score it)."""
        echo = self.echo
        text = echo.text or ""
        extra = {}
        if echo.prompt_logprobs is not None and scores is not None:
            extra["prompt_logprobs"] = [None if s is None else self._vllm_entry(t, s, echo.prompt_logprobs)
                                        for t, s in zip(echo.prompt_ids, scores)]
        block = None
        if echo.logprobs and echo.text is not None and scores is not None:
            block = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            offset = 0
            for (token, added), token_id, score in zip(self.prompt_tokens_text(), echo.prompt_ids, scores):
                block["tokens"].append(token)
                block["token_logprobs"].append(None if score is None else score.logprob)
                block["top_logprobs"].append(None if score is None else self._top_dict(token_id, score))
                block["text_offset"].append(offset)
                offset += added
        self.text_offset = len(text)  # the generated tokens' offsets follow the echoed prompt
        return text, block, extra

    def prompt_tokens_text(self) -> list[tuple[str, int]]:
        """Each prompt token's string and the characters it adds (see completion_token), the first one's leading
        space dropped where the tokenizer's decoding drops it (SentencePiece), so they join to the decoded prompt."""
        ids = self.echo.prompt_ids
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        out = [self._token_text(t, utf8) for t in ids]
        joined = "".join(text for text, _ in out if not text.startswith("bytes:"))
        decoded = self.strings.tokenizer.decode(ids, skip_special_tokens=True)
        if joined != decoded and joined.startswith(" ") and joined[1:] == decoded:
            first = next(i for i, (text, added) in enumerate(out) if added)
            text, added = out[first]
            out[first] = (text[1:], added - 1)
        return out

    def _vllm_entry(self, token_id: int, score, top: int) -> dict:
        """vLLM's prompt_logprobs entry: {"<id>": {"logprob", "rank", "decoded_token"}} for the token and its top."""
        entry = {}
        for rank, (t, value) in enumerate(score.top[:top], start=1):
            entry[str(t)] = {"logprob": value, "rank": rank, "decoded_token": self.strings(t)[0]}
        entry.setdefault(str(token_id), {"logprob": score.logprob, "rank": score.rank,
                                         "decoded_token": self.strings(token_id)[0]})
        return entry

    def _top_dict(self, token_id: int, logprob: TokenLogprob) -> dict:
        """Completions' top_logprobs entry: {token string: log-probability} of the top alternatives, and always the
        token itself."""
        top = {t["token"]: t["logprob"] for t in self._top(logprob)}
        top.setdefault(self.strings(token_id)[0], logprob.logprob)
        return top

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
            block["top_logprobs"].append(self._top_dict(e.token_id, e.logprob))
            block["text_offset"].append(self.text_offset)
            self.text_offset += added
        return block

    def completion_token(self, token_id: int) -> tuple[str, int]:
        """Completions' string for the next generated token and the characters it adds to the text: its text (a
        special token such as EOS adds none), or 'bytes:\\xe2' (its raw bytes) and 0 when it ends inside a
        multi-byte character, which the token completing it carries."""
        return self._token_text(token_id, self.utf8)

    def _token_text(self, token_id: int, utf8) -> tuple[str, int]:
        if token_id in self.strings.tokenizer.special_ids:
            return "", 0
        _, raw = self.strings(token_id)
        text = utf8.decode(bytes(raw))
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
    media_type = "text/event-stream"  # OpenAI's streams are server-sent events
    server_timings = True  # llama.cpp's `timings` beside `usage` (OpenAI's clients ignore the extra field)

    def frame(self, payload) -> str:
        """One piece of the stream on the wire: a server-sent event."""
        return sse(payload)

    def end_of_stream(self) -> str | None:
        """What closes the stream after the last chunk: 'data: [DONE]'."""
        return sse("[DONE]")

    def error_payload(self, error) -> dict:
        """The stream chunk that reports a failure after the stream began (an APIError): OpenAI's error body."""
        return error.body()

    def first_chunk(self) -> dict | None:
        """Chat's opening chunk, whose delta carries the role; None for completions."""
        return self._chunk([self._choice(None, None, None, role=True)]) if self.kind == "chat" else None

    def delta_chunk(self, events: list[TokenEvent]) -> dict | None:
        """A chunk with these tokens' text (and log-probabilities), after the prompt part in the first one; None
        when it would carry nothing."""
        part = self._pending_prompt(events[0].prompt_logprobs) if events else None
        text = "".join(e.text for e in events)
        self.completion_tokens += len(events)
        if part is None and not text and (self.logprobs is None or not events) and not (self.continuous_usage
                                                                                        and events):
            return None
        return self._chunk([self._with_prompt(part, self._choice(text, None, self.logprobs_block(events)))])

    def final_chunk(self, result: GenerationResult) -> dict:
        """The chunk with the finish reason and an empty delta (with the prompt part when no token carried it: a
        request that only scored its prompt)."""
        part = self._pending_prompt(result.prompt_logprobs)
        return self._chunk([self._with_prompt(part, self._choice(None, finish_reason(result), None))])

    def _pending_prompt(self, scores):
        """The prompt part (see _prompt_part) the first time a stream asks, then None."""
        if self.prompt_sent:
            return None
        self.prompt_sent = True
        return self._prompt_part(scores)

    @staticmethod
    def _with_prompt(part, choice: dict) -> dict:
        """A completions choice with the prompt part (text, logprobs block, fields) put first; `part` None: as is."""
        if part is None:
            return choice
        text, block, extra = part
        choice["text"] = text + choice["text"]
        if block is not None:
            own = choice["logprobs"]
            choice["logprobs"] = block if own is None else {k: block[k] + own[k] for k in block}
        choice.update(extra)
        return choice

    def usage_chunk(self, result: GenerationResult) -> dict:
        """stream_options.include_usage: the last chunk, with empty choices and the usage."""
        return dict(self._chunk([]), usage=usage(result))

    # ---- whole ------------------------------------------------------------------------------------------------
    def complete(self, events: list[TokenEvent], result: GenerationResult) -> dict:
        """The non-streamed response body."""
        part = self._prompt_part(result.prompt_logprobs) if self.echo is not None else None
        logprobs = self.logprobs_block(events)
        if self.kind == "chat":
            choice = {"index": self.index, "message": {"role": "assistant", "content": result.text, "refusal": None},
                      "logprobs": logprobs, "finish_reason": finish_reason(result)}
            obj = "chat.completion"
        else:
            choice = self._with_prompt(part, {"index": self.index, "text": result.text, "logprobs": logprobs,
                                              "finish_reason": finish_reason(result)})
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": [choice], "usage": usage(result)}
