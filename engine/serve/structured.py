"""A request's structured-output fields -> the constraint keyword arguments the engine takes, each with the name of
the HTTP field it came from (so a 400 names that field).

OpenAI: `response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema",
"strict"}}. vLLM: `structured_outputs` {json | regex | choice | grammar | json_object} and its older top-level
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`. Our extension: `json_whitespace` "compact" (default:
no whitespace between JSON tokens) or "flexible"; vLLM's `structured_outputs.disable_any_whitespace` also works.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.serve.errors import bad_request

VLLM_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
             "json_object": "json_object"}
VLLM_IGNORED = ("backend", "disable_fallback", "disable_additional_properties")  # engine choices: one engine here
GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}


@dataclass
class ConstraintRequest:
    """The constraint keyword arguments for default_options, and which HTTP field each came from."""

    kwargs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # engine field name ("json_schema", ...) -> HTTP field

    def add(self, kind: str, value, param: str) -> None:
        """Record one constraint; a second one is a 400 naming it."""
        if self.params:
            raise bad_request(f"{param}: give one structured-output constraint per request (also got "
                              f"{next(iter(self.params.values()))})", param)
        self.kwargs["json_schema" if kind == "json_object" else kind] = {} if kind == "json_object" else value
        self.params[kind] = self.params["json_schema" if kind == "json_object" else kind] = param

    def param_for(self, kind: str) -> str:
        """The HTTP field behind an engine field name (the first constraint's when unknown)."""
        return self.params.get(kind) or next(iter(self.params.values()), kind)


def constraint_request(body) -> ConstraintRequest:
    """The structured-output fields of a chat or completions body (400 naming the field when malformed)."""
    out = ConstraintRequest()
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.type != "text":
        kind = response_format.type
        if kind == "json_object":
            out.add("json_object", True, "response_format")
        elif kind == "json_schema":
            spec = response_format.json_schema
            if not isinstance(spec, dict):
                raise bad_request("response_format.json_schema: required with type 'json_schema' (an object with "
                                  "name and schema)", "response_format.json_schema")
            if "name" in spec and not isinstance(spec["name"], str):
                raise bad_request("response_format.json_schema.name: must be a string",
                                  "response_format.json_schema.name")
            out.add("json_schema", spec.get("schema") or {}, "response_format.json_schema.schema")
        else:
            raise bad_request(f"response_format: type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                              "response_format.type")
    structured = body.structured_outputs or {}
    for key, value in structured.items():
        if value is None or key in VLLM_IGNORED or key == "disable_any_whitespace":
            continue
        if key not in VLLM_KEYS:
            raise bad_request(f"structured_outputs.{key}: not supported (use json, regex, choice, grammar or "
                              "json_object)", f"structured_outputs.{key}")
        if key == "json_object" and value is not True:
            continue
        out.add(VLLM_KEYS[key], value, f"structured_outputs.{key}")
    for name, kind in GUIDED.items():
        value = getattr(body, name, None)
        if value is not None:
            out.add(kind, value, name)
    if body.guided_whitespace_pattern is not None:
        raise bad_request("guided_whitespace_pattern: not supported (json_whitespace: 'compact' or 'flexible')",
                          "guided_whitespace_pattern")
    whitespace = body.json_whitespace
    if whitespace is None and isinstance(structured.get("disable_any_whitespace"), bool):
        whitespace = "compact" if structured["disable_any_whitespace"] else "flexible"
    if out.kwargs and whitespace is not None:
        out.kwargs["json_whitespace"] = whitespace
    return out
