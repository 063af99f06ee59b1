"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request's head.

uvicorn times out an idle keep-alive connection only until its next byte arrives, and a new connection never: a
client could hold a connection (and a file descriptor) forever by sending nothing, or half a request line. Here a
connection that has not sent a complete request line and headers `head_timeout` seconds after it opened, or after
its last response was sent, is closed. The body's own deadline is the app's (engine.serve.app: 408).
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    """H11Protocol closing a connection whose request head is not complete within `head_timeout` seconds."""

    head_timeout: float = 30.0

    @classmethod
    def with_head_timeout(cls, seconds: float) -> type["TimedH11Protocol"]:
        """This protocol class with its head deadline set (uvicorn.Config(http=...) takes the class)."""
        return type(cls.__name__, (cls,), {"head_timeout": float(seconds)})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._timed_cycle = None
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and self.cycle is not self._timed_cycle:
            self._disarm()  # a request's head arrived: its body and response have their own deadlines

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # before the base class handles a pipelined request, which disarms it again
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._timed_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.cycle is not self._timed_cycle:
            return
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()
