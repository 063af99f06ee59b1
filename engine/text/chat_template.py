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
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "NoChatTemplateError", "ROLES", "validate_messages", "render_chat"]

ROLES = ("system", "user", "assistant")


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


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """messages: non-empty list of {"role": system|user|assistant, "content": str} -> plain-dict copies."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ChatTemplateError("messages is empty: a chat needs at least one message")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatTemplateError(f"messages[{index}]['role'] must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ChatTemplateError(
                f"messages[{index}]['content'] must be a str, got {type(content).__name__}"
            )
        checked.append({str(key): value for key, value in message.items()})
    return checked


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    **special_tokens: str,
) -> str:
    """Render `messages` with the Jinja `template`; special_tokens (bos_token=..., eos_token=...) become variables.

    Returns the prompt text (str). Raises NoChatTemplateError when template is None/empty,
    ChatTemplateError for invalid messages or when the template itself raises.
    """
    if not template:
        raise NoChatTemplateError("this model has no chat template; use plain text completion instead")
    checked = validate_messages(messages)
    try:
        compiled = _compile(template)
        return compiled.render(
            messages=checked,
            tools=None,
            documents=None,
            add_generation_prompt=bool(add_generation_prompt),
            **special_tokens,
        )
    except jinja2.exceptions.TemplateError as error:
        raise ChatTemplateError(f"chat template failed: {error}") from error
