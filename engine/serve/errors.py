"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, and the handlers that make every
failure one (bad JSON, FastAPI's validation errors as 400, unknown routes, and, for bugs, a 500 without a traceback
in the response, logged once, that leaves the keep-alive connection usable)."""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tinyllama.serve")
UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*|function-.*)$")

INVALID_REQUEST = "invalid_request_error"  # OpenAI's type for every 4xx (bad fields, wrong key, unknown model or URL)
SERVER_ERROR = "server_error"  # 5xx: busy, loading, shutting down, or a bug


class APIError(Exception):
    """An error response: HTTP status, OpenAI error type, the request field at fault (param) and a code."""

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """This error as a JSONResponse with its status and headers."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before its answer: nothing to send, and not an error of the server (already counted
    and logged where it was noticed)."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error naming `param`."""
    return APIError(400, message, INVALID_REQUEST, param, code)


def field_path(loc) -> str | None:
    """A pydantic error location ('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and not UNION_BRANCH.match(part):  # not a union member's tag ('str', ...)
            path += ("." if path else "") + part
    return path or None


def validation_error(errors: list[dict]) -> APIError:
    """pydantic's error list -> one 400 naming the first field at fault, with its value."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = field_path(first.get("loc", ()))
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = "a required field is missing"
    elif "input" in first and first.get("type") not in ("json_invalid", "model_attributes_type", "dict_type"):
        message += f" (got {first['input']!r:.80})"
    return bad_request(f"{param}: {message}" if param else message, param)


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Route every error through the OpenAI shape: APIError, validation (400), HTTP errors, anything else (500).
    on_error(status) is called for each error response (to count them); each refused request (every error but a 500,
    which is logged with its traceback) gets one log line: status, method, route and the message, never the body."""

    def respond(request: Request, error: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(error.status)
        if error.status != 500:
            log.info("refused %d %s %s: %s", error.status, request.method, request.url.path, error.message)
        return error.response()

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return respond(request, error)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    app.add_middleware(AnswerBugs, on_error=on_error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return respond(request, validation_error(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        kind = SERVER_ERROR if error.status_code >= 500 else INVALID_REQUEST
        return respond(request, APIError(error.status_code, message, kind, headers=getattr(error, "headers", None)))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return respond(request, APIError(500, "internal server error (see the server's log)", SERVER_ERROR))


class AnswerBugs:
    """ASGI middleware: an exception no handler took becomes a 500 in OpenAI's shape, logged once, and goes no
    further. (Starlette's outermost middleware answers it too but then re-raises, and uvicorn, seeing an exception
    after the response, closes the connection without `Connection: close`: the client's next request on it is lost.)
    An exception after the response started still propagates: that connection cannot be saved."""

    def __init__(self, app, on_error=None):
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            if started:
                raise
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if self.on_error is not None:
                self.on_error(500)
            await APIError(500, "internal server error (see the server's log)", SERVER_ERROR).response()(
                scope, receive, send)
