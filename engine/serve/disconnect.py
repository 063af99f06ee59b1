"""Noticing that a client went away while its request waits or streams: `watch_disconnect`."""
from __future__ import annotations

import asyncio
from typing import Callable

from starlette.requests import Request


async def watch_disconnect(request: Request, on_gone: Callable[[], None]) -> None:
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
