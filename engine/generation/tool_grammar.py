"""The grammar a tool-calling reply is generated under (llguidance's Lark, with each function's arguments as an inline
JSON Schema), so a call always names a given function and its arguments are valid against that function's
`parameters`.

- "required": one call block, or several separated by a newline when parallel calls are allowed;
- a named function: one call of that function;
- "auto": either text that does not start with a call block, or call blocks as above.

The blocks are engine.text.tool_calls' format. Objects in the arguments' schemas are closed where they leave
`additionalProperties` out (no keys beyond `properties`), as OpenAI's strict mode and vLLM do; `true` keeps one open.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import llguidance

from engine.generation.constraints import ConstraintError
from engine.text.tool_calls import CALL_CLOSE, CALL_OPEN, CALL_SEPARATOR, ITEM_SEPARATOR, KEY_SEPARATOR, function_of

AUTO, REQUIRED = "auto", "required"
SCHEMA_CHILDREN = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
                   "unevaluatedItems", "unevaluatedProperties")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """A copy of a JSON Schema where every object schema that does not say `additionalProperties` says false."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in SCHEMA_CHILDREN:
        if isinstance(out.get(key), (dict, list)):
            out[key] = closed_objects(out[key])
    for key in SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed_objects(out["additionalProperties"])
    kind = out.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind) or (
        kind is None and "properties" in out)
    if is_object and "additionalProperties" not in out and "$ref" not in out:
        out["additionalProperties"] = False
    return out


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def call_schema(tools: Sequence[Mapping[str, Any]], only: str | None = None) -> dict:
    """The JSON Schema of one call's JSON: {"name": <a tool's name>, "arguments": <that tool's parameters>}, an anyOf
    over the tools (just `only` when given)."""
    options = []
    for tool in tools:
        function = function_of(tool)
        if only is not None and function["name"] != only:
            continue
        options.append({"type": "object",
                        "properties": {"name": {"const": function["name"]},
                                       "arguments": closed_objects(function["parameters"])},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ITEM_SEPARATOR,
                            "key_separator": KEY_SEPARATOR}
    return schema


def check_parameters(tools: Sequence[Mapping[str, Any]], field_format: str = "tools[{}].function.parameters") -> None:
    """ConstraintError (its field: `field_format` with the tool's index) for a tool whose parameters llguidance
    cannot compile."""
    for i, tool in enumerate(tools):
        schema = closed_objects(function_of(tool)["parameters"])
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
            error = llguidance.LLMatcher.validate_grammar(grammar)
        except (ValueError, TypeError) as e:
            error = str(e)
        if error:
            field = field_format.format(i)
            raise ConstraintError(f"{field}: {error.strip().splitlines()[0]}", field)


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], choice: str = REQUIRED, parallel: bool = True) -> str:
    """The Lark grammar of a reply under `choice` ("auto", "required", or a function's name): call blocks (one, or
    several when `parallel` and no name is forced), or, with "auto", text that does not start with a block."""
    only = None if choice in (AUTO, REQUIRED) else choice
    block = f"{_lark_string(CALL_OPEN)} call_json {_lark_string(CALL_CLOSE)}"
    calls = f"block ({_lark_string(CALL_SEPARATOR)} block)*" if parallel and only is None else "block"
    lines = [f"start: {'TEXT | calls' if choice == AUTO else 'calls'}",
             f"calls: {calls}",
             f"block: {block}",
             f"call_json: %json {json.dumps(call_schema(tools, only), ensure_ascii=False)}"]
    if choice == AUTO:
        lines.append(f"TEXT: /(.|\\n)*/ & ~/{_regex_literal(CALL_OPEN)}(.|\\n)*/")
    return "\n".join(lines) + "\n"


def _regex_literal(text: str) -> str:
    """`text` as a literal inside a /.../ regex of the grammar."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch in ".^$*+?()[]{}|\\/-":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)
