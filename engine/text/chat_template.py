"""Render a model's own Jinja chat template, the way transformers' `apply_chat_template` does.

The environment mirrors `transformers.utils.chat_template_utils._cached_compile_jinja_template`:
an `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols`
extension, a `tojson` filter that does not HTML-escape, and the `raise_exception` / `strftime_now`
globals. Templates come from model folders, so they are treated as untrusted code (sandboxed).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "NoChatTemplateError", "ROLES", "TOOL_ROLES", "validate_messages", "render_chat",
           "compile_template", "template_takes_tools"]

ROLES = ("system", "user", "assistant")
TOOL_ROLES = ROLES + ("tool",)  # what a template that takes `tools` also renders: tool results


class ChatTemplateError(ValueError):
    """Bad messages, or a template that failed (including its own `raise_exception`)."""


class NoChatTemplateError(ChatTemplateError):
    """The model ships no chat template; use plain completion instead."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def compile_template(template: str) -> jinja2.Template:
    """Compile a Jinja chat template (cached); ChatTemplateError with Jinja's reason for a syntax error."""
    try:
        return _compile(template)
    except jinja2.exceptions.TemplateError as error:
        raise ChatTemplateError(f"not a valid Jinja template: {error}") from error


@lru_cache(maxsize=16)
def template_takes_tools(template: str | None) -> bool:
    """Whether the template reads the `tools` variable (as transformers' apply_chat_template(tools=...) passes it):
    then tool definitions, assistant tool calls and tool results are the template's to render."""
    if not template:
        return False
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(_environment().parse(template))
    except jinja2.exceptions.TemplateError:
        return False


def validate_messages(messages: Sequence[Mapping[str, Any]], roles: Sequence[str] = ROLES) -> list[dict[str, Any]]:
    """messages: non-empty list of {"role": one of `roles`, "content": str} -> plain-dict copies. An assistant message
    with `tool_calls` may have no content (None)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ChatTemplateError("messages is empty: a chat needs at least one message")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in roles:
            raise ChatTemplateError(f"messages[{index}]['role'] must be one of {tuple(roles)}, got {role!r}")
        if content is None and role == "assistant" and message.get("tool_calls"):
            pass
        elif not isinstance(content, str):
            raise ChatTemplateError(
                f"messages[{index}]['content'] must be a str, got {type(content).__name__}"
            )
        checked.append({str(key): value for key, value in message.items()})
    return checked


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **special_tokens: str,
) -> str:
    """Render `messages` with the Jinja `template`; special_tokens (bos_token=..., eos_token=...) become variables.

    tools: OpenAI-style tool definitions ({"type": "function", "function": {...}}) for a template that takes them
    (see template_takes_tools); with them, "tool" messages and assistant `tool_calls` are the template's to render.
    Returns the prompt text (str). Raises NoChatTemplateError when template is None/empty,
    ChatTemplateError for invalid messages or when the template itself raises.
    """
    if not template:
        raise NoChatTemplateError("this model has no chat template; use plain text completion instead")
    takes_tools = template_takes_tools(template)
    checked = validate_messages(messages, TOOL_ROLES if takes_tools else ROLES)
    try:
        compiled = _compile(template)
        return compiled.render(
            messages=checked,
            tools=list(tools) if tools else None,
            documents=None,
            add_generation_prompt=bool(add_generation_prompt),
            **special_tokens,
        )
    except jinja2.exceptions.TemplateError as error:
        raise ChatTemplateError(f"chat template failed: {error}") from error
