"""Ollama's request bodies (/api/chat, /api/generate) translated into the OpenAI requests the engine already serves,
so both faces share one validation, one prompt rendering, one constraint path and one scheduler.

- `options`: num_predict -> max_tokens (-1 or -2: the rest of the window), temperature, top_p, top_k, min_p, seed,
  stop, presence_penalty, frequency_penalty, repeat_penalty -> repetition_penalty. Options about the machine
  (num_ctx, num_thread, num_gpu, use_mmap, ...) are ignored: the window is the model's, the threads the server's.
  Sampling options this engine does not implement are refused when they would change the output (mirostat other
  than 0, typical_p or tfs_z other than 1).
- `format`: "json" -> any JSON object, a JSON Schema -> output valid against it (the same constraints as OpenAI's
  response_format).
- `images` anywhere, `think`, `suffix` and `template` are refused with a 400 naming the field.
- /api/chat messages: `tool_calls` ({"function": {"name", "arguments": object}}) and tool results (role "tool",
  `tool_name`) become OpenAI's; `tools` are OpenAI's shape already.
- /api/generate: `prompt` (with `system`) goes through the chat template as one user turn, as Ollama's templates do,
  unless `raw` is true or the model has no chat template: then it is completed as plain text. The deprecated
  `context` (conversation memory as token ids) is refused: /api/chat carries a conversation.
"""
from __future__ import annotations

import json
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from engine.serve.errors import bad_request, validation_error
from engine.serve.protocol import ChatCompletionRequest, CompletionRequest

LATEST = ":latest"
OPTION_FIELDS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "min_p": "min_p", "seed": "seed", "stop": "stop", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty", "repeat_penalty": "repetition_penalty"}
NEUTRAL = {"mirostat": (0,), "typical_p": (1, 1.0), "tfs_z": (1, 1.0)}  # unimplemented: allowed only at these values


def bare_name(name: str | None) -> str | None:
    """A model name as Ollama clients send it ('tiny:latest') -> the served name ('tiny'); others unchanged."""
    return name[: -len(LATEST)] if isinstance(name, str) and name.endswith(LATEST) else name


class _OllamaBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    options: dict[str, Any] | None = None
    format: Union[str, dict[str, Any], None] = None
    stream: bool | None = True
    keep_alive: Any = None
    think: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("model")
    @classmethod
    def _bare(cls, value):
        return bare_name(value)


class OllamaChatRequest(_OllamaBody):
    """POST /api/chat."""

    messages: list[dict[str, Any]] | None = None
    tools: list[Any] | None = None


class OllamaGenerateRequest(_OllamaBody):
    """POST /api/generate."""

    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list[Any] | None = None


def _common_fields(body: _OllamaBody, chat: bool) -> tuple[dict, dict]:
    """The OpenAI fields for options / format / stream / logprobs of a chat request (`chat`) or a completions one
    -> (fields, OpenAI field -> Ollama field)."""
    fields: dict[str, Any] = {"stream": body.stream is not False}
    names: dict[str, str] = {}
    if body.think:
        raise bad_request("think: this model does not think (no reasoning output)", "think")
    options = body.options or {}
    for key, value in options.items():
        if key in NEUTRAL and value is not None and value not in NEUTRAL[key]:
            raise bad_request(f"options.{key}: not supported by this engine (only {NEUTRAL[key][0]}), got {value!r}",
                              f"options.{key}")
        if key not in OPTION_FIELDS or value is None:
            continue
        if key == "num_predict" and isinstance(value, int) and not isinstance(value, bool) and value in (-1, -2):
            continue  # Ollama's "no limit" / "fill the context": the rest of the window
        fields[OPTION_FIELDS[key]] = value
        names[OPTION_FIELDS[key]] = f"options.{key}"
    fmt = body.format
    if fmt not in (None, "", "json") and not isinstance(fmt, dict):
        raise bad_request(f"format: 'json' or a JSON Schema (an object), got {fmt!r:.80}", "format")
    if fmt and chat:  # OpenAI's chat field ...
        fields["response_format"] = ({"type": "json_object"} if fmt == "json" else
                                     {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}})
    elif fmt:  # ... and the completions one (vLLM's)
        fields["structured_outputs"] = {"json_object": True} if fmt == "json" else {"json": fmt}
    names["response_format"] = names["structured_outputs"] = "format"
    if body.logprobs:
        fields["logprobs"] = True if chat else (body.top_logprobs or 0)
        if chat and body.top_logprobs:
            fields["top_logprobs"] = body.top_logprobs
        names.update(logprobs="logprobs", top_logprobs="top_logprobs")
    return fields, names


def _validated(model_class, fields: dict, names: dict):
    """`fields` as the OpenAI request model; a validation failure is a 400 naming the Ollama field."""
    try:
        return model_class.model_validate(fields)
    except ValidationError as e:
        error = validation_error(e.errors())
        top = (error.param or "").split(".")[0].split("[")[0]
        if top in names:
            renamed = names[top] + (error.param or "")[len(top):]
            error.message = error.message.replace(error.param, renamed, 1)
            error.param = renamed
        raise error from None


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """Ollama's tool calls ({"function": {"name", "arguments": object}}) -> OpenAI's (arguments as JSON text)."""
    if not isinstance(calls, list):
        raise bad_request(f"{where}: must be a list of tool calls", where)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{where}[{j}].function: a tool call needs function.name", f"{where}[{j}].function")
        arguments = function.get("arguments", {})
        out.append({"id": call.get("id") or f"call_{j}", "type": "function",
                    "function": {"name": function["name"],
                                 "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    return out


def chat_request(body: OllamaChatRequest) -> ChatCompletionRequest:
    """An /api/chat body as the OpenAI chat request it means (400 naming the Ollama field otherwise)."""
    fields, names = _common_fields(body, True)
    messages = []
    for i, m in enumerate(body.messages or []):
        if m.get("images"):
            raise bad_request(f"messages[{i}].images: this model reads text only (no images)",
                              f"messages[{i}].images")
        message = {k: v for k, v in m.items() if k in ("role", "content")}
        if m.get("tool_calls"):
            message["tool_calls"] = _tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        name = m.get("tool_name") or m.get("name")
        if name is not None:
            message["name"] = name
        messages.append(message)
    fields["messages"] = messages
    if body.tools:
        fields["tools"] = body.tools
    return _validated(ChatCompletionRequest, fields, {**names, "messages": "messages", "tools": "tools"})


def generate_request(body: OllamaGenerateRequest, chat: bool):
    """An /api/generate body as the OpenAI request it means: a chat request (one user turn, the system message
    before it) when `chat`, else a completions request of the prompt as text. 400 naming the Ollama field."""
    if body.images:
        raise bad_request("images: this model reads text only (no images)", "images")
    if body.suffix:
        raise bad_request("suffix: fill-in-the-middle is not supported", "suffix")
    if body.context:
        raise bad_request("context: not supported (Ollama deprecated it): send the conversation to /api/chat",
                          "context")
    if body.template:
        raise bad_request("template: Ollama's Go templates are not supported; start the server with "
                          "--chat-template (a name or a Jinja file)", "template")
    fields, names = _common_fields(body, chat)
    if chat:
        system = [{"role": "system", "content": body.system}] if body.system else []
        fields["messages"] = system + [{"role": "user", "content": body.prompt or ""}]
        return _validated(ChatCompletionRequest, fields, {**names, "messages": "prompt"})
    if body.system:
        raise bad_request("system: needs the chat template (raw is true, or the model has none)", "system")
    fields["prompt"] = body.prompt or ""
    return _validated(CompletionRequest, fields, {**names, "prompt": "prompt"})
