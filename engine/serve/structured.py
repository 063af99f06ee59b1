"""A request's structured-output fields -> the constraint the engine compiles, each with the name of the HTTP field
it came from (so a 400 names that field); then the compile itself, off the event loop and the default thread pool.

OpenAI: `response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema",
"strict"}}, on /v1/chat/completions and (as vLLM) /v1/completions. vLLM: `structured_outputs` {json | regex | choice |
grammar | json_object} and its older top-level `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
Other servers' fields that mean the same: llama.cpp's top-level `grammar` (GBNF) and `json_schema`, and its
`response_format` {"type": "json_object" | "json_schema", "schema": {...}}; TGI's `grammar` {"type": "json" |
"regex", "value"}; SGLang's `regex` and `ebnf`. Constraint fields we do not implement (llama.cpp's lazy grammars,
vLLM's whitespace patterns and structural tags) are a 400 naming the field, never ignored. Our extension:
`json_whitespace` "compact" (default: no whitespace between JSON tokens) or "flexible"; vLLM's
`structured_outputs.disable_any_whitespace` also works. A schema sent as a JSON string is held to the body's own
nesting limit.
"""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

from engine.generation.constraint_compiler import CompilerBusyError, CompilerStoppedError
from engine.generation.constraints import ConstraintError, constraint_grammar
from engine.generation.state import constraint_eos_ids
from engine.serve.errors import SERVER_ERROR, APIError, bad_request
from engine.serve.protocol import parse_json_field

VLLM_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
             "json_object": "json_object"}
VLLM_IGNORED = ("backend", "disable_fallback", "disable_additional_properties")  # engine choices: one engine here
GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}
OTHER_SERVERS = {"json_schema": "json_schema", "regex": "regex", "ebnf": "grammar"}  # llama.cpp, SGLang
TGI_GRAMMAR_TYPES = {"json": "json_schema", "json_schema": "json_schema", "regex": "regex"}
RETRY_AFTER_COMPILES = "1"


@dataclass
class ConstraintRequest:
    """The constraint keyword arguments for default_options, and which HTTP field each came from."""

    kwargs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # engine field name ("json_schema", ...) -> HTTP field

    def add(self, kind: str, value, param: str) -> None:
        """Record one constraint; a second one is a 400 naming it. A JSON Schema sent as text is parsed here."""
        if self.params:
            raise bad_request(f"{param}: give one structured-output constraint per request (also got "
                              f"{next(iter(self.params.values()))})", param)
        if kind == "json_schema" and isinstance(value, str):
            value = parse_json_field(value, param)
        self.kwargs["json_schema" if kind == "json_object" else kind] = {} if kind == "json_object" else value
        self.params[kind] = self.params["json_schema" if kind == "json_object" else kind] = param

    def param_for(self, kind: str) -> str:
        """The HTTP field behind an engine field name (the first constraint's when unknown)."""
        return self.params.get(kind) or next(iter(self.params.values()), kind)


@dataclass(frozen=True)
class PendingConstraint:
    """A checked constraint still to compile: llguidance's grammar text, the EOS ids it is compiled with, and the
    HTTP field a compile error names."""

    kind: str
    grammar: str
    eos_ids: tuple[int, ...]
    param: str


def constraint_request(body) -> ConstraintRequest:
    """The structured-output fields of a chat or completions body (400 naming the field when malformed)."""
    out = ConstraintRequest()
    _response_format(body, out)
    structured = body.structured_outputs or {}
    for key, value in structured.items():
        if value is None or key in VLLM_IGNORED or key == "disable_any_whitespace":
            continue
        if key not in VLLM_KEYS:
            raise bad_request(f"structured_outputs.{key}: not supported (use json, regex, choice, grammar or "
                              "json_object)", f"structured_outputs.{key}")
        if key == "json_object":
            if not isinstance(value, bool):
                raise bad_request(f"structured_outputs.json_object: must be a boolean, got {_kind(value)}",
                                  "structured_outputs.json_object")
            if not value:
                continue
        out.add(VLLM_KEYS[key], value, f"structured_outputs.{key}")
    for name, kind in GUIDED.items():
        value = getattr(body, name, None)
        if value is not None:
            out.add(kind, value, name)
    _other_servers(body, out)
    if body.guided_whitespace_pattern is not None:
        raise bad_request("guided_whitespace_pattern: not supported (json_whitespace: 'compact' or 'flexible')",
                          "guided_whitespace_pattern")
    whitespace = body.json_whitespace
    if whitespace is None and isinstance(structured.get("disable_any_whitespace"), bool):
        whitespace = "compact" if structured["disable_any_whitespace"] else "flexible"
    if out.kwargs and whitespace is not None:
        out.kwargs["json_whitespace"] = whitespace
    return out


def _response_format(body, out: ConstraintRequest) -> None:
    """OpenAI's response_format, with llama.cpp's `schema` beside the type."""
    response_format = getattr(body, "response_format", None)
    if response_format is None or response_format.type == "text":
        return
    kind, llama_schema = response_format.type, response_format.schema_
    if llama_schema is not None and not isinstance(llama_schema, dict):
        raise bad_request(f"response_format.schema: must be a JSON object (a JSON Schema), got {_kind(llama_schema)}",
                          "response_format.schema")
    if kind == "json_object":
        if llama_schema is not None:
            out.add("json_schema", llama_schema, "response_format.schema")
        else:
            out.add("json_object", True, "response_format")
    elif kind == "json_schema":
        spec = response_format.json_schema
        if spec is None and llama_schema is not None:
            out.add("json_schema", llama_schema, "response_format.schema")
            return
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema: required with type 'json_schema' (an object with "
                              "name and schema)", "response_format.json_schema")
        if "name" in spec and not isinstance(spec["name"], str):
            raise bad_request("response_format.json_schema.name: must be a string",
                              "response_format.json_schema.name")
        schema = spec.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise bad_request(f"response_format.json_schema.schema: must be a JSON object (a JSON Schema), got "
                              f"{_kind(schema)}", "response_format.json_schema.schema")
        out.add("json_schema", schema or {}, "response_format.json_schema.schema")
    else:
        raise bad_request(f"response_format: type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                          "response_format.type")


def _other_servers(body, out: ConstraintRequest) -> None:
    """llama.cpp's, TGI's and SGLang's constraint fields onto ours; the ones we do not implement are a 400."""
    for name in ("grammar_lazy", "grammar_triggers"):
        value = getattr(body, name, None)
        if value not in (None, False, []):
            raise bad_request(f"{name}: lazy grammars (llama.cpp's, started by trigger words) are not supported; "
                              f"use grammar or tools", name)
    grammar = getattr(body, "grammar", None)
    if isinstance(grammar, dict):  # TGI: {"type": "json" | "regex", "value": ...}
        kind = TGI_GRAMMAR_TYPES.get(grammar.get("type"))
        if kind is None:
            raise bad_request(f"grammar.type: 'json' or 'regex' (TGI's grammar), got {grammar.get('type')!r}",
                              "grammar.type")
        if grammar.get("value") is None:
            raise bad_request("grammar.value: required (the JSON Schema or the regex)", "grammar.value")
        out.add(kind, grammar["value"], "grammar.value")
    elif grammar is not None:
        if not isinstance(grammar, str):
            raise bad_request(f"grammar: must be a GBNF grammar (text) or TGI's {{\"type\", \"value\"}}, got "
                              f"{_kind(grammar)}", "grammar")
        out.add("grammar", grammar, "grammar")
    for name, kind in OTHER_SERVERS.items():
        value = getattr(body, name, None)
        if value is None:
            continue
        if not isinstance(value, str) and not (kind == "json_schema" and isinstance(value, dict)):
            wanted = "a JSON Schema (an object or its JSON text)" if kind == "json_schema" else "a string"
            raise bad_request(f"{name}: must be {wanted}, got {_kind(value)}", name)
        out.add(kind, value, name)


def _kind(value) -> str:
    """A JSON value's type in JSON's words, with the value when it is short ('false', 'an array', ...)."""
    if isinstance(value, bool) or value is None:
        return "null" if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return {"list": "an array", "str": "a string", "dict": "an object"}.get(type(value).__name__, type(value).__name__)


def pending_constraint(model, options, request: ConstraintRequest) -> PendingConstraint | None:
    """The request's constraint checked and turned into grammar text (no compile yet), or None when it has none;
    400 naming the field when it is malformed or past a limit (engine.generation.constraint_limits)."""
    if not request.kwargs:
        return None
    try:
        wanted = constraint_grammar(**request.kwargs)
    except ConstraintError as e:
        raise _bad_constraint(request.param_for(e.field), e) from None
    if wanted is None:
        return None
    kind, grammar = wanted
    return PendingConstraint(kind, grammar, constraint_eos_ids(model, options), request.param_for(kind))


async def attach_constraint(compiler, job):
    """The job with its pending constraint compiled into job.options (engine.generation.constraint_compiler: a
    cached constraint at once, else on the compiler's own threads after a compile worker came through it). 400
    naming the field when it cannot be compiled; 503 + Retry-After when too many compiles wait; 503 when the
    server shuts down meanwhile."""
    pending = getattr(job, "constraint", None)
    if pending is None:
        return job
    try:
        future = compiler.submit(pending.kind, pending.grammar, pending.eos_ids)
        constraint = await asyncio.wrap_future(future)  # cancelling this request drops a compile still waiting
    except CompilerBusyError as e:
        raise APIError(503, str(e), SERVER_ERROR, headers={"Retry-After": RETRY_AFTER_COMPILES}) from None
    except CompilerStoppedError:
        raise APIError(503, "the server is shutting down", SERVER_ERROR) from None
    except ConstraintError as e:
        raise _bad_constraint(pending.param, e) from None
    job.options = dataclasses.replace(job.options, constraint=constraint)
    job.constraint = None
    return job


def _bad_constraint(param: str, error: ConstraintError) -> APIError:
    """A ConstraintError ('json_schema: reason') as a 400 naming the HTTP field ('guided_json: reason')."""
    message = str(error)
    if message.startswith(error.field + ": "):
        message = message[len(error.field) + 2:]
    return bad_request(f"{param}: {message}", param)
