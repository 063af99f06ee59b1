"""Tool calling on /v1/chat/completions, in OpenAI's shape: the request's `tools`, `tool_choice`,
`parallel_tool_calls` (and the legacy `functions` / `function_call`) -> a ToolCalling; history turns with assistant
`tool_calls` and `tool` results -> messages the chat template renders (engine.text.tool_calls); the grammar a reply is
generated under (engine.generation.tool_grammar); and the reply read back as `message.tool_calls` (streamed as
`delta.tool_calls` with their index), finish_reason "tool_calls".

tool_choice: "none" (the tools are not shown, the reply is text), "auto" (the default with tools: text or calls; a
call that starts is valid), "required" (one or more calls; one when parallel_tool_calls is false), or
{"type": "function", "function": {"name": ...}} (one call of that function). The legacy fields answer in their own
shape: `message.function_call`, finish_reason "function_call", one call at most.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.generation.constraints import ConstraintError
from engine.generation.state import GenerationResult, TokenEvent
from engine.generation.tool_grammar import AUTO, REQUIRED, check_parameters, tool_call_grammar
from engine.serve.errors import bad_request
from engine.serve.responses import Answer, finish_reason
from engine.serve.structured import ConstraintRequest
from engine.text.tool_calls import ReplyStream, parse_reply

NONE = "none"
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass
class ToolCalling:
    """A request's tools (OpenAI's {"type": "function", "function": {...}}), the choice ("none", "auto", "required"
    or a function's name), whether several calls may come at once, and whether it came in the legacy fields."""

    tools: list[dict] = field(default_factory=list)
    choice: str = NONE
    parallel: bool = True
    legacy: bool = False

    @property
    def active(self) -> bool:
        """Whether the reply may hold calls (a choice other than "none")."""
        return self.choice != NONE and bool(self.tools)

    @property
    def shown_tools(self) -> list[dict] | None:
        """The tools written into the prompt (none with tool_choice "none")."""
        return self.tools if self.active else None

    def constraint(self) -> ConstraintRequest | None:
        """The grammar the reply is generated under (None with "none"), recorded as coming from `tools`."""
        if not self.active:
            return None
        out = ConstraintRequest()
        out.add("grammar", tool_call_grammar(self.tools, self.choice, self.parallel and not self.legacy),
                "functions" if self.legacy else "tools")
        return out


def _function(value: Any, where: str) -> dict:
    """A function definition {"name", "description"?, "parameters"?} checked (400 naming `where`)."""
    if not isinstance(value, dict):
        raise bad_request(f"{where}: must be an object with a name", where)
    name = value.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise bad_request(f"{where}.name: a function name is 1 to 64 letters, digits, '_' or '-', got {name!r}",
                          f"{where}.name")
    description = value.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{where}.description: must be a string", f"{where}.description")
    parameters = value.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise bad_request(f"{where}.parameters: must be a JSON Schema (an object)", f"{where}.parameters")
    out = {"name": name, "parameters": parameters}
    if description:
        out["description"] = description
    return out


def _named_choice(value: Any, param: str, legacy: bool) -> str:
    """A choice given as an object -> the function's name (400 naming `param` when malformed)."""
    if legacy:
        name = value.get("name") if isinstance(value, dict) else None
    else:
        if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(value.get("function"), dict):
            raise bad_request(f"{param}: 'none', 'auto', 'required' or {{\"type\": \"function\", \"function\": "
                              f"{{\"name\": ...}}}}, got {value!r:.80}", param)
        name = value["function"].get("name")
    if not isinstance(name, str):
        raise bad_request(f"{param}: name the function to call", param)
    return name


def tool_calling(body) -> ToolCalling:
    """The request's tool fields -> ToolCalling (400 naming the field when malformed)."""
    if body.tools is not None and body.functions is not None:
        raise bad_request("functions: give tools or the legacy functions, not both", "functions")
    legacy = body.functions is not None or (body.tools is None and body.function_call is not None)
    raw_tools = body.functions if legacy else body.tools
    param, choice_param = ("functions", "function_call") if legacy else ("tools", "tool_choice")
    tools, seen = [], set()
    for i, item in enumerate(raw_tools or []):
        where = f"{param}[{i}]"
        if legacy:
            function = _function(item, where)
        else:
            if not isinstance(item, dict) or item.get("type") != "function":
                kind = item.get("type") if isinstance(item, dict) else type(item).__name__
                raise bad_request(f"{where}.type: only 'function' tools are supported, got {kind!r}", f"{where}.type")
            function = _function(item.get("function"), f"{where}.function")
        if function["name"] in seen:
            raise bad_request(f"{where}: two tools are named {function['name']!r}", where)
        seen.add(function["name"])
        tools.append({"type": "function", "function": function})
    value = body.function_call if legacy else body.tool_choice
    if value is None:
        choice = AUTO if tools else NONE
    elif value in (NONE, AUTO) or (value == REQUIRED and not legacy):
        choice = value
    elif isinstance(value, str):
        raise bad_request(f"{choice_param}: 'none', 'auto'{'' if legacy else ', required'} or a function, got "
                          f"{value!r}", choice_param)
    else:
        choice = _named_choice(value, choice_param, legacy)
        if choice not in seen:
            raise bad_request(f"{choice_param}: no tool is named {choice!r} (the request's {param}: "
                              f"{', '.join(sorted(seen)) or 'none'})", choice_param)
    if choice == REQUIRED and not tools:
        raise bad_request(f"{choice_param}: 'required' needs tools", choice_param)
    parallel = body.parallel_tool_calls
    calling = ToolCalling(tools, choice, True if parallel is None else bool(parallel), legacy)
    if calling.active:
        try:
            check_parameters(tools, "functions[{}].parameters" if legacy else "tools[{}].function.parameters")
        except ConstraintError as e:
            raise bad_request(str(e), e.field) from None
    return calling


def _arguments(value: Any, where: str) -> Any:
    """A past call's arguments (OpenAI sends JSON text) -> the object a template renders (the text when it is not
    JSON: it is shown as it was)."""
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else {}
        except ValueError:
            return value
    if isinstance(value, dict):
        return value
    raise bad_request(f"{where}: the arguments must be a JSON string", where)


def history_tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's `tool_calls` -> transformers' convention ({"id", "type", "function": {"name",
    "arguments": object}}); 400 naming the field when malformed."""
    if not isinstance(calls, list):
        raise bad_request(f"{where}: must be a list of tool calls", where)
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{at}.function: a tool call needs function.name and function.arguments",
                              f"{at}.function")
        out.append({"id": call.get("id") or f"call_{j}", "type": "function",
                    "function": {"name": function["name"],
                                 "arguments": _arguments(function.get("arguments", "{}"), f"{at}.function.arguments")}})
    return out


def legacy_function_call(value: Any, where: str) -> list[dict]:
    """A legacy assistant `function_call` {"name", "arguments"} -> one call in transformers' convention."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise bad_request(f"{where}: needs name and arguments", where)
    return [{"id": "call_0", "type": "function",
             "function": {"name": value["name"], "arguments": _arguments(value.get("arguments", "{}"), where)}}]


def new_call_id() -> str:
    """A tool call's id: 'call_' and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


class ToolAnswer(Answer):
    """A chat response whose reply may be tool calls: content deltas until the reply turns out to be calls, then
    `delta.tool_calls` (the first delta of a call carries its index, id, type and name; later ones arguments text);
    the whole response carries `message.tool_calls`. Legacy requests get `function_call` instead."""

    def __init__(self, calling: ToolCalling, *args, **kwargs):
        super().__init__("chat", *args, **kwargs)
        self.calling = calling
        self.reader = ReplyStream()
        self.call_ids: list[str] = []
        self._args = args
        self._kwargs = kwargs

    def choice(self, index: int, echo=None) -> "ToolAnswer":
        """The Answer of another choice of the same response (n > 1), with its own reader and call ids (chat has
        no echo)."""
        other = ToolAnswer(self.calling, *self._args, **{**self._kwargs, "index": index})
        other.id, other.created = self.id, self.created
        return other

    def _call_id(self, index: int) -> str:
        while len(self.call_ids) <= index:
            self.call_ids.append(new_call_id())
        return self.call_ids[index]

    def _delta(self, deltas: list[tuple]) -> dict:
        """Reader deltas -> one chat delta: content joined, each call's pieces merged (one entry per call index)."""
        content = "".join(d[1] for d in deltas if d[0] == "content")
        calls: dict[int, dict] = {}
        for d in deltas:
            if d[0] == "call":
                calls[d[1]] = {"index": d[1], "id": self._call_id(d[1]), "type": "function",
                               "function": {"name": d[2], "arguments": ""}}
            elif d[0] == "arguments":
                entry = calls.setdefault(d[1], {"index": d[1], "function": {}})
                entry["function"]["arguments"] = entry["function"].get("arguments", "") + d[2]
        delta: dict = {}
        if content:
            delta["content"] = content
        if calls:
            if self.calling.legacy:
                entry = calls[min(calls)]["function"]
                delta["function_call"] = dict(entry)
            else:
                delta["tool_calls"] = [calls[i] for i in sorted(calls)]
        return delta

    def delta_chunk(self, events: list[TokenEvent]) -> dict | None:
        """A chunk with what these tokens make known (content or tool-call pieces); None when it would carry
        nothing."""
        self.completion_tokens += len(events)
        delta = self._delta(self.reader.feed("".join(e.text for e in events)))
        logprobs = self.logprobs_block(events)
        if not delta and (self.logprobs is None or not events) and not (self.continuous_usage and events):
            return None
        return self._chunk([{"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": None}])

    def _finish(self, result: GenerationResult, has_calls: bool) -> str:
        reason = finish_reason(result)
        if has_calls and reason == "stop":
            return "function_call" if self.calling.legacy else "tool_calls"
        return reason

    def final_chunk(self, result: GenerationResult) -> dict:
        """The chunk with the finish reason ("tool_calls" after calls), carrying any text held back."""
        delta = self._delta(self.reader.finish())
        return self._chunk([{"index": self.index, "delta": delta, "logprobs": None,
                             "finish_reason": self._finish(result, self.reader.sent_calls > 0)}])

    def complete(self, events: list[TokenEvent], result: GenerationResult) -> dict:
        """The non-streamed response body: message.tool_calls (or function_call) when the reply is calls."""
        body = super().complete(events, result)
        reply = parse_reply(result.text)
        if not reply.calls:
            return body
        choice = body["choices"][0]
        message = {"role": "assistant", "content": reply.content, "refusal": None}
        if self.calling.legacy:
            message["function_call"] = {"name": reply.calls[0].name, "arguments": reply.calls[0].arguments}
        else:
            message["tool_calls"] = [{"id": self._call_id(i), "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for i, c in enumerate(reply.calls)]
        choice["message"] = message
        choice["finish_reason"] = self._finish(result, True)
        return body
