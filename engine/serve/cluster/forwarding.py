"""An HTTP request carried from the ingress to a replica, and run there through the replica's own ASGI app.

The ingress reads a request (method, path, headers, body) into a ForwardedRequest, which Ray Serve carries to a
replica as a plain argument (the request router reads its routing keys on the way). On the replica, AppHost runs
the FastAPI app of `tinyllama serve` in-process, unchanged: `start` runs the app's lifespan (which loads the model)
and waits until the model is loaded; `call` feeds the request to the app as ASGI messages and yields the response's
messages (start, then body chunks) as the app sends them, so a stream stays a stream. A caller that stops reading
(its client went away, Ray cancelled the call) is an `http.disconnect` to the app, which cancels the sequence, as
with a client of the single server. `stop` drains: /health and new requests answer 503, the requests in flight get
the grace period, then the app's lifespan shuts the serving loop down.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from engine.errors import EngineError

log = logging.getLogger("tinyllama.cluster")

ASGI_SCOPE_VERSION = {"version": "3.0", "spec_version": "2.3"}  # 2.3: responses watch receive() for a disconnect
APP_EXIT_TIMEOUT = 10.0  # seconds the app gets to finish a request after its caller went away


@dataclass
class ForwardedRequest:
    """One HTTP request as the ingress received it, plus what the request router needs.

    `prefix_keys`: the chained digests of its prompt's blocks (engine.serve.cluster.routing; empty: route by load).
    """

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None
    scheme: str = "http"
    http_version: str = "1.1"
    prefix_keys: tuple[int, ...] = ()

    @classmethod
    def from_scope(cls, scope: dict, body: bytes, prefix_keys: tuple[int, ...] = ()):
        """The request of an ASGI http `scope` with its whole `body`."""
        client = scope.get("client")
        return cls(scope["method"], scope["path"], scope.get("query_string", b""),
                   [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])], body,
                   tuple(client) if client else None, scope.get("scheme", "http"), scope.get("http_version", "1.1"),
                   tuple(prefix_keys))

    def scope(self) -> dict:
        """An ASGI http scope for this request."""
        return {"type": "http", "asgi": dict(ASGI_SCOPE_VERSION), "http_version": self.http_version,
                "method": self.method, "scheme": self.scheme, "path": self.path,
                "raw_path": self.path.encode("utf-8", "surrogateescape"), "root_path": "",
                "query_string": self.query_string, "headers": list(self.headers), "client": self.client,
                "server": ("replica", 0), "state": {}}


class AppHost:
    """Runs one ASGI app (with lifespan) inside a process that is not an HTTP server: a Ray Serve replica."""

    def __init__(self, app):
        self.app = app
        self._lifespan_task: asyncio.Task | None = None
        self._lifespan_in: asyncio.Queue | None = None
        self._lifespan_out: asyncio.Queue | None = None

    @property
    def state(self):
        """The app's ServerState (engine.serve.app)."""
        return self.app.state.server

    async def start(self, poll: float = 0.05) -> None:
        """Run the app's lifespan startup, then wait until its model is loaded -> None; EngineError with the reason
        when it cannot load."""
        self._lifespan_in, self._lifespan_out = asyncio.Queue(), asyncio.Queue()
        scope = {"type": "lifespan", "asgi": dict(ASGI_SCOPE_VERSION), "state": {}}
        self._lifespan_task = asyncio.create_task(self.app(scope, self._lifespan_in.get, self._lifespan_out.put))
        await self._lifespan_in.put({"type": "lifespan.startup"})
        answer = await self._lifespan_out.get()
        if answer["type"] != "lifespan.startup.complete":
            raise EngineError(f"the app did not start: {answer.get('message', answer['type'])}")
        while not self.state.ready and self.state.load_error is None:
            await asyncio.sleep(poll)
        if self.state.load_error is not None:
            raise EngineError(self.state.load_error)

    def problem(self) -> str | None:
        """Why this app cannot serve (its model failed to load, its serving thread died), or None when it can."""
        state = self.state
        if state.load_error is not None:
            return state.load_error
        serving = state.serving
        if serving is not None and not serving.alive and not state.draining:
            return "the serving loop's thread has stopped"
        return None

    async def stop(self, grace: float) -> None:
        """Drain (503 to /health and new requests; requests in flight get `grace` seconds, then are cancelled), then
        run the lifespan shutdown (the serving loop stops)."""
        state = self.state
        if not state.draining:
            state.begin_shutdown(grace)
            deadline = time.monotonic() + grace
            while state.serving is not None and state.serving.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        if self._lifespan_task is not None and not self._lifespan_task.done():
            await self._lifespan_in.put({"type": "lifespan.shutdown"})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._lifespan_out.get(), APP_EXIT_TIMEOUT)

    async def call(self, request: ForwardedRequest, headers: list[tuple[bytes, bytes]] = ()) -> AsyncIterator[dict]:
        """Run `request` through the app -> its response messages ({'type': 'http.response.start', 'status',
        'headers'}, then {'type': 'http.response.body', 'body', 'more_body'}...), `headers` added to the start.
        Closing this iterator early tells the app its client went away."""
        sent: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_taken = False

        async def receive() -> dict:
            nonlocal body_taken
            if not body_taken:
                body_taken = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if gone.is_set():
                raise OSError("the client went away")  # what a server's send does once its peer has gone
            await sent.put(message)

        async def run() -> None:
            try:
                await self.app(request.scope(), receive, send)
            finally:
                await sent.put(None)  # the app returned (or raised): no more messages

        task = asyncio.create_task(run())
        try:
            while True:
                message = await sent.get()
                if message is None:
                    break
                if message["type"] == "http.response.start" and headers:
                    message = dict(message, headers=list(message.get("headers", [])) + list(headers))
                yield message
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    break
        finally:
            gone.set()  # a no-op for an app that has answered; a disconnect for one still at work
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), APP_EXIT_TIMEOUT)
                except asyncio.TimeoutError:
                    task.cancel()
                except Exception:  # noqa: BLE001 - the app's own error, already answered or logged by it
                    pass
                except asyncio.CancelledError:  # we are being cancelled while waiting: let the app finish alone
                    task.cancel()
                    raise
