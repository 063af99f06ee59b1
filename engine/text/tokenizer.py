"""Tokenizer for a Hugging Face model folder: encode/decode via `tokenizers`, chat prompts, streaming decode.

Encoding is exactly `tokenizers.Tokenizer.from_file("tokenizer.json")` (its post-processor adds BOS for
Llama/TinyLlama, special tokens written in the text are matched as special tokens), i.e. transformers 4.x
`LlamaTokenizerFast` behaviour; transformers 5's `AutoTokenizer` swaps the normalizer and differs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders as _decoders

from engine.text.chat_template import NoChatTemplateError, render_chat
from engine.text.chat_templates import ChatTemplate

__all__ = ["Tokenizer", "StreamDecoder", "NoChatTemplateError"]

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# normalizers and pre-tokenizers that never make a text shorter (so no token stands for more than its own piece)
_LENGTH_KEEPING_NORMALIZERS = frozenset({"Prepend", "Replace", "NFD", "NFKD", "Sequence"})
_LENGTH_KEEPING_PRE_TOKENIZERS = frozenset({"Metaspace", "ByteLevel", "Digits", "Punctuation", "Split", "Sequence"})


def _keeps_characters(component: dict | None, kinds: frozenset[str]) -> bool:
    """Whether a tokenizer.json normalizer / pre-tokenizer (a dict, or None) keeps every character of a text."""
    if component is None:
        return True
    kind = component.get("type")
    if kind not in kinds:
        return False
    if kind == "Replace":
        pattern = component.get("pattern") or {}
        return "String" in pattern and len(component.get("content", "")) >= len(pattern["String"])
    if kind == "Split" and str(component.get("behavior", "")).lower() == "removed":
        return False
    parts = component.get("normalizers") or component.get("pretokenizers") or []
    return all(_keeps_characters(part, kinds) for part in parts) if kind == "Sequence" else True


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (bytes_to_unicode) inverted: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL_ALPHABET = _byte_level_alphabet()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config / special_tokens_map: a str, or a dict with 'content'."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(item) for item in value]


def _chat_template_from(folder: Path, tokenizer_config: dict) -> str | None:
    """The template from chat_template.jinja (newer HF layout) or tokenizer_config['chat_template']."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


class Tokenizer:
    """A model folder's tokenizer: ids <-> text, chat rendering, streaming detokenization."""

    def __init__(
        self,
        hf_tokenizer: _HFTokenizer,
        special_tokens: Mapping[str, str] | None = None,
        eos_ids: Sequence[int] = (),
        bos_id: int | None = None,
        chat_template: str | None = None,
    ):
        """Wrap a `tokenizers.Tokenizer`; special_tokens maps bos_token/eos_token/... to their text."""
        self._tokenizer = hf_tokenizer
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.bos_id: int | None = bos_id
        self.eos_ids: tuple[int, ...] = tuple(eos_ids)
        self.chat_template: str | None = chat_template
        self.chat_template_source: str | None = "the model" if chat_template else None
        self.chat_stop: tuple[str, ...] = ()  # stop strings that end an assistant turn (a chosen template's)
        self.vocab_size: int = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids: frozenset[int] = frozenset(
            token_id for token_id, token in hf_tokenizer.get_added_tokens_decoder().items() if token.special
        )
        self.byte_fallback_ids: frozenset[int] = frozenset(
            token_id for token, token_id in hf_tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(token)
        )
        self._added_ids = frozenset(hf_tokenizer.get_added_tokens_decoder())
        self._byte_level = isinstance(hf_tokenizer.decoder, _decoders.ByteLevel)

    def to_json(self) -> str:
        """The wrapped `tokenizers.Tokenizer` serialized as tokenizer.json text (for libraries that read that format)."""
        return self._tokenizer.to_str()

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        """Load tokenizer.json plus the special tokens, eos ids and chat template from a HF model folder."""
        folder = Path(folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        hf_tokenizer = _HFTokenizer.from_file(str(tokenizer_file))
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        special_tokens_map = _read_json(folder / "special_tokens_map.json")
        generation_config = _read_json(folder / "generation_config.json")
        model_config = _read_json(folder / "config.json")

        special_tokens = {}
        for name in _SPECIAL_TOKEN_NAMES:
            text = _token_text(tokenizer_config.get(name)) or _token_text(special_tokens_map.get(name))
            if text is not None:
                special_tokens[name] = text

        def token_id(name: str) -> int | None:
            """Id of the special token `name` (e.g. 'eos_token'), or None if it is unset or not in the vocabulary."""
            text = special_tokens.get(name)
            return None if text is None else hf_tokenizer.token_to_id(text)

        bos_id = token_id("bos_token")
        if bos_id is None:
            bos_candidates = _as_id_list(generation_config.get("bos_token_id")) or _as_id_list(
                model_config.get("bos_token_id")
            )
            bos_id = bos_candidates[0] if bos_candidates else None

        tokenizer_eos = token_id("eos_token")
        eos_ids: list[int] = []
        for candidate in (
            [] if tokenizer_eos is None else [tokenizer_eos],
            _as_id_list(generation_config.get("eos_token_id")),
            _as_id_list(model_config.get("eos_token_id")),
        ):
            for item in candidate:
                if item not in eos_ids:
                    eos_ids.append(item)

        return cls(
            hf_tokenizer,
            special_tokens=special_tokens,
            eos_ids=eos_ids,
            bos_id=bos_id,
            chat_template=_chat_template_from(folder, tokenizer_config),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """The tokenizer a GGUF file describes in its `tokenizer.*` metadata (key -> value; see
        engine.text.gguf_tokenizer); GGUFTokenizerError (one line) when it is missing or unsupported."""
        from engine.text import gguf_tokenizer

        hf_tokenizer, facts = gguf_tokenizer.build(dict(meta))
        return cls(hf_tokenizer, **facts)

    def encode(self, text: str, add_special_tokens: bool = True, threaded: bool = False) -> list[int]:
        """text -> token ids (list[int]); add_special_tokens runs the post-processor (adds BOS for Llama).

        threaded: let other Python threads run meanwhile (tokenizers' encode_batch releases the GIL, encode does
        not; same ids). For a server tokenizing on a worker thread; tokenizers warns if the process forks later.
        """
        if threaded:
            return self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def max_chars_per_token(self) -> int | None:
        """The most characters of input text one token can stand for (the longest vocabulary piece or added token),
        so a text of C characters has at least ceil(C / this) tokens; None when that bound is not sound for this
        tokenizer (a normalizer or pre-tokenizer that can drop or merge characters, or unknown characters fused
        into one token without byte fallback). Computed once."""
        if not hasattr(self, "_max_chars"):
            config = json.loads(self._tokenizer.to_str())
            model = config.get("model") or {}
            sound = (_keeps_characters(config.get("normalizer"), _LENGTH_KEEPING_NORMALIZERS)
                     and _keeps_characters(config.get("pre_tokenizer"), _LENGTH_KEEPING_PRE_TOKENIZERS)
                     and (model.get("byte_fallback") or not model.get("fuse_unk")))
            pieces = [*self._tokenizer.get_vocab(with_added_tokens=True),
                      *(t.content for t in self._tokenizer.get_added_tokens_decoder().values())]
            self._max_chars = max(map(len, pieces), default=1) if sound else None
        return self._max_chars

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """token ids -> text, exactly as `tokenizers` decodes (leading SentencePiece space stripped once)."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of one id (e.g. '▁Hello', '<0xE2>'), None when out of range."""
        return self._tokenizer.id_to_token(int(token_id))

    def token_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece ('▁Paris', '<0x0A>', '</s>'), None when the vocabulary has no such piece."""
        return self._tokenizer.token_to_id(piece)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for in decoded text: '▁Hello' -> b' Hello', '<0x0A>' -> b'\\n', an added
        token (e.g. '<s>') -> its own text; byte-level BPE pieces ('ĠHello') through GPT-2's byte alphabet.

        The sequence's decoded text is these bytes joined, less the one leading space SentencePiece decoding strips.
        """
        piece = self.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        if int(token_id) in self._added_ids:
            return piece.encode("utf-8")
        if int(token_id) in self.byte_fallback_ids:
            return bytes([int(piece[3:5], 16)])
        if self._byte_level:
            alphabet = _BYTE_LEVEL_ALPHABET
            return bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode("utf-8")
        return piece.replace("\u2581", " ").encode("utf-8")

    def use_chat_template(self, template: ChatTemplate) -> None:
        """Render chats with `template` (engine.text.chat_templates.resolve_chat_template) instead of the model's own."""
        self.chat_template = template.text
        self.chat_template_source = template.source
        self.chat_stop = tuple(template.stop)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """messages -> prompt text rendered by the model's own template (or the one set by use_chat_template);
        `tools` for a template that takes them. NoChatTemplateError when there is none."""
        if self.chat_template is None:
            raise NoChatTemplateError("this model has no chat template; use plain text completion instead")
        return render_chat(self.chat_template, messages, add_generation_prompt, tools=tools, **self.special_tokens)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """messages -> prompt ids: render, then encode with the post-processor's BOS (not doubled if rendered)."""
        return self.encode_rendered_chat(self.apply_chat_template(messages, add_generation_prompt))

    def encode_rendered_chat(self, prompt: str, threaded: bool = False) -> list[int]:
        """A prompt rendered by apply_chat_template -> its ids, BOS added unless the template wrote it."""
        bos_text = self.special_tokens.get("bos_token")
        template_wrote_bos = bool(bos_text) and prompt.startswith(bos_text)
        return self.encode(prompt, add_special_tokens=not template_wrote_bos, threaded=threaded)

    def stream_decoder(self, skip_special_tokens: bool = False, context_ids: Sequence[int] = ()) -> "StreamDecoder":
        """A StreamDecoder for generated ids; context_ids (e.g. the prompt's last few ids) are never emitted."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens, context_ids=context_ids)


class StreamDecoder:
    """Incremental detokenizer: push ids one at a time, get the text each one finalizes.

    Invariant: "".join(pushes) + flush() == tokenizer.decode(ids, skip_special_tokens) exactly (with
    context_ids: == decode(context + ids)[len(decode(context)):], for a context that does not end in
    byte-fallback tokens).

    Method (as HF TGI / vLLM): keep `prefix_offset` / `read_offset` into the id list, decode
    ids[prefix_offset:read_offset] and ids[prefix_offset:] and emit the difference, so each decode
    covers a short window, not the whole stream. Byte-fallback tokens (`<0xE2>` ...) are held back until
    the run of them ends: `tokenizers`' ByteFallback decoder decodes a whole run at once and turns *every*
    byte of the run into U+FFFD if any part is invalid, so even a complete character could change while
    the run goes on. Held runs are decoded once, when the next ordinary token (or flush) arrives.
    For tokenizers without byte fallback (byte-level BPE) text ending in U+FFFD is held instead.
    Skipped special tokens never enter the window (tokenizers drops them before decoding too).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False, context_ids: Sequence[int] = ()):
        """Start a stream; context_ids set where the text starts (e.g. keep a leading space) but are not emitted."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [
            int(i) for i in context_ids if not (skip_special_tokens and int(i) in tokenizer.special_ids)
        ]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._finished = False

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip_special_tokens)

    def _emit_pending(self, hold_incomplete: bool) -> str:
        """Decode the window, return text past read_offset and advance (unless held)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if hold_incomplete and new_text.endswith("\ufffd"):
            return ""
        if len(new_text) <= len(prefix_text):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def push(self, token_id: int) -> str:
        """token_id: int -> the text this token made final ('' if none yet)."""
        if self._finished:
            raise RuntimeError("push() after flush(): start a new stream_decoder()")
        token_id = int(token_id)
        if self._skip_special_tokens and token_id in self._tokenizer.special_ids:
            return ""
        self._ids.append(token_id)
        byte_fallback_ids = self._tokenizer.byte_fallback_ids
        if token_id in byte_fallback_ids:
            return ""
        return self._emit_pending(hold_incomplete=not byte_fallback_ids)

    def flush(self) -> str:
        """End of stream -> whatever text is still held back (a trailing byte run decodes as `decode` would)."""
        if self._finished:
            return ""
        self._finished = True
        if self._read_offset == len(self._ids):
            return ""
        return self._emit_pending(hold_incomplete=False)
