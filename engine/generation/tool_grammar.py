"""The grammar a tool-calling reply is generated under (llguidance's Lark, with each function's arguments as an inline
JSON Schema), so a call always names a given function and its arguments are valid against that function's
`parameters`.

- "required": one call block, or several separated by a newline when parallel calls are allowed;
- a named function: one call of that function;
- "auto": either text that does not start with a call block, or call blocks as above.

The blocks are engine.text.tool_calls' format. The arguments' schemas are prepared as every JSON Schema constraint
is (engine.generation.json_schemas.prepare_schema): objects that leave `additionalProperties` out are closed, as
OpenAI's strict mode and vLLM read them, and integers are bounded to what a float64 holds exactly.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from engine.generation.constraint_limits import check_schema, check_size
from engine.generation.constraints import ConstraintError
from engine.generation.json_schemas import prepare_schema
from engine.text.tool_calls import CALL_CLOSE, CALL_OPEN, CALL_SEPARATOR, ITEM_SEPARATOR, KEY_SEPARATOR, function_of

AUTO, REQUIRED = "auto", "required"


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def call_schema(tools: Sequence[Mapping[str, Any]], only: str | None = None) -> dict:
    """The JSON Schema of one call's JSON: {"name": <a tool's name>, "arguments": <that tool's parameters, as the
    constraint compiler prepares a schema>}, an anyOf over the tools (just `only` when given). ConstraintError for
    parameters that cannot be generated (see prepare_schema)."""
    options = []
    for tool in tools:
        function = function_of(tool)
        if only is not None and function["name"] != only:
            continue
        options.append({"type": "object",
                        "properties": {"name": {"const": function["name"]},
                                       "arguments": _prepared(function["parameters"], "tools")},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ITEM_SEPARATOR,
                            "key_separator": KEY_SEPARATOR}
    return schema


def check_parameters(tools: Sequence[Mapping[str, Any]], field_format: str = "tools[{}].function.parameters") -> None:
    """ConstraintError (its field: `field_format` with the tool's index) for a tool whose parameters are past a limit
    of engine.generation.constraint_limits (nested too deep, too large) or cannot be generated (prepare_schema):
    checks without the compiler, which the server runs in a worker process of its own."""
    for i, tool in enumerate(tools):
        field = field_format.format(i)
        schema = function_of(tool)["parameters"]
        try:
            check_schema(schema)
            check_size(json.dumps(schema, ensure_ascii=False), "the schema")
            prepare_schema(schema)
        except ValueError as e:
            raise ConstraintError(f"{field}: {e}", field) from None
        except RecursionError:
            raise ConstraintError(f"{field}: nested too deeply", field) from None


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


def _prepared(schema: Any, field: str) -> Any:
    """prepare_schema(schema) for a dict (other JSON Schemas, true / false, as they are); ConstraintError naming
    `field` when it cannot be generated."""
    if not isinstance(schema, dict):
        return schema
    try:
        return prepare_schema(schema)
    except ValueError as e:
        raise ConstraintError(f"{field}: {e}", field) from None


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
