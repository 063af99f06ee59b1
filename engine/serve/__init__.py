"""The OpenAI-compatible HTTP server (`tinyllama serve`): a FastAPI app factory, request models, OpenAI-shaped errors,
SSE streaming, Prometheus metrics, the inspection endpoints (over engine.inspect) and the web page at / (static/),
over the serving loop of engine.generation.serving. Sits above the model, generation and inspect; the engine below
never imports it, and it never imports engine.cli (the command line runs it)."""
from engine.serve.app import create_app

__all__ = ["create_app"]
