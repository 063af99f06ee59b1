"""Ollama's API beside OpenAI's, on the same server and scheduler: POST /api/chat, /api/generate, /api/show,
/api/embed (and the older /api/embeddings); GET /api/tags, /api/ps, /api/version.

A chat or generate request is translated into the OpenAI request it means (engine.serve.ollama_protocol) and runs
the same way (validation, chat template, tools, constraints, the serving loop); the answer is written in Ollama's
shape: newline-delimited JSON objects when streaming (the default), one object with `stream: false`, each with
`model`, `created_at` and `done`; the last one with `done_reason` and Ollama's counts and durations (nanoseconds).
Tool calls come as `message.tool_calls` ({"function": {"name", "arguments": object}}) in one object once the reply
is complete. /api/embed gives one unit-length vector per input, pooled as the server's --pooling says (the older
/api/embeddings: one vector, not normalized, as Ollama's). Errors are Ollama's {"error": "..."} with the HTTP status.
"""
from __future__ import annotations

import asyncio
import asyncio
import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, field_validator

from engine.generation.state import GenerationResult, TokenEvent
from engine.serve.embeddings import compute_embeddings
from engine.serve.errors import APIError, bad_request
from engine.serve.ollama_protocol import (OllamaChatRequest, OllamaGenerateRequest, bare_name, chat_request,
                                          generate_request)
from engine.serve.params import chat_job, completion_job
from engine.serve.responses import Answer, finish_reason, json_line
from engine.serve.structured import attach_constraint
from engine.text.tool_calls import ReplyStream, parse_reply

OLLAMA_API_VERSION = "0.9.0"  # the version of Ollama's API whose shapes these routes follow
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
FAR_FUTURE = "2318-11-19T00:00:00Z"  # /api/ps' expires_at: the model stays loaded while the server runs
NS = 1_000_000_000


def now_iso() -> str:
    """The current time as Ollama writes created_at: RFC 3339 in UTC."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class OllamaShowRequest(BaseModel):
    """POST /api/show (the older `name` field also works)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None
    verbose: bool | None = None

    @field_validator("model", "name")
    @classmethod
    def _bare(cls, value):
        return bare_name(value)


class OllamaEmbedRequest(BaseModel):
    """POST /api/embed (`input`: a text or a list of texts) and the older /api/embeddings (`prompt`: one text)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: Union[str, list[str], None] = None
    prompt: str | None = None
    truncate: bool | None = True
    dimensions: int | None = None
    options: dict | None = None
    keep_alive: object = None

    @field_validator("model")
    @classmethod
    def _bare(cls, value):
        return bare_name(value)


def embed_inputs(model, texts: list[str], truncate: bool, dimensions: int | None) -> list[list[int]]:
    """Texts -> token ids (BOS added, as /v1/embeddings and /v1/completions tokenize), cut to the window when
    `truncate` (Ollama's default), else a 400 for one too long; 400 for an empty text or other `dimensions`."""
    hidden, window = model.config.hidden_size, model.config.max_position_embeddings
    if dimensions is not None and dimensions != hidden:
        raise bad_request(f"dimensions: this model's embeddings have {hidden} dimensions, got {dimensions}",
                          "dimensions")
    out = []
    for i, text in enumerate(texts):
        param = "input" if len(texts) == 1 else f"input[{i}]"
        if not text:
            raise bad_request(f"{param}: an input cannot be empty", param)
        ids = model.tokenizer.encode(text, threaded=True)
        if len(ids) > window:
            if not truncate:
                raise bad_request(f"{param}: {len(ids)} tokens, more than this model's context window of {window} "
                                  "(truncate: true cuts it)", param, "context_length_exceeded")
            ids = ids[:window]
        out.append(ids)
    return out


class OllamaAnswer(Answer):
    """One /api/chat or /api/generate response in Ollama's shape (`kind` "chat" or "generate"); with tool calling,
    the calls are held back and sent whole in one object when the reply ends."""

    media_type = "application/x-ndjson"
    server_timings = False  # Ollama's own counts and durations instead

    def __init__(self, kind: str, model_name: str, strings, logprobs: int | None, prompt_tokens: int,
                 tool_calling=None):
        super().__init__("chat", model_name, strings, logprobs, prompt_tokens=prompt_tokens)
        self.ollama_kind = kind
        self.started = time.perf_counter()
        self.reader = ReplyStream() if tool_calling is not None else None

    def frame(self, payload) -> str:
        """Newline-delimited JSON: one object per line (a list: one line each)."""
        items = payload if isinstance(payload, list) else [payload]
        return "".join(json_line(item) + "\n" for item in items)

    def end_of_stream(self) -> str | None:
        """Nothing: the object with done=true is the last."""
        return None

    def error_payload(self, error) -> dict:
        """Ollama's in-stream error: {"error": "..."}."""
        return {"error": error.message}

    def _object(self, text: str, done: bool, events: list[TokenEvent] = (), calls: list | None = None) -> dict:
        out = {"model": self.model, "created_at": now_iso()}
        if self.ollama_kind == "chat":
            out["message"] = {"role": "assistant", "content": text}
            if calls:
                out["message"]["tool_calls"] = calls
        else:
            out["response"] = text
        if self.logprobs is not None and events:
            out["logprobs"] = [self._logprob(e) for e in events]
        out["done"] = done
        return out

    def _logprob(self, event: TokenEvent) -> dict:
        token, raw = self.strings(event.token_id)
        return {"token": token, "logprob": event.logprob.logprob, "bytes": raw,
                "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]}
                                 for t in self._top(event.logprob)]}

    def _calls(self, text: str) -> list[dict]:
        """The complete tool calls of a reply, Ollama's shape (a call cut off by the length limit is left out)."""
        return [{"function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                for c in parse_reply(text).calls if c.complete]

    def first_chunk(self) -> dict | None:
        """Nothing opens an Ollama stream."""
        return None

    def delta_chunk(self, events: list[TokenEvent]) -> dict | None:
        """An object with these tokens' text (tool-call text is held back); None when it carries nothing."""
        self.completion_tokens += len(events)
        text = "".join(e.text for e in events)
        if self.reader is not None:
            text = "".join(d[1] for d in self.reader.feed(text) if d[0] == "content")
        if not text and not (self.logprobs is not None and events):
            return None
        return self._object(text, False, events)

    def _final(self, result: GenerationResult, text: str) -> dict:
        out = self._object(text, True)
        reason = finish_reason(result)
        out.update(done_reason="stop" if reason in ("stop", "tool_calls") else reason,
                   total_duration=int((time.perf_counter() - self.started) * NS), load_duration=0,
                   prompt_eval_count=len(result.prompt_token_ids),
                   prompt_eval_duration=int(result.prefill_seconds * NS), eval_count=len(result.token_ids),
                   eval_duration=int(result.decode_seconds * NS))
        return out

    def final_chunk(self, result: GenerationResult):
        """The last object(s): held-back text, then the tool calls (when the reply was calls), then done=true with
        done_reason, counts and durations."""
        out = []
        if self.reader is not None:
            held = "".join(d[1] for d in self.reader.finish() if d[0] == "content")
            calls = self._calls(result.text) if self.reader.mode == "calls" else []
            if held or calls:
                out.append(self._object(held, False, calls=calls))
        out.append(self._final(result, ""))
        return out

    def complete(self, events: list[TokenEvent], result: GenerationResult) -> dict:
        """The whole response (stream: false)."""
        text, calls = result.text, []
        if self.reader is not None and parse_reply(result.text).calls:
            text, calls = "", self._calls(result.text)
        out = self._final(result, text)
        if calls:
            out["message"]["tool_calls"] = calls
        if self.logprobs is not None:
            out["logprobs"] = [self._logprob(e) for e in events]
        return out


def ollama_error(error: APIError, state) -> JSONResponse:
    """An APIError as Ollama answers errors: {"error": "..."} with the status (and its headers); counted."""
    state.metrics.errors.labels(str(error.status)).inc()
    return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)


def model_details(model) -> dict:
    """Ollama's `details` of the served model: format, family, parameter size, how the weights are held."""
    count = model.config.weight_count()
    size = next((f"{count / scale:.1f}{unit}" for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K"))
                 if count >= scale), str(count))
    folder = Path(model.folder) if model.folder is not None else None
    files = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES] if folder and folder.is_dir() else []
    fmt = "gguf" if any(p.suffix == ".gguf" for p in files) else "safetensors"
    return {"parent_model": "", "format": fmt, "family": "llama", "families": ["llama"], "parameter_size": size,
            "quantization_level": model.weights_dtype.upper()}


def model_listing(state, name: str | None = None) -> dict:
    """The served model as /api/tags and /api/ps list it, under `name` (default: its served name; an alias
    otherwise)."""
    model = state.model
    folder = Path(model.folder) if model.folder is not None else None
    files = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES] if folder and folder.is_dir() else []
    config = folder / "config.json" if folder else None
    modified = config.stat().st_mtime if config and config.is_file() else state.created
    identity = (str(folder) + (config.read_text(errors="replace") if config and config.is_file() else "")).encode()
    name = name or state.served_model_name
    return {"name": name, "model": name,
            "modified_at": datetime.fromtimestamp(modified, timezone.utc).isoformat().replace("+00:00", "Z"),
            "size": sum(p.stat().st_size for p in files), "digest": hashlib.sha256(identity).hexdigest(),
            "details": model_details(model)}


def add_ollama_routes(app: FastAPI, state, prepare: Callable, answer: Callable) -> None:
    """Mount Ollama's routes. `prepare(request, body_class, None)`: the app's authorize + read + validate (on a
    worker thread) + model and readiness check -> the body; `answer(request, job, answer)`: submit and answer (stream
    or not)."""

    async def guarded(work):
        try:
            return await work()
        except APIError as error:
            return ollama_error(error, state)

    def loaded(body) -> dict:
        """Ollama's answer to a request with nothing to generate: the model is loaded (done_reason "load")."""
        return {"model": body.model or state.served_model_name, "created_at": now_iso(), "done": True,
                "done_reason": "load", **({"message": {"role": "assistant", "content": ""}}
                                          if isinstance(body, OllamaChatRequest) else {"response": ""})}

    async def job_for(body, make_job: Callable):
        """The engine's Job for a validated body: built on a worker thread (tokenizing), its constraint compiled."""
        job = await asyncio.to_thread(make_job, state.model, body)
        return await attach_constraint(state.constraints, job)

    @app.post("/api/chat")
    async def chat(request: Request):
        async def work():
            body = await prepare(request, OllamaChatRequest, None)
            if not body.messages:
                return loaded(body)
            job = await job_for(body, lambda model, b: chat_job(model, chat_request(b)))
            return await answer(request, job, OllamaAnswer("chat", body.model or state.served_model_name,
                                                           state.strings, job.logprobs, len(job.prompt_ids),
                                                           job.tool_calling))
        return await guarded(work)

    @app.post("/api/generate")
    async def generate(request: Request):
        async def work():
            body = await prepare(request, OllamaGenerateRequest, None)
            if not body.prompt:
                return loaded(body)

            def make(model, b: OllamaGenerateRequest):
                templated = not b.raw and model.tokenizer.chat_template is not None
                return (chat_job if templated else completion_job)(model, generate_request(b, templated))

            job = await job_for(body, make)
            return await answer(request, job, OllamaAnswer("generate", body.model or state.served_model_name,
                                                           state.strings, job.logprobs, len(job.prompt_ids)))
        return await guarded(work)

    async def embeddings(request: Request, legacy: bool):
        started = time.perf_counter()
        body = await prepare(request, OllamaEmbedRequest, None)
        texts = [body.prompt or ""] if legacy else ([body.input] if isinstance(body.input, str) else body.input or [])
        inputs = await asyncio.to_thread(embed_inputs, state.model, texts, body.truncate is not False,
                                         body.dimensions)
        vectors = await compute_embeddings(state, inputs, normalize=not legacy, request=request) if inputs else []
        if legacy:
            return {"embedding": [float(x) for x in vectors[0]]}
        return {"model": body.model or state.served_model_name,
                "embeddings": [[float(x) for x in v] for v in vectors],
                "total_duration": int((time.perf_counter() - started) * NS), "load_duration": 0,
                "prompt_eval_count": sum(len(ids) for ids in inputs)}

    @app.post("/api/embed")
    async def embed(request: Request):
        return await guarded(lambda: embeddings(request, legacy=False))

    @app.post("/api/embeddings")
    async def embeddings_legacy(request: Request):
        return await guarded(lambda: embeddings(request, legacy=True))

    @app.get("/api/tags")
    async def tags():
        return {"models": [model_listing(state, name) for name in state.model_names] if state.ready else []}

    @app.get("/api/ps")
    async def ps():
        if not state.ready:
            return {"models": []}
        listing = model_listing(state)
        return {"models": [{**listing, "expires_at": FAR_FUTURE, "size_vram": 0,
                            "context_length": state.model.config.max_position_embeddings}]}

    @app.get("/api/version")
    async def version():
        return {"version": OLLAMA_API_VERSION}

    @app.post("/api/show")
    async def show(request: Request):
        async def work():
            body = await prepare(request, OllamaShowRequest, None)
            if body.model is None:
                state.check_model(body.name)
            model, config = state.model, state.model.config
            tokenizer = model.tokenizer
            info = {"general.architecture": "llama", "general.parameter_count": config.weight_count(),
                    "llama.context_length": config.max_position_embeddings,
                    "llama.embedding_length": config.hidden_size, "llama.block_count": config.num_hidden_layers,
                    "llama.feed_forward_length": config.intermediate_size,
                    "llama.attention.head_count": config.num_attention_heads,
                    "llama.attention.head_count_kv": config.num_key_value_heads,
                    "llama.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
                    "llama.rope.freq_base": config.rope_theta, "llama.vocab_size": config.vocab_size}
            capabilities = ["completion"] + (["tools"] if tokenizer.chat_template else [])
            parameters = "\n".join(f"{key:<30} {json.dumps(value)}" for key, value in
                                   sorted((model.generation_config or {}).items())
                                   if key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"))
            return {"modelfile": f"# served by tinyllama\nFROM {model.folder}\n", "parameters": parameters,
                    "template": tokenizer.chat_template or "", "details": model_details(model),
                    "model_info": info, "capabilities": capabilities,
                    "modified_at": model_listing(state)["modified_at"]}
        return await guarded(work)
