"""`POST /tokenize` and `POST /detokenize` in llama.cpp's and vLLM's shapes, on one route each.

/tokenize takes llama.cpp's body (`content`, `add_special` default false, `with_pieces`) or vLLM's (`prompt`, or
`messages` rendered with the chat template; `add_special_tokens` default true for a prompt, `return_token_strs`).
The answer carries both servers' fields: `tokens` (ids; with `with_pieces`, llama.cpp's [{"id", "piece"}] where a
piece is the token's text, or its bytes as a list of ints when they are not valid UTF-8 alone), and vLLM's `count`,
`max_model_len` and `token_strs` (the vocabulary pieces, when asked). /detokenize takes `tokens` and answers the
text as llama.cpp's `content` and vLLM's `prompt` (special tokens kept, as both do). `GET /tokenizer_info` is
vLLM's description of the tokenizer (its special tokens and chat template): with it and /tokenize, lm-evaluation-
harness' API models tokenize through the server (no local copy of the tokenizer needed).
"""
from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request

from engine.serve.errors import bad_request
from engine.serve.params import chat_messages
from engine.serve.protocol import ChatMessage, _Body
from engine.text.chat_template import ChatTemplateError, NoChatTemplateError


class TokenizeRequest(_Body):
    """POST /tokenize: llama.cpp's fields (content, add_special, parse_special, with_pieces) or vLLM's (prompt or
    messages, add_special_tokens, add_generation_prompt, return_token_strs)."""

    model: str | None = None
    content: str | None = None
    add_special: bool | None = None
    parse_special: bool | None = True
    with_pieces: bool | None = False
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True
    return_token_strs: bool | None = False


class DetokenizeRequest(_Body):
    """POST /detokenize: the token ids (both servers' `tokens`)."""

    model: str | None = None
    tokens: list[int]


def tokenize(model, body: TokenizeRequest) -> dict:
    """The /tokenize answer (see the module docstring); 400 naming the field for a body that gives no text or two."""
    given = [name for name in ("content", "prompt", "messages") if getattr(body, name) is not None]
    if len(given) != 1:
        raise bad_request("send one of `content` (llama.cpp), `prompt` or `messages` (vLLM)", "content")
    if body.parse_special is False:
        raise bad_request("parse_special: false is not supported (special tokens written in the text are always "
                          "read as special tokens)", "parse_special")
    tokenizer = model.tokenizer
    if body.messages is not None:
        try:
            text = tokenizer.apply_chat_template(chat_messages(body), bool(body.add_generation_prompt))
        except NoChatTemplateError:
            raise bad_request("this model has no chat template: send `prompt`", "messages") from None
        except ChatTemplateError as e:
            raise bad_request(f"messages: {e}", "messages") from None
        ids = tokenizer.encode_rendered_chat(text, threaded=True)
    else:
        special = body.add_special if body.content is not None else body.add_special_tokens
        default = body.content is None  # llama.cpp adds no BOS unless asked, vLLM adds it
        ids = tokenizer.encode(body.content if body.content is not None else body.prompt,
                               add_special_tokens=default if special is None else special, threaded=True)
    tokens: list = list(ids)
    if body.with_pieces:
        tokens = [{"id": t, "piece": _piece(tokenizer, t)} for t in ids]
    return {"tokens": tokens, "count": len(ids), "max_model_len": model.config.max_position_embeddings,
            "token_strs": [tokenizer.id_to_token(t) for t in ids] if body.return_token_strs else None}


def _piece(tokenizer, token_id: int):
    """llama.cpp's piece: the token's text, or its bytes (a list of ints) when they are not UTF-8 on their own."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def detokenize(model, body: DetokenizeRequest) -> dict:
    """The /detokenize answer: {"content", "prompt"} (the same text); 400 for an id outside the vocabulary."""
    vocab = model.config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"tokens: token ids must be in 0..{vocab - 1}, got {bad[0]}", "tokens")
    text = model.tokenizer.decode(body.tokens)
    return {"content": text, "prompt": text}


def tokenizer_description(model) -> dict:
    """vLLM's /tokenizer_info: the special tokens' texts (None where the tokenizer has none), the chat template and
    the window."""
    tokenizer = model.tokenizer
    info = {name: tokenizer.special_tokens.get(name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return {"tokenizer_class": "PreTrainedTokenizerFast", **info, "chat_template": tokenizer.chat_template,
            "model_max_length": model.config.max_position_embeddings}


def add_tokenize_routes(app: FastAPI, state, prepare) -> None:
    """Mount POST /tokenize and /detokenize. `prepare(request, body_class)`: the app's authorize + parse + validate +
    model and readiness check."""

    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        body = await prepare(request, TokenizeRequest)
        return await asyncio.to_thread(tokenize, state.model, body)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        state.authorize(request)
        state.check_ready()
        return tokenizer_description(state.model)

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        body = await prepare(request, DetokenizeRequest)
        return await asyncio.to_thread(detokenize, state.model, body)
