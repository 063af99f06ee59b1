"""The inspection endpoints the web page draws from: `POST /v1/inspect/attention` and `POST /v1/inspect/lens`.

Thin, like the rest of the HTTP layer: a request names a conversation (`messages`, rendered with the model's chat
template) or a `prompt` (text or token ids); the route checks it, runs `engine.inspect` on the serving thread
(`ServingLoop.call`: a traced pass between two batched steps, never racing the scheduler) and returns JSON.
NumPy backend only (400 naming the backend otherwise); a trace larger than the server's limit is a 400 too.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Union

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import EngineError
from engine.generation.serving import ServingStoppedError
from engine.inspect.attention import head_summary
from engine.inspect.lens import logit_lens
from engine.inspect.tokens import token_rows
from engine.runtime.trace import trace_bytes
from engine.serve.errors import SERVER_ERROR, APIError, bad_request
from engine.serve.params import chat_messages
from engine.text.tool_calls import prompt_messages
from engine.serve.protocol import ChatMessage
from engine.text.chat_template import ChatTemplateError, NoChatTemplateError

MIN_TOKENS = 2  # the head summary averages over queries 1..T-1


class InspectRequest(BaseModel):
    """What to look at: `messages` (a chat; a last assistant message is the reply to inspect) or `prompt`."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] | None = None
    prompt: Union[str, list[int], None] = None


class AttentionRequest(InspectRequest):
    """POST /v1/inspect/attention: one head's map, and (summary) every head's three numbers."""

    layer: int = Field(0, ge=0)
    head: int = Field(0, ge=0)
    summary: bool = True


Prepare = Callable[[Request, type], Awaitable[object]]


def add_inspect_routes(app: FastAPI, state, prepare: Prepare, max_bytes: int) -> None:
    """Mount the inspection routes. `state`: the app's ServerState; `prepare(request, body_class)`: the app's
    authorize + parse + validate + readiness check; `max_bytes`: the largest trace a request may make."""

    @app.post("/v1/inspect/attention")
    async def attention(request: Request):
        body = await prepare(request, AttentionRequest)
        model = state.model
        ids = inspected_ids(model, body)
        c = model.config
        if body.layer >= c.num_hidden_layers:
            raise bad_request(f"layer: this model has layers 0..{c.num_hidden_layers - 1}, got {body.layer}", "layer")
        if body.head >= c.num_attention_heads:
            raise bad_request(f"head: this model has heads 0..{c.num_attention_heads - 1}, got {body.head}", "head")
        check_traceable(model, trace_bytes(c, len(ids), True, False, (body.layer,)), len(ids), max_bytes)

        def work():  # on the serving thread
            trace = model.trace(ids, attentions=True, layers=[body.layer], max_bytes=max_bytes)
            summary = head_summary(model, ids, max_bytes=max_bytes) if body.summary else None
            return trace.attentions[body.layer][body.head], summary

        weights, summary = await run_on_model(state, work)
        out = {"object": "inspect.attention", "model": state.served_model_name, "tokens": token_list(model, ids),
               "num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads, "layer": body.layer,
               "head": body.head, "attention": weights.tolist()}
        if summary is not None:
            out["heads"] = {"to_first": summary.to_first.tolist(), "to_previous": summary.to_previous.tolist(),
                            "entropy": summary.entropy.tolist()}
        return out

    @app.post("/v1/inspect/lens")
    async def lens(request: Request):
        body = await prepare(request, InspectRequest)
        model = state.model
        ids = inspected_ids(model, body)
        c = model.config
        layers = tuple(range(c.num_hidden_layers + 1))
        check_traceable(model, trace_bytes(c, len(ids), False, True, layers), len(ids), max_bytes)
        table = await run_on_model(state, lambda: logit_lens(model, ids, max_bytes=max_bytes))
        tokenizer = model.tokenizer
        return {"object": "inspect.lens", "model": state.served_model_name, "tokens": token_list(model, ids),
                "rows": table.row_labels, "top_ids": table.top_ids.tolist(),
                "top_pieces": [[tokenizer.id_to_token(int(t)) for t in row] for row in table.top_ids],
                "top_probs": table.top_probs.tolist(), "next_probs": table.next_probs.tolist()}


def inspected_ids(model, body: InspectRequest) -> list[int]:
    """The request's token ids: the messages through the chat template (no generation prompt after an assistant
    message), or the prompt (text: BOS added; ids as given); 400 naming the field when unusable."""
    if (body.messages is None) == (body.prompt is None):
        raise bad_request("send either `messages` or `prompt`", "messages")
    tokenizer = model.tokenizer
    if body.messages is not None:
        if not body.messages:
            raise bad_request("messages: the list is empty", "messages")
        messages, _ = prompt_messages(tokenizer.chat_template, chat_messages(body), None)
        try:
            ids = tokenizer.encode_chat(messages, add_generation_prompt=messages[-1]["role"] != "assistant")
        except NoChatTemplateError:
            raise bad_request("this model has no chat template: send `prompt`", "messages") from None
        except ChatTemplateError as e:
            raise bad_request(f"messages: {e}", "messages") from None
        param = "messages"
    else:
        ids, param = (tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)), "prompt"
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise bad_request(f"{param}: token ids must be in 0..{vocab - 1}", param)
    if len(ids) < MIN_TOKENS:
        raise bad_request(f"{param}: at least {MIN_TOKENS} tokens are needed, got {len(ids)}", param)
    window = model.config.max_position_embeddings
    if len(ids) > window:
        raise bad_request(f"{param}: {len(ids)} tokens, more than the model's {window}-token window", param,
                          "context_length_exceeded")
    return ids


def check_traceable(model, needed: int, n_tokens: int, max_bytes: int) -> None:
    """400 on a backend that cannot trace, or when the trace would hold more than `max_bytes`."""
    backend = getattr(model.backend, "name", type(model.backend).__name__)
    if backend != "numpy":
        raise bad_request(f"inspection runs on the numpy backend only; this server runs the {backend} backend "
                          "(start it with --backend numpy)")
    if needed > max_bytes:
        raise bad_request(f"this inspection would hold {needed / 1e6:.1f} MB ({n_tokens} tokens), above the "
                          f"server's {max_bytes / 1e6:.1f} MB limit (--trace-memory-limit): inspect a shorter "
                          "conversation", "messages", "trace_too_large")


async def run_on_model(state, work: Callable[[], object]):
    """Run work() on the serving thread (between batched steps) and await its result; EngineError -> 400."""
    try:
        future = state.serving.call(work)
    except ServingStoppedError as e:
        raise APIError(503, str(e), SERVER_ERROR) from None
    try:
        return await asyncio.wrap_future(future)
    except EngineError as e:
        raise bad_request(str(e)) from None


def token_list(model, ids: list[int]) -> list[dict]:
    """Each token as {"id", "piece", "text"} (text: its UTF-8 text, null for part of a character)."""
    return [{"id": row.token_id, "piece": row.piece, "text": row.text, "special": row.special}
            for row in token_rows(model.tokenizer, ids)]
