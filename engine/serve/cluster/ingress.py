"""The cluster's ingress: an ASGI app that reads each request, keys it for the router and streams a replica's answer.

Everything but /metrics is the replicas' app's to answer: the ingress reads the body, computes the prompt's routing
keys (engine.serve.cluster.routing) on a worker thread, hands a ForwardedRequest to `forward` (Ray Serve: a
streaming handle call that the request router places on a replica) and relays the response's ASGI messages as
they come. So status codes, headers, errors and server-sent events are the single server's, byte for byte.

What only a cluster can see becomes an error in OpenAI's shape here:
- the replica died or became unreachable before answering: 503 (code replica_failed, Retry-After);
  after a stream had begun: a final SSE error event with the same body, then [DONE] (the connection never hangs);
- Ray Serve's own queue of requests waiting for a replica is full: 503 (code cluster_busy, Retry-After);
- /health with no replica running: 503 (a load balancer in front sees the cluster is down).
A client that disconnects closes the forward stream, which cancels the call on the replica (its sequence is freed).
`drain` is the single server's shutdown: /health and new requests answer 503 while those in flight finish.
/metrics is the cluster view: every replica's metrics labelled by replica, plus the router's and the ingress's.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from engine.serve.cluster.forwarding import ForwardedRequest
from engine.serve.errors import SERVER_ERROR, APIError
from engine.serve.responses import sse

log = logging.getLogger("tinyllama.cluster")

RETRY_AFTER = "1"
REPLICA_FAILED = "replica_failed"
CLUSTER_BUSY = "cluster_busy"
JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass
class Failure:
    """How a forwarding error reads to the client: HTTP status, message and OpenAI error code."""

    status: int
    message: str
    code: str


class IngressApp:
    """The ingress ASGI app. `forward(request)`: an async iterator of the replica's response messages (closing it
    cancels the call); `keys_of(path, body, headers)`: the routing keys of a request (run on a worker thread);
    `classify(error)`: a Failure for an error that means the cluster could not serve the request, else None (a bug:
    500); `replicas_running()`: how many replicas the router can reach now (None: not known yet);
    `cluster_metrics()`: the /metrics exposition (bytes); `forwarded`, `failed`: counters to bump (prometheus)."""

    def __init__(self, forward: Callable[..., AsyncIterator[dict]], keys_of: Callable[[str, bytes, list], tuple],
                 classify: Callable[[BaseException], Failure | None], replicas_running: Callable[[], int | None],
                 cluster_metrics: Callable[[], Awaitable[tuple[bytes, str]]], max_body_bytes: int,
                 on_failure: Callable[[str], None] = lambda code: None):
        self.forward, self.keys_of, self.classify = forward, keys_of, classify
        self.replicas_running, self.cluster_metrics = replicas_running, cluster_metrics
        self.max_body_bytes = max_body_bytes
        self.on_failure = on_failure
        self.draining = False
        self.in_flight = 0  # requests being answered (not /metrics)

    async def drain(self, grace: float) -> int:
        """Stop taking requests (/health and new ones answer 503) and wait up to `grace` seconds for those in flight
        -> how many are still in flight."""
        self.draining = True
        deadline = asyncio.get_running_loop().time() + grace
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics" and scope["method"] == "GET":
            body, content_type = await self.cluster_metrics()
            await _respond(send, 200, body, [(b"content-type", content_type.encode())])
            return
        if self.draining:
            await self._shutting_down(scope, send)
            return
        if scope["path"] == "/health" and self.replicas_running() == 0:
            await _respond(send, 503, b'{"status":"no replica is running"}',
                           JSON_HEADERS + [(b"retry-after", RETRY_AFTER.encode())], head=scope["method"] == "HEAD")
            return
        self.in_flight += 1
        try:
            await self._serve(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _shutting_down(self, scope, send) -> None:
        """The single server's answers while it drains: /health 503 'shutting down', any request 503."""
        if scope["path"] == "/health":
            body = b'{"status":"shutting down"}'
        else:
            body = _json(APIError(503, "the server is shutting down", SERVER_ERROR).body())
        await _respond(send, 503, body, JSON_HEADERS + [(b"retry-after", b"5")], head=scope["method"] == "HEAD")

    async def _serve(self, scope, receive, send) -> None:
        """Read, key and forward one request; relay the answer."""
        body = await self._read_body(receive)
        if body is None:
            return  # the client went away while sending
        if len(body) > self.max_body_bytes:
            error = APIError(413, f"the request body is larger than this server's limit of "
                                  f"{self.max_body_bytes / 2 ** 20:g} MB (--max-request-mb)")
            await _respond(send, 413, _json(error.body()), JSON_HEADERS + [(b"connection", b"close")])
            return
        keys = (await asyncio.to_thread(self.keys_of, scope["path"], body, scope.get("headers", []))
                if scope["method"] == "POST" else ())
        request = ForwardedRequest.from_scope(scope, body, keys)
        relay = asyncio.ensure_future(self._relay(request, send))
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({relay, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not relay.done():
                relay.cancel()  # the client went away (or we are cancelled): the forward stream closes
            watcher.cancel()
            await asyncio.gather(relay, watcher, return_exceptions=True)

    async def _read_body(self, receive) -> bytes | None:
        """The whole body (reading stops just past the cap), or None when the client disconnects."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_body_bytes + 1:
                chunks.append(chunk)
            if not message.get("more_body", False) or size > self.max_body_bytes:
                return b"".join(chunks)

    async def _relay(self, request, send) -> None:
        """Forward `request` and relay its response; a failure before the response starts is an error response, one
        after it (a stream) a final SSE error event."""
        stream = self.forward(request)
        started = streaming = False
        try:
            async for message in stream:
                if message["type"] == "http.response.start":
                    started = True
                    streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                    for k, v in message.get("headers", []))
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - every failure becomes an answer; bugs are logged
            failure = self.classify(error)
            if failure is None:
                log.exception("forwarding %s %s failed", request.method, request.path)
                failure = Failure(500, "the cluster failed to forward the request", "internal_error")
            self.on_failure(failure.code)
            log.warning("%s %s: %s (%s)", request.method, request.path, failure.message, _first_line(error))
            api_error = APIError(failure.status, failure.message, SERVER_ERROR, code=failure.code,
                                 headers={"Retry-After": RETRY_AFTER})
            if not started:
                await _respond(send, failure.status, _json(api_error.body()),
                               JSON_HEADERS + [(b"retry-after", RETRY_AFTER.encode())])
            elif streaming:
                tail = sse(api_error.body()) + sse("[DONE]")
                await send({"type": "http.response.body", "body": tail.encode(), "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await stream.aclose()  # cancels the call on the replica when it has not ended


async def _disconnected(receive) -> None:
    """Return when the client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _respond(send, status: int, body: bytes, headers: list, head: bool = False) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": b"" if head else body, "more_body": False})


def _json(payload) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
