"""Tool calls as text: how tools and past calls are written into a prompt, and how a reply is read back as calls.

One call format, the one Hermes and Qwen models are trained on (so a model whose own template takes `tools` and
answers this way needs nothing more):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A reply is either text or one or more such blocks separated by a newline; nothing else. For a template that reads
the `tools` variable (transformers' `apply_chat_template(tools=...)`), the tools, assistant `tool_calls` and `tool`
results go to the template as transformers passes them. For any other template (TinyLlama's, the named ones) the
generic format below is written into the conversation: the tool list and the call format at the end of the system
turn (a system turn is added when there is none), each past call as its block in the assistant turn, each tool result
as a user turn `<tool_response>\\n...\\n</tool_response>` (consecutive results in one turn).

Messages here are in transformers' convention: {"role", "content", "tool_calls": [{"id", "type": "function",
"function": {"name", "arguments": dict}}]} for the assistant, {"role": "tool", "content", "tool_call_id", "name"}
for results; tools are OpenAI's {"type": "function", "function": {"name", "description", "parameters"}}.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from engine.text.chat_template import template_takes_tools

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
CALL_SEPARATOR = "\n"
RESULT_OPEN = "<tool_response>\n"
RESULT_CLOSE = "\n</tool_response>"
ITEM_SEPARATOR, KEY_SEPARATOR = ", ", ": "  # how the call's JSON is written (json.dumps' defaults)

TOOLS_PREAMBLE = ("You may call these functions:\n<tools>\n{tools}\n</tools>\n"
                  "To call one, answer with\n<tool_call>\n{{\"name\": ..., \"arguments\": {{...}}}}\n</tool_call>")


def function_of(tool: Mapping[str, Any]) -> dict:
    """{"type": "function", "function": {...}} -> {"name", "description"?, "parameters"} (parameters default: an
    object without properties)."""
    function = dict(tool.get("function") or {})
    function.setdefault("parameters", {"type": "object", "properties": {}})
    return function


def call_json(name: str, arguments: Any) -> str:
    """The JSON of one call: {"name": name, "arguments": arguments} (arguments: a dict, or JSON text kept as is)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return f"{{\"name\": {json.dumps(name, ensure_ascii=False)}, \"arguments\": {arguments}}}"
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False,
                      separators=(ITEM_SEPARATOR, KEY_SEPARATOR))


def call_block(name: str, arguments: Any) -> str:
    """One call as the model writes it: <tool_call>\\n{json}\\n</tool_call>."""
    return CALL_OPEN + call_json(name, arguments) + CALL_CLOSE


def tools_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The generic system-turn block: the tools' signatures (one JSON per line) and the call format."""
    lines = "\n".join(json.dumps(function_of(t), ensure_ascii=False) for t in tools)
    return TOOLS_PREAMBLE.format(tools=lines)


def prompt_messages(template: str | None, messages: Sequence[Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None) -> tuple[list[dict], list[dict] | None]:
    """The messages (and tools) to render with `template`: unchanged, with the tools, when the template takes
    `tools`; otherwise rewritten into the generic format (tools in the system turn, calls and results as text), with
    no tools. `tools` None or empty: no tool list is written (past calls and results still are)."""
    if template_takes_tools(template):
        return [dict(m) for m in messages], (list(tools) if tools else None)
    out: list[dict] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role == "assistant" and message.get("tool_calls"):
            blocks = [call_block(c["function"]["name"], c["function"].get("arguments", {}))
                      for c in message["tool_calls"]]
            text = (content + "\n" if content else "") + CALL_SEPARATOR.join(blocks)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            block = RESULT_OPEN + (content or "") + RESULT_CLOSE
            if out and out[-1].get("_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_results": True})
        else:
            out.append({"role": role, "content": content if content is not None else ""})
    for m in out:
        m.pop("_results", None)
    if tools:
        block = tools_text(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = (out[0]["content"] + "\n\n" if out[0]["content"] else "") + block
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, None


@dataclass
class ParsedCall:
    """One call read from a reply: its name, its arguments' JSON text, whether its block was complete."""

    name: str
    arguments: str
    complete: bool = True


@dataclass
class ToolReply:
    """A reply read as tool calls: the text before any call (None when the reply is calls only), and the calls."""

    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)


def _json_value_end(text: str, start: int) -> int | None:
    """The index just past the JSON object or array starting at text[start] ('{' or '['), or None when it does not
    end within `text` (strings and escapes are skipped)."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _read_call(text: str, start: int) -> tuple[ParsedCall | None, int]:
    """The call whose block starts at text[start] (at CALL_OPEN) -> (the call so far, or None before its name is
    complete; the index past its block, or len(text) when the block is not complete)."""
    i = start + len(CALL_OPEN)
    head = '{"name": "'
    if not text.startswith(head, i):
        return None, len(text)
    name_end = text.find('"', i + len(head))
    if name_end < 0:
        return None, len(text)
    name = text[i + len(head):name_end]
    rest = f'{ITEM_SEPARATOR}"arguments"{KEY_SEPARATOR}'
    j = name_end + 1
    if not text.startswith(rest, j):
        return (ParsedCall(name, "", complete=False), len(text)) if rest.startswith(text[j:j + len(rest)]) else \
            (None, len(text))
    args_start = j + len(rest)
    end = _json_value_end(text, args_start) if args_start < len(text) else None
    if end is None:
        return ParsedCall(name, text[args_start:], complete=False), len(text)
    closing = "}" + CALL_CLOSE
    complete = text.startswith(closing, end)
    return ParsedCall(name, text[args_start:end], complete=complete), (end + len(closing) if complete else len(text))


def parse_reply(text: str) -> ToolReply:
    """A generated reply -> ToolReply: calls when it starts with a call block (each block read in turn, the last
    possibly incomplete when the reply was cut off), otherwise all of it is content."""
    if not text.startswith(CALL_OPEN):
        return ToolReply(text)
    calls, i = [], 0
    while i < len(text) and text.startswith(CALL_OPEN, i):
        call, i = _read_call(text, i)
        if call is None:
            break
        calls.append(call)
        if text.startswith(CALL_SEPARATOR + CALL_OPEN, i):
            i += len(CALL_SEPARATOR)
    return ToolReply(None, calls)


class ReplyStream:
    """A reply read as it streams: `feed(text)` -> the deltas it makes known, each ("content", text), ("call", index,
    name) once a call's name is complete, or ("arguments", index, text); `finish()` -> what was held back.

    Text that may still become a call block (a prefix of '<tool_call>\\n' at the reply's start) is held until it is
    known; arguments are sent as they are generated, never the block's closing characters."""

    def __init__(self):
        self.text = ""
        self.mode: str | None = None  # None: undecided; "content"; "calls"
        self.sent_calls = 0
        self.sent_arguments: list[int] = []

    def feed(self, text: str) -> list[tuple]:
        """Add generated text -> the deltas now known."""
        self.text += text
        if self.mode is None:
            if self.text.startswith(CALL_OPEN):
                self.mode = "calls"
            elif CALL_OPEN.startswith(self.text):
                return []
            else:
                self.mode = "content"
                return [("content", self.text)]
        if self.mode == "content":
            return [("content", text)] if text else []
        return self._call_deltas(parse_reply(self.text).calls)

    def finish(self) -> list[tuple]:
        """The deltas held back when the reply ends (a start that never became a call is content)."""
        if self.mode is None and self.text:
            self.mode = "content"
            return [("content", self.text)]
        return []

    def _call_deltas(self, calls: list[ParsedCall]) -> list[tuple]:
        out = []
        for index, call in enumerate(calls):
            if index >= self.sent_calls:
                out.append(("call", index, call.name))
                self.sent_calls += 1
                self.sent_arguments.append(0)
            sent = self.sent_arguments[index]
            if len(call.arguments) > sent:
                out.append(("arguments", index, call.arguments[sent:]))
                self.sent_arguments[index] = len(call.arguments)
        return out
