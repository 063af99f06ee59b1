"""A multi-turn conversation with a chat model that keeps its KV cache from turn to turn.

`ChatSession` owns the history (system prompt + user/assistant messages), one KV cache and `cached_ids`, the exact
token ids that cache holds. Each turn renders the whole history with the model's chat template, keeps the longest
prefix it shares with `cached_ids` (normally everything up to the end of the previous reply, so only the new user
message and the template glue are prefilled), and streams the reply. When the conversation would not leave room for
a reply in the model's window, the oldest turns are dropped (the system prompt stays). The terminal side is
engine.cli.chat; this module has no I/O besides transcript files.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.text.chat_template import ChatTemplateError
from engine.errors import EngineError
from engine.generation.state import STOP_CANCELLED, default_options
from engine.generation.speculative import LOOKUP, split_draft

# /set NAME VALUE: the sampling options a session may change, and how their values are parsed.
SETTABLE = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "repetition_penalty": float,
            "seed": int, "max_new_tokens": int}
DEFAULT_MAX_NEW_TOKENS = 256
UNSET_WORDS = ("none", "off", "default")  # `/set seed none`: back to the model's default
TRANSCRIPT_FORMAT = "tinyllama-chat"


def common_prefix_length(a, b) -> int:
    """How many leading items a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TurnStats:
    """What one turn cost: the rendered prompt, how much of it the cache already held, and timings."""

    prompt_tokens: int  # the whole rendered conversation, generation prompt included
    reused_tokens: int  # ... of which were already in the cache
    prefill_tokens: int  # tokens run through the model before the first reply token (prompt - reused)
    context_tokens: int  # tokens in the cache after the turn
    generated_tokens: int
    time_to_first_token: float
    prompt_tokens_per_s: float
    generated_tokens_per_s: float
    stop_reason: str
    dropped_turns: int  # oldest turns dropped to make room before this turn
    draft_tokens: int = 0  # speculative decoding: tokens drafted this turn ...
    accepted_draft_tokens: int = 0  # ... and kept
    draft_steps: int = 0  # decode steps that drafted ...
    plain_steps: int = 0  # ... and that ran plain (drafting did not pay, or found nothing)


class ChatTurn:
    """One reply being generated: iterate for TokenEvents (token_id, text); `cancel()` stops it early.

    When it ends (exhausted, cancelled, or broken by an exception) the reply so far is appended to the session's
    history and the session's cache bookkeeping and `stats` are updated.
    """

    def __init__(self, session: "ChatSession", generation, prompt_ids: list[int], reused: int, dropped: int):
        self.session = session
        self.generation = generation
        self.prompt_ids = prompt_ids
        self.reused_tokens = reused
        self.dropped_turns = dropped
        self.done = False
        self._events = iter(generation)

    def __iter__(self):
        if self.done:
            return
        try:
            for event in self._events:
                yield event
        except GeneratorExit:  # the caller stopped iterating: the reply ends here
            self.cancel()
            raise
        except BaseException:
            # Interrupted inside a forward step (a second Ctrl-C, an error): do not trust the cache any more.
            self._finish(broken=True)
            raise
        self._finish()

    def cancel(self) -> None:
        """Stop the reply now; what was generated so far stays in the history."""
        if not self.done:
            self._events.close()
            self.generation.cancel()
            self._finish()

    @property
    def result(self):
        """The GenerationResult (token_ids, text, stop_reason, timings), once the turn is done."""
        return self.generation.result

    @property
    def cancelled(self) -> bool:
        """Whether the turn ended by cancellation (stop reason 'cancelled'); False while it is running."""
        return self.result is not None and self.result.stop_reason == STOP_CANCELLED

    def _finish(self, broken: bool = False) -> None:
        if self.done:
            return
        self.done = True
        s = self.session
        if self.generation.result is None:
            self.generation.cancel()
        r = self.generation.result
        s.messages.append({"role": "assistant", "content": r.text})
        if broken:
            s.cache, s.cached_ids, s.draft_cache = s.model.new_cache(), [], None
        else:
            # The cache holds the prompt and every reply token but the last (sampled, never fed back).
            s.cached_ids = (self.prompt_ids + list(r.token_ids))[: s.cache.length]
        s.stats = TurnStats(
            prompt_tokens=len(self.prompt_ids), reused_tokens=self.reused_tokens, prefill_tokens=r.prefill_tokens,
            context_tokens=s.cache.length, generated_tokens=len(r.token_ids),
            time_to_first_token=r.time_to_first_token, prompt_tokens_per_s=r.prompt_tokens_per_s,
            generated_tokens_per_s=r.generated_tokens_per_s, stop_reason=r.stop_reason,
            dropped_turns=self.dropped_turns, draft_tokens=r.draft_tokens,
            accepted_draft_tokens=r.accepted_draft_tokens, draft_steps=r.draft_steps, plain_steps=r.plain_steps,
        )
        s.turn = None


class ChatSession:
    """A conversation with `model` (which needs a chat template), re-using one KV cache across turns.

    options: max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop (None: the model's
    generation_config.json default); speculate and draft (speculative decoding, as in Model.complete). `send(text)` returns a ChatTurn to iterate; `stats` describes the last turn.
    """

    def __init__(self, model, system: str | None = None, **options):
        tokenizer = model.tokenizer
        if tokenizer.chat_template is None:
            name = getattr(model, "folder", None) or "this model"
            raise EngineError(f"{name} has no chat template, so it cannot chat: give one (load_model(..., "
                              "chat_template='chatml') or a Jinja file; `--chat-template` on the command line), or use "
                              "plain text completion")
        self.model = model
        self.tokenizer = tokenizer
        self.system = system or None
        self.messages: list[dict] = []  # user / assistant messages, oldest first (the system prompt apart)
        # speculative decoding (speculate=N, draft="lookup" | "int8" | "int4"): how replies are decoded, not what
        self.speculation = {k: options.pop(k) for k in ("speculate", "draft") if options.get(k) is not None}
        self.options = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
        self.options.update({k: v for k, v in options.items() if v is not None})
        default_options(model, **self.options)  # bad values fail here, not at the first turn
        self.cache = model.new_cache()
        self.cached_ids: list[int] = []  # exactly the tokens in self.cache
        self.draft_cache = None  # a draft model's cache, kept across turns like self.cache (a prefix of cached_ids)
        self.stats: TurnStats | None = None
        self.turn: ChatTurn | None = None

    @property
    def window(self) -> int:
        """The model's context window in tokens (max_position_embeddings)."""
        return self.model.config.max_position_embeddings

    def history(self, messages: list[dict] | None = None) -> list[dict]:
        """The messages the template renders: the system prompt (if any) first."""
        messages = self.messages if messages is None else messages
        return ([{"role": "system", "content": self.system}] if self.system else []) + list(messages)

    def render(self, messages: list[dict] | None = None) -> list[int]:
        """Token ids of the conversation (system prompt + messages) followed by the assistant's generation prompt."""
        try:
            return self.tokenizer.encode_chat(self.history(messages), add_generation_prompt=True)
        except ChatTemplateError as e:
            raise EngineError(f"the chat template refused the conversation: {e}") from None

    def reply_room(self, max_new_tokens: int | None = None) -> int:
        """Tokens kept free for the reply: max_new_tokens, at most a quarter of the window."""
        n = max_new_tokens if max_new_tokens is not None else self.generation_options().max_new_tokens
        return max(1, min(n, self.window // 4))

    def generation_options(self):
        """The session's GenerationOptions: the model's defaults with this session's options applied (and the chat
        template's end-of-turn stop strings, when it has any)."""
        return default_options(self.model, **self._stream_options())

    def send(self, text: str) -> ChatTurn:
        """Add a user message and start the reply: iterate the returned ChatTurn for its tokens."""
        if self.turn is not None:
            self.turn.cancel()
        options = self.generation_options()
        room = self.reply_room(options.max_new_tokens)
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.render(messages)
        dropped = 0
        while len(ids) + room > self.window:
            if len(messages) == 1:
                raise EngineError(f"the message is too long: the conversation would take {len(ids)} tokens, and the "
                                  f"window is {self.window} with {room} kept for the reply")
            # Drop the oldest turn: up to the next user message (the new one is the last, so there is one).
            start = next(i for i in range(1, len(messages)) if messages[i]["role"] == "user")
            messages = messages[start:]
            dropped += 1
            ids = self.render(messages)
        reused = min(common_prefix_length(ids, self.cached_ids), self.cache.length, len(ids) - 1)
        self.cache.truncate(reused)
        self.cached_ids = self.cached_ids[:reused]
        generation = self.model.stream(ids, cache=self.cache, draft_cache=self._draft_cache(reused), **self.speculation,
                                       **self._stream_options())
        self.messages = messages
        self.turn = ChatTurn(self, generation, ids, reused, dropped)
        return self.turn

    def _stream_options(self) -> dict:
        """The options a turn streams with: the session's, plus the chat template's end-of-turn stop strings."""
        options = dict(self.options)
        if self.tokenizer.chat_stop:
            stop = options.get("stop") or []
            options["stop"] = [*([stop] if isinstance(stop, str) else stop), *self.tokenizer.chat_stop]
        return options

    def _draft_cache(self, reused: int):
        """The draft model's cache for the next turn, cut to the `reused` tokens the model's cache keeps (it holds
        a prefix of the conversation too); None without a draft model."""
        draft, _ = split_draft(self.speculation.get("draft", LOOKUP))
        if not self.speculation.get("speculate") or draft == LOOKUP:
            return None
        if self.draft_cache is None:
            self.draft_cache = (self.model.draft_model(draft) if isinstance(draft, str) else draft).new_cache()
        self.draft_cache.truncate(min(self.draft_cache.length, reused))
        return self.draft_cache

    def reply(self, text: str):
        """send() and run the reply to the end -> GenerationResult."""
        turn = self.send(text)
        for _ in turn:
            pass
        return turn.result

    def reset(self) -> None:
        """Forget the conversation, keep the system prompt (and the cache: its system part is re-used)."""
        if self.turn is not None:
            self.turn.cancel()
        self.messages = []

    def set_system(self, text: str | None) -> None:
        """Change the system prompt (None or '' removes it); the conversation goes on under it."""
        self.system = text or None

    def set_option(self, name: str, value) -> object:
        """Set one sampling option from text (`/set top_k 40`); EngineError for unknown names or bad values.

        'none' / 'off' / 'default' go back to the model's default. Returns the parsed value.
        """
        key = name.strip().lower().replace("-", "_")
        if key not in SETTABLE:
            raise EngineError(f"unknown option {name!r}; choose from {', '.join(SETTABLE)}")
        if isinstance(value, str):
            text = value.strip()
            if text.lower() in UNSET_WORDS:
                parsed = None
            else:
                try:
                    parsed = SETTABLE[key](text)
                except ValueError:
                    kind = "an integer" if SETTABLE[key] is int else "a number"
                    raise EngineError(f"{key} must be {kind}, got {text!r}") from None
        else:
            parsed = value
        trial = dict(self.options)
        trial[key] = parsed
        if parsed is None:
            del trial[key]
        default_options(self.model, **trial)  # EngineError with the reason for a bad value
        self.options = trial
        return parsed

    def settings(self) -> dict:
        """The effective value of every settable option."""
        o = self.generation_options()
        s = o.sampling
        return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
                "repetition_penalty": s.repetition_penalty, "seed": s.seed, "max_new_tokens": o.max_new_tokens}

    def transcript(self) -> dict:
        """The conversation as a JSON-ready dict: format, version, system prompt, copies of the messages."""
        return {"format": TRANSCRIPT_FORMAT, "version": 1, "system": self.system,
                "messages": [dict(m) for m in self.messages]}

    def save(self, path) -> None:
        """Write the conversation as JSON: {"system": ..., "messages": [{"role", "content"}, ...]}.

        Atomic: the JSON goes to a temporary file beside `path`, flushed to disk, then renamed over it, so an
        interrupted save (Ctrl-C, a full disk, a kill) leaves the previous transcript whole."""
        target = Path(path).expanduser()
        data = (json.dumps(self.transcript(), ensure_ascii=False, indent=2) + "\n").encode("utf-8")
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            tmp = None
        except OSError as e:
            raise EngineError(f"cannot write {path}: {e.strerror or e}") from None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def load(self, path) -> None:
        """Replace the conversation with a transcript written by `save` (or a plain list of role/content messages)."""
        try:
            data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        except OSError as e:
            raise EngineError(f"cannot read {path}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise EngineError(f"{path} is not a JSON transcript ({e})") from None
        system, messages = parse_transcript(data, str(path))
        if self.turn is not None:
            self.turn.cancel()
        self.system, self.messages = system, messages


def parse_transcript(data, source: str = "transcript") -> tuple[str | None, list[dict]]:
    """(system, messages) from a saved transcript; EngineError naming what is wrong."""
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict) or not isinstance(data.get("messages", []), list):
        raise EngineError(f"{source}: expected an object with a 'messages' list")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise EngineError(f"{source}: 'system' must be a string")
    messages = []
    for i, m in enumerate(data.get("messages", [])):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise EngineError(f"{source}: message {i} needs a string 'content'")
        role = m.get("role")
        if role == "system" and not messages and system is None:
            system = m["content"]
            continue
        if role not in ("user", "assistant"):
            raise EngineError(f"{source}: message {i} has role {role!r} (expected 'user' or 'assistant')")
        messages.append({"role": role, "content": m["content"]})
    return system or None, messages
