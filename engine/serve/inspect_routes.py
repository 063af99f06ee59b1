"""The inspection endpoints the web page draws from: `POST /v1/inspect/attention` and `POST /v1/inspect/lens`.

Thin, like the rest of the HTTP layer: a request names a conversation (`messages`, rendered with the model's chat
template) or a `prompt` (text or token ids), with the strict types of the other routes. Bounded like generation:

- on a worker thread, never the event loop: the body is parsed, a text that cannot fit the window is refused from
  its length before it is tokenized, then it is tokenized, and the inspection's memory is checked (400
  `trace_too_large` above `--trace-memory-limit`, which bounds its KV cache, its arrays, one slice's work and the
  size of its answer together);
- at most `max_inspections` run at once (503 with Retry-After beyond);
- the trace runs on the serving thread cut into slices between batched steps (engine.inspect.sliced through
  ServingLoop.submit_work: each slice about half a step's time), so streams keep their pace; a client that leaves
  cancels it before its next slice;
- the JSON answer is written a row at a time on worker threads as it is sent (orjson: a float32 in its shortest form,
  which reads back as the same float32).

NumPy backend only (400 naming the backend otherwise).
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
from typing import Awaitable, Callable, Iterator, Union

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import EngineError
from engine.generation.serving import ServingStoppedError
from engine.inspect.attention import AttentionInspection
from engine.inspect.lens import LensInspection
from engine.inspect.tokens import token_rows
from engine.serve.disconnect import watch_disconnect
from engine.serve.errors import SERVER_ERROR, APIError, ClientGone, bad_request
from engine.serve.params import chat_messages
from engine.text.tool_calls import prompt_messages
from engine.serve.protocol import ChatMessage
from engine.text.chat_template import ChatTemplateError, NoChatTemplateError

log = logging.getLogger("tinyllama.serve")
MIN_TOKENS = 2  # the head summary averages over queries 1..T-1
MAX_INSPECTIONS = 2  # inspections running at once (--max-inspections)
RETRY_AFTER_BUSY = "1"
TOKEN_JSON_BYTES = 256  # the most one entry of "tokens" takes: {"id", "piece", "text", "special"}, escapes and all
NUMBER_JSON_BYTES = 25  # the most one float64 takes in JSON, with its comma: -1.2345678901234567e-300,
FLOAT32_JSON_BYTES = 16  # the most one float32 takes (its shortest form), with its comma: -1.2345678e-38,
PIECE_JSON_BYTES = 100  # the most one entry of "top_pieces" takes (a 16-character piece, every character escaped)
JSON_CHUNK_BYTES = 1 << 18  # the answer is sent in pieces of about this size


class InspectRequest(BaseModel):
    """What to look at: `messages` (a chat; a last assistant message is the reply to inspect) or `prompt`; strict
    types as on the other routes (no true for 1, 1.0 for an integer or "yes" for a boolean)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    model: str | None = None
    messages: list[ChatMessage] | None = None
    prompt: Union[str, list[int], None] = None


class AttentionRequest(InspectRequest):
    """POST /v1/inspect/attention: one head's map, and (summary) every head's three numbers."""

    layer: int = Field(0, ge=0)
    head: int = Field(0, ge=0)
    summary: bool = True


Prepare = Callable[[Request, type, Callable], Awaitable[object]]


class Slots:
    """A count of inspections running, up to a limit (taken on the event loop, given back from any thread), shown
    by `gauge` (a prometheus Gauge) when given."""

    def __init__(self, limit: int, gauge=None):
        self.limit, self.running, self.gauge = limit, 0, gauge
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Take a slot -> False when all are taken."""
        with self._lock:
            if self.running >= self.limit:
                return False
            self.running += 1
        if self.gauge is not None:
            self.gauge.inc()
        return True

    def give_back(self) -> None:
        """Return a slot taken with `take`."""
        with self._lock:
            self.running -= 1
        if self.gauge is not None:
            self.gauge.dec()


def add_inspect_routes(app: FastAPI, state, prepare: Prepare, max_bytes: int,
                       max_inspections: int = MAX_INSPECTIONS) -> None:
    """Mount the inspection routes. `state`: the app's ServerState; `prepare(request, body_class, make)`: the app's
    authorize + read + (on a worker thread) parse, validate, readiness check and make(model, body); `max_bytes`: the
    most memory one inspection may take (answer included); `max_inspections`: inspections running at once."""
    slots = Slots(max_inspections, state.metrics.inspections_running)

    @app.post("/v1/inspect/attention")
    async def attention(request: Request):
        job = await prepare(request, AttentionRequest, lambda model, body: attention_job(model, body, max_bytes))
        return await run_inspection(request, state, slots, job, lambda result: attention_answer(state, job, result))

    @app.post("/v1/inspect/lens")
    async def lens(request: Request):
        job = await prepare(request, InspectRequest, lambda model, body: lens_job(model, body, max_bytes))
        return await run_inspection(request, state, slots, job, lambda table: lens_answer(state, job, table))


def attention_job(model, body: AttentionRequest, max_bytes: int) -> AttentionInspection:
    """The checked AttentionInspection of a request (worker thread): 400 naming the field otherwise."""
    c = model.config
    check_backend(model)
    if body.layer >= c.num_hidden_layers:
        raise bad_request(f"layer: this model has layers 0..{c.num_hidden_layers - 1}, got {body.layer}", "layer")
    if body.head >= c.num_attention_heads:
        raise bad_request(f"head: this model has heads 0..{c.num_attention_heads - 1}, got {body.head}", "head")
    ids, param = inspected_ids(model, body)
    t = len(ids)
    answer = t * TOKEN_JSON_BYTES + t * t * FLOAT32_JSON_BYTES
    if body.summary:
        answer += 3 * c.num_hidden_layers * c.num_attention_heads * NUMBER_JSON_BYTES
    try:
        return AttentionInspection(model, ids, layer=body.layer, head=body.head, summary=body.summary,
                                   max_bytes=max_bytes, answer_bytes=answer)
    except EngineError as e:
        raise too_large(e, param) from None


def lens_job(model, body: InspectRequest, max_bytes: int) -> LensInspection:
    """The checked LensInspection of a request (worker thread): 400 naming the field otherwise."""
    check_backend(model)
    ids, param = inspected_ids(model, body)
    t, rows = len(ids), model.config.num_hidden_layers + 1
    answer = t * TOKEN_JSON_BYTES + rows * t * (3 * NUMBER_JSON_BYTES + PIECE_JSON_BYTES)
    try:
        return LensInspection(model, ids, max_bytes=max_bytes, answer_bytes=answer)
    except EngineError as e:
        raise too_large(e, param) from None


def too_large(error: EngineError, param: str) -> APIError:
    return bad_request(f"{error} (--trace-memory-limit): inspect a shorter conversation", param, "trace_too_large")


def inspected_ids(model, body: InspectRequest) -> tuple[list[int], str]:
    """The request's token ids and the field they came from: the messages through the chat template (no generation
    prompt after an assistant message), or the prompt (text: BOS added; ids as given). A text that cannot fit the
    window is refused from its length, before it is tokenized; 400 naming the field when unusable."""
    if (body.messages is None) == (body.prompt is None):
        raise bad_request("send either `messages` or `prompt`", "messages")
    tokenizer = model.tokenizer
    if body.messages is not None:
        if not body.messages:
            raise bad_request("messages: the list is empty", "messages")
        messages, _ = prompt_messages(tokenizer.chat_template, chat_messages(body), None)
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=messages[-1]["role"] != "assistant")
        except NoChatTemplateError:
            raise bad_request("this model has no chat template: send `prompt`", "messages") from None
        except ChatTemplateError as e:
            raise bad_request(f"messages: {e}", "messages") from None
        param = "messages"
        refuse_long_text(model, text, param)
        ids = tokenizer.encode_rendered_chat(text, threaded=True)
    elif isinstance(body.prompt, str):
        param = "prompt"
        refuse_long_text(model, body.prompt, param)
        ids = tokenizer.encode(body.prompt, threaded=True)
    else:
        ids, param = list(body.prompt), "prompt"
    window = model.config.max_position_embeddings
    if len(ids) > window:
        raise bad_request(f"{param}: {len(ids)} tokens, more than the model's {window}-token window", param,
                          "context_length_exceeded")
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise bad_request(f"{param}: token ids must be in 0..{vocab - 1}", param)
    if len(ids) < MIN_TOKENS:
        raise bad_request(f"{param}: at least {MIN_TOKENS} tokens are needed, got {len(ids)}", param)
    return ids, param


def refuse_long_text(model, text: str, param: str) -> None:
    """400 context_length_exceeded, without tokenizing, when `text` has more tokens than the window for sure (no
    token stands for more than the tokenizer's longest piece; see engine.serve.params.refuse_long_text)."""
    per_token = model.tokenizer.max_chars_per_token()
    window = model.config.max_position_embeddings
    if per_token and math.ceil(len(text) / per_token) > window:
        raise bad_request(f"{param}: at least {math.ceil(len(text) / per_token)} tokens, more than the model's "
                          f"{window}-token window", param, "context_length_exceeded")


def check_backend(model) -> None:
    """400 on a backend that cannot trace."""
    backend = getattr(model.backend, "name", type(model.backend).__name__)
    if backend != "numpy":
        raise bad_request(f"inspection runs on the numpy backend only; this server runs the {backend} backend "
                          "(start it with --backend numpy)")


async def run_inspection(request: Request, state, slots: Slots, job, answer: Callable[[object], dict]):
    """Run `job` in slices on the serving thread (503 when `slots` are all taken or the server stops) and stream
    answer(result) as JSON; the client leaving cancels the job (counted, logged, nothing sent)."""
    if not slots.take():
        raise APIError(503, f"the server is busy: {slots.limit} inspections are running (--max-inspections); try "
                            "again shortly", SERVER_ERROR, headers={"Retry-After": RETRY_AFTER_BUSY})
    handed_over = False
    try:
        body = answer(await run_sliced(request, state, job, "inspection"))
        handed_over = True
        return StreamingResponse(_released(json_chunks(body), slots), media_type="application/json")
    finally:
        if not handed_over:
            slots.give_back()


async def run_sliced(request: Request | None, state, job, what: str):
    """Run a sliced `job` on the serving thread between batched steps (ServingLoop.submit_work) -> its result.
    The client leaving (`request`; None: not watched) cancels it before its next slice (counted, logged as a client
    gone); 503 when the server stops, 400 for an EngineError of the job."""
    try:
        future = state.serving.submit_work(job)
    except ServingStoppedError as e:
        raise APIError(503, str(e), SERVER_ERROR) from None
    gone = []

    def client_gone() -> None:
        gone.append(True)
        future.cancel()

    watcher = asyncio.create_task(watch_disconnect(request, client_gone)) if request is not None else None
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if not gone:
            raise
        state.metrics.clients_gone.labels("waiting").inc()
        log.info("client %s went away during its %s: cancelled", _client(request), what)
        raise ClientGone from None
    except ServingStoppedError as e:
        raise APIError(503, str(e), SERVER_ERROR) from None
    except EngineError as e:
        raise bad_request(str(e)) from None
    finally:
        if watcher is not None:
            watcher.cancel()
        future.cancel()  # a no-op once it has ended


def _released(chunks: Iterator[bytes], slots: Slots) -> Iterator[bytes]:
    """The answer's chunks; the slot is given back once they are sent (or the client stops reading)."""
    try:
        yield from chunks
    finally:
        slots.give_back()


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "-"


def attention_answer(state, job: AttentionInspection, result) -> dict:
    """The /v1/inspect/attention body; arrays stay NumPy until json_chunks writes them a row at a time."""
    weights, summary = result
    c = state.model.config
    out = {"object": "inspect.attention", "model": state.served_model_name, "tokens": Rows(tokens(state, job.ids)),
           "num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads, "layer": job.layer,
           "head": job.head, "attention": weights}
    if summary is not None:
        out["heads"] = {"to_first": summary.to_first, "to_previous": summary.to_previous, "entropy": summary.entropy}
    return out


def lens_answer(state, job: LensInspection, table) -> dict:
    """The /v1/inspect/lens body (see attention_answer)."""
    tokenizer = state.model.tokenizer
    return {"object": "inspect.lens", "model": state.served_model_name, "tokens": Rows(tokens(state, job.ids)),
            "rows": table.row_labels, "top_ids": table.top_ids,
            "top_pieces": Rows([tokenizer.id_to_token(int(t)) for t in row] for row in table.top_ids),
            "top_probs": table.top_probs, "next_probs": table.next_probs}


def tokens(state, ids: list[int]) -> Iterator[dict]:
    """Each token as {"id", "piece", "text", "special"} (text: its UTF-8 text, null for part of a character)."""
    for row in token_rows(state.model.tokenizer, ids):
        yield {"id": row.token_id, "piece": row.piece, "text": row.text, "special": row.special}


class Rows:
    """A JSON list whose items are made as they are written (json_chunks)."""

    def __init__(self, items):
        self.items = items


def json_chunks(value) -> Iterator[bytes]:
    """`value` as compact JSON in pieces of about JSON_CHUNK_BYTES: dicts, NumPy arrays written a row at a time
    (float32 in its shortest form, float64 as Python writes it: both read back as the same number), Rows made as
    they are written, anything else orjson takes."""
    pending: list[bytes] = []
    size = 0
    for piece in _json_pieces(value):
        pending.append(piece)
        size += len(piece)
        if size >= JSON_CHUNK_BYTES:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


def _json_pieces(value) -> Iterator[bytes]:
    if isinstance(value, dict):
        yield b"{"
        for i, (key, item) in enumerate(value.items()):
            yield (b"," if i else b"") + orjson.dumps(key) + b":"
            yield from _json_pieces(item)
        yield b"}"
    elif isinstance(value, np.ndarray) and value.ndim > 1:
        yield b"["
        for i, row in enumerate(value):
            yield (b"," if i else b"") + orjson.dumps(np.ascontiguousarray(row), option=orjson.OPT_SERIALIZE_NUMPY)
        yield b"]"
    elif isinstance(value, np.ndarray):
        yield orjson.dumps(np.ascontiguousarray(value), option=orjson.OPT_SERIALIZE_NUMPY)
    elif isinstance(value, Rows):
        yield b"["
        for i, item in enumerate(value.items):
            yield (b"," if i else b"") + orjson.dumps(item)
        yield b"]"
    else:
        yield orjson.dumps(value)
