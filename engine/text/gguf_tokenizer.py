"""A tokenizer from a GGUF file's metadata alone (`tokenizer.ggml.*`), built as a `tokenizers` Tokenizer.

Two vocabularies llama.cpp writes for Llama-architecture models:
- `tokenizer.ggml.model` = "llama": a SentencePiece BPE vocabulary (tokens, scores, token types). It becomes what
  transformers' LlamaConverter makes of the same tokenizer.model: a BPE model with byte fallback whose merges are
  every split of a piece into two pieces, ranked by the merged piece's score (highest first; ties in id order),
  normalizer "prepend U+2581, spaces to U+2581", and the SentencePiece decoder. Control and unknown tokens are
  special added tokens, user-defined ones plain added tokens.
- `tokenizer.ggml.model` = "gpt2": a byte-level BPE vocabulary (tokens and merges) with the pre-tokenizer named by
  `tokenizer.ggml.pre` (PRE_TOKENIZER_PATTERNS: the regexes llama.cpp itself uses for these names; Llama 3's
  "llama-bpe", GPT-2's "gpt-2", SmolLM's "smollm", "default").
BOS is added by the post-processor when `tokenizer.ggml.add_bos_token` says so (the default: "llama" yes, "gpt2"
no), the special ids come from `tokenizer.ggml.{bos,eos,unknown,padding}_token_id`, and the chat template from
`tokenizer.chat_template`. engine.text.tokenizer.Tokenizer wraps the result as it wraps a tokenizer.json.
"""
from __future__ import annotations

import json

from tokenizers import Tokenizer as _HFTokenizer

from engine.errors import EngineError

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODELS = ("llama", "gpt2")
# tokenizer.ggml.pre -> the regexes llama.cpp's llama-vocab.cpp splits the text with for that name, applied one after
# the other to every piece (as a Sequence of tokenizers' Split pre-tokenizers does), before the byte-level mapping.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZER_PATTERNS = {
    **{name: [_LLAMA3] for name in ("llama3", "llama-v3", "llama-bpe", "falcon3")},
    **{name: [_GPT2] for name in ("gpt-2", "phi-2", "mpt", "olmo")},
    "smollm": [r"\p{N}", _GPT2],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
}
# BPE vocabularies whose whole-word entries win before merges (llama.cpp's ignore_merges; Llama 3's tokenizer.json)
IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe", "falcon3")


class GGUFTokenizerError(EngineError):
    """The file's tokenizer metadata cannot be built into a tokenizer (missing or unsupported)."""


def tokenizer_json(meta: dict) -> str:
    """The tokenizer described by a GGUF file's `tokenizer.*` metadata (key -> value) as tokenizer.json text."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFTokenizerError("missing tokenizer metadata 'tokenizer.ggml.tokens'")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFTokenizerError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "llama":
        config = _sentencepiece(meta, tokens, types)
    elif kind == "gpt2":
        config = _byte_level_bpe(meta, tokens, types)
    else:
        raise GGUFTokenizerError(f"tokenizer.ggml.model {kind!r} is not supported (supported: {', '.join(MODELS)})")
    return json.dumps(config, ensure_ascii=False)


def build(meta: dict) -> tuple[_HFTokenizer, dict]:
    """(the `tokenizers` Tokenizer, facts for engine.text.tokenizer.Tokenizer: special_tokens (bos_token, eos_token,
    unk_token, pad_token -> text), bos_id, eos_ids, chat_template) from a GGUF file's tokenizer metadata."""
    hf = _HFTokenizer.from_str(tokenizer_json(meta))
    tokens = meta["tokenizer.ggml.tokens"]
    special, ids = {}, {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            special[name], ids[name] = tokens[token_id], token_id
    eos_ids = [ids["eos_token"]] if "eos_token" in ids else []
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if isinstance(eot, int) and 0 <= eot < len(tokens) and eot not in eos_ids:
        eos_ids.append(eot)
    template = meta.get("tokenizer.chat_template")
    facts = {"special_tokens": special, "bos_id": ids.get("bos_token"), "eos_ids": eos_ids,
             "chat_template": template if isinstance(template, str) and template else None}
    return hf, facts


def _adds_bos(meta: dict, default: bool) -> bool:
    value = meta.get("tokenizer.ggml.add_bos_token")
    return default if value is None else bool(value)


def _added_tokens(tokens: list[str], types: list[int], special_types: tuple[int, ...]) -> list[dict]:
    """Control / unknown tokens (special) and user-defined ones (not special) as tokenizer.json added_tokens."""
    added = []
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind in special_types or kind == USER_DEFINED:
            added.append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind != USER_DEFINED})
    return added


def _post_processor(meta: dict, tokens: list[str], default_bos: bool) -> dict | None:
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if not _adds_bos(meta, default_bos) or not isinstance(bos, int) or not 0 <= bos < len(tokens):
        return None
    text = tokens[bos]
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {text: {"id": text, "ids": [bos], "tokens": [text]}}}


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[list[str]]:
    """The BPE merges of a SentencePiece vocabulary, as transformers' SentencePieceExtractor derives them: for every
    piece, each split into two pieces of the vocabulary (in order of the halves' ids), all ranked by the merged
    piece's score, highest first (a stable sort: ties keep the pieces' id order)."""
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    found = []
    for merged, score in zip(tokens, scores):
        local = [(merged[:k], merged[k:]) for k in range(1, len(merged)) if merged[:k] in vocab and merged[k:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found.extend((left, right, score) for left, right in local)
    found.sort(key=lambda m: m[2], reverse=True)
    return [[left, right] for left, right, _ in found]


def _sentencepiece(meta: dict, tokens: list[str], types: list[int]) -> dict:
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise GGUFTokenizerError("missing tokenizer metadata 'tokenizer.ggml.scores' (a SentencePiece vocabulary "
                                 "needs a score per token)")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if not isinstance(unk, int):
        unk = next((i for i, kind in enumerate(types) if kind == UNKNOWN), None)
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    normalizers = ([{"type": "Prepend", "prepend": "\u2581"}] if space_prefix else []) + \
        [{"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if space_prefix else [])
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokens, types, (CONTROL, UNKNOWN)),
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": _post_processor(meta, tokens, True),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk] if unk is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                  "merges": sentencepiece_merges(tokens, scores)},
    }


def _byte_level_bpe(meta: dict, tokens: list[str], types: list[int]) -> dict:
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise GGUFTokenizerError("missing tokenizer metadata 'tokenizer.ggml.merges' (a byte-level BPE vocabulary "
                                 "needs its merges)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    patterns = PRE_TOKENIZER_PATTERNS.get(pre)
    if patterns is None:
        raise GGUFTokenizerError(f"tokenizer.ggml.pre {pre!r} is not supported (supported: "
                                 f"{', '.join(PRE_TOKENIZER_PATTERNS)})")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokens, types, (CONTROL, UNKNOWN)),
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            *({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False} for p in patterns),
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": _post_processor(meta, tokens, False),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre in IGNORE_MERGES, "vocab": vocab,
                  "merges": [m.split(" ", 1) for m in merges]},
    }
