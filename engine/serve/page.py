"""The web page: `GET /` and its static files (engine/serve/static: plain HTML, CSS and JavaScript modules, no build
step, nothing from elsewhere), served with a Content-Security-Policy that allows only this origin's own scripts,
styles and API (no inline script, no eval, no inline style attributes, no framing).

The page speaks only the public HTTP API (/v1/models, /v1/chat/completions, /v1/inspect/*), like any other client.
"""
from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

from engine.serve.errors import APIError

STATIC = files("engine.serve") / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def static_files() -> dict[str, object]:
    """The page's files by URL name ('app.js', ...): only these are served (no paths, so nothing else is reachable)."""
    return {entry.name: entry for entry in STATIC.iterdir()
            if entry.is_file() and "." + entry.name.rpartition(".")[2] in MEDIA_TYPES}


def add_page_routes(app: FastAPI) -> None:
    """Mount GET and HEAD / (the page) and /static/{name} (its scripts, styles and icon)."""
    served = static_files()

    def file_response(name: str) -> Response:
        entry = served.get(name)
        if entry is None:
            raise APIError(404, f"no such file: /static/{name}")
        media_type = MEDIA_TYPES["." + name.rpartition(".")[2]]
        return Response(entry.read_bytes(), media_type=media_type, headers=PAGE_HEADERS)

    async def page():
        return file_response("index.html")

    async def static(name: str):
        return file_response(name)

    for path, route in (("/", page), ("/static/{name}", static)):
        app.add_api_route(path, route, methods=["GET"])
        app.add_api_route(path, route, methods=["HEAD"], include_in_schema=False)  # uvicorn sends no body
