"""The FastAPI app: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus /health and /metrics.

The model loads on a thread of its own when the app starts (/health answers 503 until it is ready); then a
ServingLoop's thread steps the batch. Each request submits its prompt and options to the loop and receives its
events through an asyncio queue fed with `loop.call_soon_threadsafe`, so the event loop never waits on the model.
A client that goes away (mid-stream or while waiting for a whole response) has its sequence cancelled at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from engine.errors import EngineError
from engine.generation.serving import QueueFullError, ServingLoop, ServingStoppedError, StepFailedError, Ticket
from engine.generation.state import STOP_CANCELLED, GenerationResult, TokenEvent, default_options
from engine.serve.errors import SERVER_ERROR, APIError, bad_request, install_error_handlers, validation_error
from engine.serve.metrics import ServerMetrics
from engine.serve.params import Job, chat_job, completion_job
from engine.serve.protocol import ChatCompletionRequest, CompletionRequest
from engine.serve.responses import Answer, TokenStrings, finish_reason, sse
from weights.errors import CheckpointError

log = logging.getLogger("tinyllama.serve")  # one line per request (INFO), failures
startup_log = logging.getLogger("tinyllama.serve.startup")  # the ready line: shown at every log level

OWNER = "tinyllama-engine"
RETRY_AFTER_BUSY = "1"
RETRY_AFTER_LOADING = "5"


@dataclass
class ServerState:
    """What the routes share: settings, the model and serving loop once loaded, the metrics."""

    load: Callable[[], object]
    served_model_name: str
    api_key: str | None
    max_active: int
    max_queue: int
    on_load_error: Callable[[str], None] | None = None
    model: object = None
    serving: ServingLoop | None = None
    strings: TokenStrings | None = None
    load_error: str | None = None
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: ServerMetrics = field(init=False)

    def __post_init__(self):
        self.metrics = ServerMetrics(running=lambda: self.serving.running if self.serving else 0,
                                     waiting=lambda: self.serving.waiting if self.serving else 0)

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and the serving loop runs."""
        return self.serving is not None

    def load_model(self) -> None:
        """Load the model and start the serving loop (on the loading thread); on failure record a one-line reason."""
        started = time.perf_counter()
        try:
            model = self.load()
            strings = TokenStrings(model.tokenizer)  # serving needs the tokenizer: fail now, not per request
            default_options(model, json_object=True)  # builds llguidance's tokenizer once (~0.3 s), not per request
            serving = ServingLoop(model, max_active=self.max_active, max_queue=self.max_queue).start()
        except Exception as error:  # noqa: BLE001 - the CLI shows the message and exits 1
            self.load_error = str(error) or type(error).__name__
            if not isinstance(error, (EngineError, CheckpointError, OSError)):  # not a user's error: a bug
                log.exception("loading the model failed")
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)
            return
        self.model, self.strings, self.serving = model, strings, serving
        startup_log.info("model loaded in %.1f s: serving %r (%d-token window, up to %d sequences at once)",
                 time.perf_counter() - started, self.served_model_name, model.config.max_position_embeddings,
                 self.max_active)

    def begin_shutdown(self, grace: float) -> None:
        """Stop taking requests; those in flight get `grace` seconds to finish, then are cancelled (finish 'abort').

        Call from the event loop (the server's shutdown hook).
        """
        self.draining = True
        if self.serving is not None:
            asyncio.get_running_loop().call_later(max(0.0, grace), self.serving.cancel_all)

    def check_ready(self) -> None:
        """503 (with Retry-After) while loading or shutting down."""
        if self.draining:
            raise APIError(503, "the server is shutting down", SERVER_ERROR)
        if not self.ready:
            raise APIError(503, "the model is still loading; retry shortly", SERVER_ERROR,
                           headers={"Retry-After": RETRY_AFTER_LOADING})

    def authorize(self, request: Request) -> None:
        """401 unless the request carries 'Authorization: Bearer <api key>' (when the server has a key)."""
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           param=None, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, name: str | None) -> None:
        """404 model_not_found for a model name other than the one served (an absent name means that one)."""
        if name is not None and name != self.served_model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {self.served_model_name!r}",
                           param="model", code="model_not_found")


def create_app(load: Callable[[], object], served_model_name: str, api_key: str | None = None,
               max_active: int = 32, max_queue: int = 256,
               on_load_error: Callable[[str], None] | None = None, allowed_origins: list[str] = ()) -> FastAPI:
    """The server's FastAPI app. `load()` returns the Model (called on a thread when the app starts);
    `on_load_error(message)` is called if it fails; `allowed_origins`: web pages (origins, or '*') whose scripts
    may call the API (CORS; none by default). `app.state.server` is the ServerState."""
    state = ServerState(load, served_model_name, api_key, max_active, max_queue, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load_model, name="tinyllama-load", daemon=True).start()
        yield
        if state.serving is not None:
            state.serving.stop()

    app = FastAPI(title="tinyllama serve", lifespan=lifespan)
    app.state.server = state
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    install_error_handlers(app, on_error=lambda status: state.metrics.errors.labels(str(status)).inc())

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if state.ready and not state.draining:
            return {"status": "ok"}
        status = "shutting down" if state.draining else "loading"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": RETRY_AFTER_LOADING})

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    def model_card() -> dict:
        card = {"id": state.served_model_name, "object": "model", "created": state.created, "owned_by": OWNER}
        if state.model is not None:
            card["max_model_len"] = state.model.config.max_position_embeddings
        return card

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        state.check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _prepare(request, state, ChatCompletionRequest)
        job = await asyncio.to_thread(chat_job, state.model, body)  # a schema compiles off the event loop
        return await _answer(request, state, job, Answer("chat", state.served_model_name, state.strings,
                                                         job.logprobs, job.include_usage, job.continuous_usage,
                                                         len(job.prompt_ids)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _prepare(request, state, CompletionRequest)
        job = await asyncio.to_thread(completion_job, state.model, body)  # a schema compiles off the event loop
        return await _answer(request, state, job, Answer("completion", state.served_model_name, state.strings,
                                                         job.logprobs, job.include_usage, job.continuous_usage,
                                                         len(job.prompt_ids)))

    return app


async def _prepare(request: Request, state: ServerState, model_class):
    """Authorize, parse and validate the JSON body (400 naming the field), check the model name and readiness."""
    state.authorize(request)
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        body = model_class.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    state.check_model(body.model)
    state.check_ready()
    return body


@dataclass
class _Timing:
    """One request's clock, kept on the serving thread: arrival, first and latest token, and how it ended."""

    arrived: float
    first: float | None = None
    last: float | None = None
    client_gone: bool = False


async def _answer(request: Request, state: ServerState, job: Job, answer: Answer):
    """Submit the job and answer: a stream of SSE chunks or one JSON body. Errors before the first token are HTTP
    errors; a client that goes away cancels the sequence."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    timing = _Timing(time.perf_counter())
    metrics = state.metrics

    def on_event(item) -> None:  # on the serving thread
        now = time.perf_counter()
        if isinstance(item, TokenEvent):
            if timing.first is None:
                timing.first = now
                metrics.time_to_first_token.observe(now - timing.arrived)
                metrics.prompt_tokens.inc(len(job.prompt_ids))
            else:
                metrics.time_per_output_token.observe(now - timing.last)
            timing.last = now
            metrics.generation_tokens.inc()
        elif isinstance(item, GenerationResult):
            metrics.requests.labels(finish_reason(item)).inc()
            metrics.request_latency.observe(now - timing.arrived)
            _log_request(answer, item, timing, now)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (the server is gone)
            pass

    try:
        ticket = state.serving.submit(job.prompt_ids, job.options, on_event)
    except QueueFullError as e:
        raise APIError(503, str(e), SERVER_ERROR, headers={"Retry-After": RETRY_AFTER_BUSY}) from None
    except ServingStoppedError as e:
        raise APIError(503, str(e), SERVER_ERROR) from None

    def client_gone() -> None:
        timing.client_gone = True
        state.serving.cancel(ticket)

    watcher = asyncio.create_task(_watch_disconnect(request, client_gone))
    handed_over = False
    try:
        first = await queue.get()
        _raise_if_error(first)
        if job.stream:
            handed_over = True
            return StreamingResponse(_stream(state, ticket, queue, first, answer, watcher),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        events, item = [], first
        while isinstance(item, TokenEvent):
            events.append(item)
            item = await queue.get()
        _raise_if_error(item)
        if item.stop_reason == STOP_CANCELLED:
            raise APIError(503, "the request was cancelled: the server is shutting down", SERVER_ERROR)
        return JSONResponse(answer.complete(events, item))
    finally:
        if not handed_over:
            watcher.cancel()
            if not ticket.done:  # the client went away, or this task was cancelled
                state.serving.cancel(ticket)


def _raise_if_error(item) -> None:
    if isinstance(item, StepFailedError):
        raise APIError(500, str(item), SERVER_ERROR)
    if isinstance(item, EngineError):
        raise bad_request(str(item))


async def _stream(state: ServerState, ticket: Ticket, queue: asyncio.Queue, first, answer: Answer,
                  watcher: asyncio.Task):
    """The SSE body: role chunk, content deltas (all events queued at a time in one chunk), the finish chunk, the
    usage chunk when asked, then [DONE]."""
    ended = False
    try:
        opening = answer.first_chunk()
        if opening is not None:
            yield sse(opening)
        pending = [first]
        while True:
            while not queue.empty():
                pending.append(queue.get_nowait())
            events = [item for item in pending if isinstance(item, TokenEvent)]
            end = next((item for item in pending if not isinstance(item, TokenEvent)), None)
            chunk = answer.delta_chunk(events)
            if chunk is not None:
                yield sse(chunk)
            if end is not None:
                ended = True
                if isinstance(end, GenerationResult):
                    yield sse(answer.final_chunk(end))
                    if answer.include_usage:
                        yield sse(answer.usage_chunk(end))
                else:
                    failure = APIError(500, str(end), SERVER_ERROR)
                    yield sse(failure.body())
                yield sse("[DONE]")
                return
            pending = [await queue.get()]
    finally:
        watcher.cancel()
        if not ended:
            state.serving.cancel(ticket)


async def _watch_disconnect(request: Request, on_gone: Callable[[], None]) -> None:
    """Call on_gone() when the client disconnects (uvicorn answers receive() with http.disconnect)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                on_gone()
                return
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - a server without disconnect messages: the stream's own end cancels
        return


def _log_request(answer: Answer, result: GenerationResult, timing: _Timing, now: float) -> None:
    """One line per request: id, prompt and completion tokens, time to first token, tokens/s, finish reason."""
    n = len(result.token_ids)
    ttft = (timing.first - timing.arrived) if timing.first is not None else None
    rate = (n - 1) / (timing.last - timing.first) if n > 1 and timing.last > timing.first else 0.0
    reason = "client gone" if timing.client_gone and result.stop_reason == STOP_CANCELLED else finish_reason(result)
    log.info("%s: prompt %d tokens, completion %d tokens, first token %s, %.1f tok/s, %.2f s, finish %s",
             answer.id, len(result.prompt_token_ids), n, "-" if ttft is None else f"{ttft:.3f} s", rate,
             now - timing.arrived, reason)
