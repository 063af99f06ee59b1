"""The FastAPI app: OpenAI's /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models (each also without
/v1, as llama.cpp serves them), /tokenize and /detokenize, plus /health and /metrics.

The model loads on a thread of its own when the app starts (/health answers 503 until it is ready); then a
ServingLoop's thread steps the batch. Each request submits its prompt and options to the loop and receives its
events through an asyncio queue fed with `loop.call_soon_threadsafe`, so the event loop never waits on the model.
A client that goes away (mid-stream or while waiting for a whole response) has its sequence cancelled at once.

A request body is read with a size cap (413 past it) and a deadline (408), then parsed, validated and tokenized on a
worker thread (the tokenizer releases the GIL there), so a huge or slow request never stalls the event loop. An
exception no handler takes is a 500 in OpenAI's shape that leaves the keep-alive connection usable. On shutdown the
server drains: /health and new requests answer 503 while the requests in flight get the grace period.

Once no request has arrived for a second and the batch is idle, the memory requests freed (parsed bodies, compiled
constraints, answers) is given back to the OS (engine.runtime.memory), so the resident size after a burst is what
the server still holds.

The prefix cache is partitioned by client: with several API keys each key's requests only ever find their own
prompts, and a request's `cache_salt` (vLLM's field) narrows its partition further; a server with one key or none
shares one partition, so clients that must not learn each other's prompts get keys or salts of their own.
"""
from __future__ import annotations

import asyncio
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
from starlette.requests import ClientDisconnect

from engine.errors import EngineError
from engine.generation.serving import (DEFAULT_PREFIX_CACHE_MB, NeverFitsError, QueueFullError, ServingLoop,
                                       ServingStoppedError, StepFailedError, Ticket, choice_options)
from engine.generation.constraint_compiler import ConstraintCompiler
from engine.generation.state import STOP_CANCELLED, GenerationResult, TokenEvent, default_options, eos_ids_of
from engine.serve.disconnect import watch_disconnect as _watch_disconnect
from engine.serve.errors import (SERVER_ERROR, APIError, ClientGone, bad_request, install_error_handlers,
                                 validation_error)
from engine.inspect.embeddings import DEFAULT_POOLING, check_pooling
from engine.inspect.sliced import INSPECTION_MEMORY_LIMIT
from engine.runtime.memory import map_large_blocks, release_free_memory
from engine.serve.embeddings import add_embedding_routes
from engine.serve.inspect_routes import MAX_INSPECTIONS, add_inspect_routes
from engine.serve.tokenize_routes import add_tokenize_routes
from engine.serve.metrics import ServerMetrics
from engine.serve.ollama import add_ollama_routes
from engine.serve.page import add_page_routes
from engine.serve.params import Job, chat_job, completion_job
from engine.serve.protocol import ChatCompletionRequest, CompletionRequest, parse_body
from engine.serve.responses import Answer, Echo, TokenStrings, finish_reason, speculation_usage, sse, usage_of
from engine.serve.structured import attach_constraint
from engine.serve.tools import ToolAnswer
from weights.errors import CheckpointError

log = logging.getLogger("tinyllama.serve")  # one line per request (INFO), failures
startup_log = logging.getLogger("tinyllama.serve.startup")  # the ready line: shown at every log level

OWNER = "tinyllama-engine"
RETRY_AFTER_BUSY = "1"
RETRY_AFTER_LOADING = "5"
MAX_REQUEST_BYTES = 8 * 2 ** 20  # the default body cap (--max-request-mb 8)
READ_TIMEOUT = 30.0  # the default seconds a request's body may take to arrive (--read-timeout)
DISCARD_BYTES = 64 * 2 ** 20  # past the cap, read and dropped so the client can read its 413 before the close
IDLE_RELEASE_SECONDS = 1.0  # no request for this long, and an idle batch: freed memory goes back to the OS


@dataclass
class ServerState:
    """What the routes share: settings, the model and serving loop once loaded, the metrics."""

    load: Callable[[], object]
    served_model_name: str
    api_key: str | tuple[str, ...] | None  # one key or several (each its own prefix cache partition)
    max_active: int
    max_queue: int
    on_load_error: Callable[[str], None] | None = None
    max_request_bytes: int = MAX_REQUEST_BYTES
    read_timeout: float = READ_TIMEOUT
    speculation: dict = field(default_factory=dict)  # speculate=N, draft=...: how every request is decoded
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB  # 0: no prefix cache
    pooling: str = DEFAULT_POOLING  # how /v1/embeddings pools the last hidden state (engine.inspect.embeddings)
    model_aliases: tuple[str, ...] = ()  # more names the model answers to (--served-model-name A B ...)
    model: object = None
    serving: ServingLoop | None = None
    constraints: ConstraintCompiler | None = None  # compiles constraints off the event loop, isolated
    strings: TokenStrings | None = None
    load_error: str | None = None
    draining: bool = False
    grace_over: asyncio.Event = field(default_factory=asyncio.Event)  # set when the shutdown grace period ends
    created: int = field(default_factory=lambda: int(time.time()))
    arrivals: int = 0  # requests that reached the API (event loop)
    metrics: ServerMetrics = field(init=False)

    def __post_init__(self):
        self.metrics = ServerMetrics(running=lambda: self.serving.running if self.serving else 0,
                                     waiting=lambda: self.serving.waiting if self.serving else 0,
                                     prefix_cache=lambda: self.serving.prefix_cache if self.serving else None,
                                     kv_cache_usage=self.kv_cache_usage, model_name=lambda: self.served_model_name)

    def kv_cache_usage(self) -> float:
        """The fraction (0..1) of the KV the batch can hold (max_active sequences of a full window) held now."""
        if self.serving is None:
            return 0.0
        return self.serving.kv_tokens / (self.max_active * self.model.config.max_position_embeddings)

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
            model.tokenizer.max_chars_per_token()  # the length bound huge prompts are refused by (~0.7 s once)
            constraints = ConstraintCompiler(model.tokenizer, model.config.vocab_size, eos_ids_of(model)).start()
            serving = ServingLoop(model, max_active=self.max_active, max_queue=self.max_queue,
                                  **self.speculation,
                                  prefix_cache_bytes=int(self.prefix_cache_mb * 2 ** 20)).start()
        except Exception as error:  # noqa: BLE001 - the CLI shows the message and exits 1
            self.load_error = str(error) or type(error).__name__
            if not isinstance(error, (EngineError, CheckpointError, OSError)):  # not a user's error: a bug
                log.exception("loading the model failed")
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)
            return
        self.model, self.strings, self.serving, self.constraints = model, strings, serving, constraints
        c = model.config
        kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 * c.max_position_embeddings
        startup_log.info("model loaded in %.1f s: serving %r (%d-token window, up to %d sequences at once: their KV "
                         "cache takes at most %.0f MB)", time.perf_counter() - started, self.served_model_name,
                         c.max_position_embeddings, self.max_active, self.max_active * kv_bytes / 2 ** 20)

    def begin_shutdown(self, grace: float) -> None:
        """Stop taking requests; those in flight get `grace` seconds to finish, then are cancelled (finish 'abort').

        Call from the event loop (the server's shutdown hook).
        """
        self.draining = True

        def over() -> None:
            self.grace_over.set()  # requests still uploading their body are answered 503 and closed
            if self.serving is not None:
                self.serving.cancel_all()
            if self.constraints is not None:
                self.constraints.stop()  # compiles waiting or running end in a 503; none is waited for

        asyncio.get_running_loop().call_later(max(0.0, grace), over)

    def check_ready(self) -> None:
        """503 (with Retry-After) while loading or shutting down."""
        if self.draining:
            raise APIError(503, "the server is shutting down", SERVER_ERROR)
        if not self.ready:
            raise APIError(503, "the model is still loading; retry shortly", SERVER_ERROR,
                           headers={"Retry-After": RETRY_AFTER_LOADING})

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The keys a request may carry (none: the API is open)."""
        return () if self.api_key is None else (self.api_key,) if isinstance(self.api_key, str) else self.api_key

    def authorize(self, request: Request) -> int | None:
        """401 unless the request carries 'Authorization: Bearer <api key>' (when the server has keys) -> the index
        of its key among several (None with one key or none: every client is the same one)."""
        keys = self.api_keys
        if not keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        matches = [secrets.compare_digest(given, key.encode()) for key in keys]  # every key compared: no timing
        if scheme.lower() != "bearer" or not any(matches):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           param=None, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return matches.index(True) if len(keys) > 1 else None

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name the model answers to: the served name first, then its aliases."""
        return (self.served_model_name, *(a for a in self.model_aliases if a != self.served_model_name))

    def check_model(self, name: str | None) -> None:
        """404 model_not_found for a model name other than the served ones (an absent name means the first)."""
        if name is not None and name not in self.model_names:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {self.served_model_name!r}",
                           param="model", code="model_not_found")


def create_app(load: Callable[[], object], served_model_name: str, api_key: str | None = None,
               max_active: int = 32, max_queue: int = 256,
               on_load_error: Callable[[str], None] | None = None, allowed_origins: list[str] = (),
               max_request_bytes: int = MAX_REQUEST_BYTES, read_timeout: float = READ_TIMEOUT,
               trace_memory_limit: int = INSPECTION_MEMORY_LIMIT, speculation: dict | None = None,
               prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB, pooling: str = DEFAULT_POOLING,
               model_aliases: tuple[str, ...] = (), max_inspections: int = MAX_INSPECTIONS) -> FastAPI:
    """The server's FastAPI app. `load()` returns the Model (called on a thread when the app starts);
    `on_load_error(message)` is called if it fails; `allowed_origins`: web pages (origins, or '*') whose scripts
    may call the API (CORS; none by default); a request body over `max_request_bytes` is 413, one not complete
    `read_timeout` seconds after its headers 408; `trace_memory_limit`: bytes an /v1/inspect request may take (its
    answer included); `max_inspections`: /v1/inspect requests running at once (503 beyond).
    `speculation`: {"speculate": N, "draft": "lookup" | "int8" | "int4"} for every request
    (the output is plain decoding's); `prefix_cache_mb`: the prefix cache's size (0: none); `pooling`: how
    /v1/embeddings pools ("mean" or "last"); `model_aliases`: more names the model answers to. With an api_key the
    docs (/docs, /redoc, /openapi.json) are off.
    `app.state.server` is the ServerState."""
    map_large_blocks()  # request bodies of megabytes go back to the OS when freed, not into a heap arena
    state = ServerState(load, served_model_name, api_key, max_active, max_queue, on_load_error, max_request_bytes,
                        read_timeout, speculation=dict(speculation or {}),
                        prefix_cache_mb=prefix_cache_mb, pooling=check_pooling(pooling),
                        model_aliases=tuple(model_aliases))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load_model, name="tinyllama-load", daemon=True).start()
        releaser = asyncio.create_task(_release_memory_when_idle(state))
        yield
        releaser.cancel()
        if state.constraints is not None:
            state.constraints.stop()
        if state.serving is not None:
            state.serving.stop()

    docs = {} if api_key is None else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="tinyllama serve", lifespan=lifespan, **docs)
    app.state.server = state
    install_error_handlers(app, on_error=lambda status: state.metrics.errors.labels(str(status)).inc())
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    async def health():
        if state.ready and not state.draining:
            return {"status": "ok"}
        status = "shutting down" if state.draining else "loading"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": RETRY_AFTER_LOADING})

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)  # one operation id in /openapi.json

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": state.created, "owned_by": OWNER}
        if state.model is not None:  # what the web page needs: the window, and whether the model can chat
            card["max_model_len"] = state.model.config.max_position_embeddings
            card["capabilities"] = ["completion"] + (["chat"] if state.model.tokenizer.chat_template else [])
        return card

    # OpenAI's routes answer under /v1 and, as llama.cpp's do, without it
    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in state.model_names]}

    @app.get("/v1/models/{name:path}")
    @app.get("/models/{name:path}")
    async def model(name: str):
        state.check_model(name)
        return model_card(name)

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        job = await _prepare(request, state, ChatCompletionRequest, chat_job)
        settings = (state.served_model_name, state.strings, job.logprobs, job.include_usage, job.continuous_usage,
                    len(job.prompt_ids))
        answer = ToolAnswer(job.tool_calling, *settings) if job.tool_calling else Answer("chat", *settings)
        return await _answer(request, state, job, answer)

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request):
        job = await _prepare(request, state, CompletionRequest, completion_job)
        return await _answer(request, state, job, Answer("completion", state.served_model_name, state.strings,
                                                         job.logprobs, job.include_usage, job.continuous_usage,
                                                         len(job.prompt_ids), echo=_echo(job, 0)))

    add_inspect_routes(app, state, lambda request, body_class, make: _prepare(request, state, body_class, make),
                       trace_memory_limit, max_inspections)
    add_embedding_routes(app, state, lambda request, body_class: _prepare(request, state, body_class))
    add_tokenize_routes(app, state, lambda request, body_class: _prepare(request, state, body_class))
    add_ollama_routes(app, state, lambda request, body_class, make_job: _prepare(request, state, body_class, make_job),
                      lambda request, job, answer: _answer(request, state, job, answer))
    add_page_routes(app)  # the web page at /
    return app


async def _prepare(request: Request, state: ServerState, model_class, make_job: Callable | None = None):
    """Authorize, read the body (413 / 408 / 503 when draining), then on a worker thread parse and validate it (400
    naming the field), check the model name and readiness, and make_job(model, body) (a Job: its prompt tokenized,
    its constraint compiled) -> what make_job made, or the validated body when there is no `make_job`."""
    state.arrivals += 1
    key = state.authorize(request)
    raw = await _read_body(request, state)

    def job() -> Job:
        try:
            body = model_class.model_validate(parse_body(raw))
        except ValidationError as e:
            raise validation_error(e.errors()) from None
        state.check_model(body.model)
        state.check_ready()
        made = make_job(state.model, body) if make_job is not None else body
        if isinstance(made, Job):
            made.cache_salt = cache_partition(key, made.cache_salt)
        return made

    prepared = await asyncio.to_thread(job)
    return await attach_constraint(state.constraints, prepared) if isinstance(prepared, Job) else prepared


async def _release_memory_when_idle(state: ServerState) -> None:
    """Every IDLE_RELEASE_SECONDS: when requests arrived since the last release, none in the last interval, and the
    batch is idle, give the memory they freed back to the OS (on a worker thread)."""
    released = 0
    while True:
        seen = state.arrivals
        await asyncio.sleep(IDLE_RELEASE_SECONDS)
        if state.arrivals == seen != released and state.serving is not None and state.serving.idle:
            released = seen
            await asyncio.to_thread(release_free_memory)


def cache_partition(key: int | None, salt: str | None):
    """The prefix cache partition of a request: its API key's (when the server has several) and its cache_salt;
    None (the shared partition) when it has neither."""
    return None if key is None and salt is None else (key, salt)


async def _read_body(request: Request, state: ServerState) -> bytes:
    """The request body, read as it arrives: 413 past state.max_request_bytes, 408 when it is not complete
    state.read_timeout seconds after the headers, 503 (closing the connection) when the shutdown grace ends first;
    ClientGone (one log line, counted) when the client disconnects meanwhile."""
    limit = state.max_request_bytes
    declared = request.headers.get("content-length", "")
    size = 0
    chunks: list[bytes] = []

    async def read() -> bool:  # -> whether the whole body was read (past the cap it is dropped up to DISCARD_BYTES)
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit + DISCARD_BYTES:
                return False
            if size <= limit:
                chunks.append(chunk)
        return True

    if declared.isdigit() and int(declared) > limit + DISCARD_BYTES:
        raise _too_large(limit, close=True)
    reading = asyncio.ensure_future(read())
    grace = asyncio.ensure_future(state.grace_over.wait())
    try:
        done, _ = await asyncio.wait({reading, grace}, timeout=state.read_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        grace.cancel()
        if not reading.done():
            reading.cancel()
    if reading not in done:
        close = {"Connection": "close"}
        if grace in done:
            raise APIError(503, "the server is shutting down", SERVER_ERROR, headers=close)
        raise APIError(408, f"the request body did not arrive within {state.read_timeout:g} s", headers=close)
    try:
        complete = reading.result()
    except ClientDisconnect:
        state.metrics.clients_gone.labels("upload").inc()
        log.info("client %s went away while sending its request (%d bytes received)", _client(request), size)
        raise ClientGone from None
    if size > limit:
        raise _too_large(limit, close=not complete)
    return b"".join(chunks)


def _too_large(limit: int, close: bool) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit / 2 ** 20:g} MB "
                         f"(--max-request-mb)", headers={"Connection": "close"} if close else None)


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "-"


@dataclass
class _Timing:
    """One request's clock, kept on the serving thread: arrival, first and latest token, and how it ended."""

    arrived: float
    first: float | None = None
    last: float | None = None
    client_gone: bool = False

    def token(self, metrics: ServerMetrics, prompt_tokens: int, now: float, between_tokens: bool) -> None:
        """Count a generated token at `now` (serving thread): the first one records time to first token and the
        prompt's tokens; later ones the time since the previous token when `between_tokens`."""
        if self.first is None:
            self.first = now
            metrics.time_to_first_token.observe(now - self.arrived)
            metrics.prompt_tokens.inc(prompt_tokens)
        elif between_tokens:
            metrics.time_per_output_token.observe(now - self.last)
        self.last = now
        metrics.generation_tokens.inc()

    def rate(self, n: int) -> float:
        """Generated tokens per second from the first token to the last ((n - 1) intervals; 0.0 below two)."""
        return (n - 1) / (self.last - self.first) if n > 1 and self.last > self.first else 0.0

    def timings(self, prompt_tokens: int, n: int) -> dict:
        """The server's clock for a response, in llama.cpp's `timings` shape: prompt_ms from arrival to the first
        token (queueing included), predicted_ms from the first token to the last, predicted_per_second (the log
        line's tok/s)."""
        ttft = (self.first - self.arrived) if self.first is not None else 0.0
        decode = (self.last - self.first) if self.first is not None else 0.0
        return {"prompt_n": prompt_tokens, "prompt_ms": 1e3 * ttft, "predicted_n": n, "predicted_ms": 1e3 * decode,
                "predicted_per_second": self.rate(n)}


async def _answer(request: Request, state: ServerState, job: Job, answer: Answer):
    """Submit the job and answer: a stream of SSE chunks or one JSON body. Errors before the first token are HTTP
    errors; a client that goes away cancels the sequence."""
    if job.n > 1 or len(job.prompts) > 1:
        return await _answer_choices(request, state, job, answer)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    timing = _Timing(time.perf_counter())
    metrics = state.metrics

    def on_event(item) -> None:  # on the serving thread
        now = time.perf_counter()
        if isinstance(item, TokenEvent):
            timing.token(metrics, len(job.prompt_ids), now, between_tokens=True)
        elif isinstance(item, GenerationResult):
            metrics.requests.labels(finish_reason(item)).inc()
            metrics.request_latency.observe(now - timing.arrived)
            metrics.count_prompt(item)
            _log_request(answer, item, timing, now)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (the server is gone)
            pass

    try:
        ticket = state.serving.submit(job.prompt_ids, job.options, on_event, cache_salt=job.cache_salt)
    except QueueFullError as e:
        raise APIError(503, str(e), SERVER_ERROR, headers={"Retry-After": RETRY_AFTER_BUSY}) from None
    except ServingStoppedError as e:
        raise APIError(503, str(e), SERVER_ERROR) from None

    def client_gone() -> None:
        if ticket.done:
            return
        timing.client_gone = True
        metrics.clients_gone.labels("streaming" if handed_over else "waiting").inc()
        state.serving.cancel(ticket)

    watcher = asyncio.create_task(_watch_disconnect(request, client_gone))
    handed_over = False
    try:
        first = await queue.get()
        _raise_if_error(first)
        if job.stream:
            handed_over = True
            return StreamingResponse(_stream(state, ticket, queue, first, answer, watcher, timing),
                                     media_type=answer.media_type,
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        events, item = [], first
        while isinstance(item, TokenEvent):
            events.append(item)
            item = await queue.get()
        _raise_if_error(item)
        if item.stop_reason == STOP_CANCELLED:
            if timing.client_gone:
                raise ClientGone  # nobody to answer; counted and logged as a client gone, not as an error
            raise APIError(503, "the request was cancelled: the server is shutting down", SERVER_ERROR)
        body = answer.complete(events, item)
        if answer.server_timings:
            body["timings"] = timing.timings(len(item.prompt_token_ids), len(item.token_ids))
        return JSONResponse(body)
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
                  watcher: asyncio.Task, timing: _Timing):
    """The stream's body, framed by the answer (OpenAI: server-sent events): the opening chunk, content deltas (all
    events queued at a time in one chunk), the finish chunk, the usage chunk when asked (with the server's
    `timings`, as llama.cpp's server sends them), then the end marker."""
    ended = False
    try:
        opening = answer.first_chunk()
        if opening is not None:
            yield answer.frame(opening)
        pending = [first]
        while True:
            while not queue.empty():
                pending.append(queue.get_nowait())
            events = [item for item in pending if isinstance(item, TokenEvent)]
            end = next((item for item in pending if not isinstance(item, TokenEvent)), None)
            chunk = answer.delta_chunk(events)
            if chunk is not None:
                yield answer.frame(chunk)
            if end is not None:
                ended = True
                if isinstance(end, GenerationResult):
                    yield answer.frame(answer.final_chunk(end))
                    if answer.include_usage:
                        yield answer.frame(dict(answer.usage_chunk(end), timings=timing.timings(
                            len(end.prompt_token_ids), len(end.token_ids))))
                else:
                    yield answer.frame(answer.error_payload(APIError(500, str(end), SERVER_ERROR)))
                closing = answer.end_of_stream()
                if closing:
                    yield closing
                return
            pending = [await queue.get()]
    finally:
        watcher.cancel()
        if not ended:
            state.serving.cancel(ticket)


def _log_request(answer: Answer, result: GenerationResult, timing: _Timing, now: float,
                 completion: int | None = None) -> None:
    """One line per request: id, prompt tokens (and how many came from the prefix cache), completion tokens (all
    choices'), time to first token, tokens/s, finish reason."""
    n = len(result.token_ids) if completion is None else completion
    ttft = (timing.first - timing.arrived) if timing.first is not None else None
    rate = timing.rate(n)
    reason = "client gone" if timing.client_gone and result.stop_reason == STOP_CANCELLED else finish_reason(result)
    log.info("%s: prompt %d tokens (%d cached), completion %d tokens, first token %s, %.1f tok/s, %.2f s, finish %s",
             answer.id, len(result.prompt_token_ids), result.cached_tokens, n, "-" if ttft is None else f"{ttft:.3f} s", rate,
             now - timing.arrived, reason)


def _echo(job: Job, prompt: int) -> Echo | None:
    """What the choices of the job's prompt number `prompt` put before their text (None: nothing)."""
    if job.echo_texts is None and job.prompt_logprobs is None:
        return None
    return Echo(None if job.echo_texts is None else job.echo_texts[prompt], job.prompts[prompt], job.echo_logprobs,
                job.prompt_logprobs)


async def _answer_choices(request: Request, state: ServerState, job: Job, answer: Answer):
    """n > 1 or several prompts: for each prompt, n continuations of one prefill (ServingLoop.submit_groups, all
    admitted together), choice i seeded with seed + i; one response (or one stream) whose choices carry their index
    (prompt p's choice i is p * n + i), usage counting each prompt once."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    timing = _Timing(time.perf_counter())
    metrics = state.metrics
    total = len(job.prompts) * job.n
    answers = [answer if i == 0 else answer.choice(i, _echo(job, i // job.n)) for i in range(total)]
    for i, a in enumerate(answers):
        a.prompt_tokens = len(job.prompts[i // job.n])  # continuous usage: each choice's own prompt
    results: dict[int, GenerationResult] = {}  # filled on the serving thread
    prompt_tokens = sum(len(ids) for ids in job.prompts)

    def callback(index: int):
        def on_event(item) -> None:  # on the serving thread
            now = time.perf_counter()
            if isinstance(item, TokenEvent):  # the choices share one clock: no time between tokens
                timing.token(metrics, prompt_tokens, now, between_tokens=False)
            elif isinstance(item, GenerationResult):
                metrics.requests.labels(finish_reason(item)).inc()
                metrics.count_prompt(item)
                results[index] = item
                if len(results) == total:
                    metrics.request_latency.observe(now - timing.arrived)
                    completion = sum(len(r.token_ids) for r in results.values())
                    _log_request(answer, _lead(results), timing, now, completion)
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, item))
            except RuntimeError:  # the event loop has closed (the server is gone)
                pass
        return on_event

    n = job.n
    try:
        groups = state.serving.submit_groups([
            (ids, [choice_options(job.options_for(p), i) for i in range(n)], [callback(p * n + i) for i in range(n)])
            for p, ids in enumerate(job.prompts)], cache_salt=job.cache_salt)
        tickets = [t for group in groups for t in group]
    except NeverFitsError as e:
        if n > state.max_active:
            raise bad_request(f"n: {e} (--max-active {state.max_active}): ask for at most {state.max_active} "
                              "choices", "n") from None
        raise bad_request(f"prompt: {len(job.prompts)} prompts x {n} choices are more requests than this server "
                          f"takes at once ({state.serving.max_active + state.serving.max_queue}): send fewer",
                          "prompt") from None
    except QueueFullError as e:
        raise APIError(503, str(e), SERVER_ERROR, headers={"Retry-After": RETRY_AFTER_BUSY}) from None
    except ServingStoppedError as e:
        raise APIError(503, str(e), SERVER_ERROR) from None

    def cancel_all() -> None:
        for ticket in tickets:
            if not ticket.done:
                state.serving.cancel(ticket)

    def client_gone() -> None:
        if all(ticket.done for ticket in tickets):
            return
        timing.client_gone = True
        metrics.clients_gone.labels("streaming" if handed_over else "waiting").inc()
        cancel_all()

    watcher = asyncio.create_task(_watch_disconnect(request, client_gone))
    handed_over = False
    try:
        first = await queue.get()
        _raise_if_error(first[1])
        if job.stream:
            handed_over = True
            return StreamingResponse(_stream_choices(answers, queue, first, cancel_all, watcher, n),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        events: list[list[TokenEvent]] = [[] for _ in answers]
        ended: dict[int, GenerationResult] = {}
        item = first
        while True:
            index, value = item
            _raise_if_error(value)
            if isinstance(value, TokenEvent):
                events[index].append(value)
            else:
                ended[index] = value
                if len(ended) == total:
                    break
            item = await queue.get()
        if any(r.stop_reason == STOP_CANCELLED for r in ended.values()):
            if timing.client_gone:
                raise ClientGone  # nobody to answer; counted and logged as a client gone, not as an error
            raise APIError(503, "the request was cancelled: the server is shutting down", SERVER_ERROR)
        bodies = [a.complete(events[i], ended[i]) for i, a in enumerate(answers)]  # once each: they keep offsets
        body = bodies[0]
        body["choices"] = [b["choices"][0] for b in bodies]
        body["usage"] = _total_usage(ended, n)
        return JSONResponse(body)
    finally:
        if not handed_over:
            watcher.cancel()
            cancel_all()


def _lead(results: dict[int, GenerationResult]) -> GenerationResult:
    """The result of the choice that prefilled the prompt (its cached_tokens are the request's)."""
    return max(results.values(), key=lambda r: r.prefill_tokens)


def _total_usage(ended: dict[int, GenerationResult], n: int) -> dict:
    """The usage of choices 0..len(ended)-1, n per prompt: each prompt's tokens (and cached ones) counted once,
    every choice's generated tokens."""
    leads = [_lead({i: ended[i] for i in range(p, p + n)}) for p in range(0, len(ended), n)]
    out = usage_of(sum(len(r.prompt_token_ids) for r in leads), sum(len(r.token_ids) for r in ended.values()),
                   sum(r.cached_tokens for r in leads))
    out.update(speculation_usage(list(ended.values())))
    return out


async def _stream_choices(answers: list[Answer], queue: asyncio.Queue, first, cancel_all: Callable[[], None],
                          watcher: asyncio.Task, n: int):
    """The SSE body of several choices (n per prompt): each choice's role chunk (chat), its content deltas and
    finish chunk (each chunk names its choice's index), then one usage chunk when asked, then [DONE]."""
    ended: dict[int, GenerationResult] = {}
    try:
        for a in answers:
            opening = a.first_chunk()
            if opening is not None:
                yield sse(opening)
        pending = [first]
        while True:
            while not queue.empty():
                pending.append(queue.get_nowait())
            for i, a in enumerate(answers):
                events = [item for index, item in pending if index == i and isinstance(item, TokenEvent)]
                chunk = a.delta_chunk(events) if events else None
                if chunk is not None:
                    yield sse(chunk)
            for index, item in pending:
                if isinstance(item, TokenEvent):
                    continue
                if not isinstance(item, GenerationResult):
                    yield sse(APIError(500, str(item), SERVER_ERROR).body())
                    yield sse("[DONE]")
                    return
                ended[index] = item
                yield sse(answers[index].final_chunk(item))
            if len(ended) == len(answers):
                if answers[0].include_usage:
                    yield sse(dict(answers[0].usage_chunk(_lead(ended)), usage=_total_usage(ended, n)))
                yield sse("[DONE]")
                return
            pending = [await queue.get()]
    finally:
        watcher.cancel()
        cancel_all()  # a no-op for the choices that ended; ends the rest when the client went away or one failed
