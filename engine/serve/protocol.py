"""The request bodies of /v1/chat/completions and /v1/completions as pydantic models (OpenAI's field names).

Unknown fields are ignored, as OpenAI-compatible servers do. Types and ranges are checked here, strictly as OpenAI
does (an integer field takes no 5.0, "10" or true, a boolean no 1 or "yes", a number no string, NaN or infinity; a
failure is a 400 naming the field); fields we know but cannot honour are refused in engine.serve.params, also naming
the field. `parse_body` reads the raw bytes: JSON that is an object, not nested past a limit, without lone surrogates.
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from engine.serve.errors import bad_request

MAX_NESTING = 64  # JSON containers inside each other; OpenAI's own bodies need about 6
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_body(raw: bytes) -> dict:
    """A request body -> its JSON object; 400 (naming the field where there is one) for anything that is not a JSON
    object of valid Unicode text: bad syntax or UTF-8, NaN / Infinity, nesting deeper than MAX_NESTING, a string
    holding a lone surrogate (JSON's "\\ud800" escape, which no UTF-8 text can carry)."""
    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(raw, parse_constant=no_constant)
    except RecursionError:
        raise bad_request(f"the request body is nested too deeply (more than {MAX_NESTING} levels)") from None
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    _check_values(data)
    return data


def parse_json_field(text: str, param: str):
    """A field that carries JSON as text (a schema sent as a string) -> its value, held to the body's own rules: 400
    naming the field for text that is not JSON, nests past MAX_NESTING or holds a lone surrogate."""
    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except RecursionError:
        raise bad_request(f"{param}: nested too deeply (more than {MAX_NESTING} levels)", param) from None
    except ValueError as e:
        raise bad_request(f"{param}: not valid JSON: {e}", param) from None
    if _nesting_past_limit(value):
        raise bad_request(f"{param}: nested too deeply (more than {MAX_NESTING} levels)", param)
    _check_values(value, param)
    return value


def _nesting_past_limit(value) -> bool:
    """Whether JSON data nests containers deeper than MAX_NESTING (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_NESTING:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def _check_values(data, root: str = "") -> None:
    """400 for nesting past MAX_NESTING or a lone surrogate in any key or string (walked without recursion); `root`:
    the field `data` came from ('' for the body)."""
    stack: list[tuple[str, Any, int]] = [(root, data, 1)]
    while stack:
        path, value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and LONE_SURROGATE.search(value):  # isascii: a flag, O(1); the search is O(n)
                where = path or "the request body"
                raise bad_request(f"{where}: the text holds a lone surrogate (e.g. \\ud800 without its pair), which is "
                                  f"not valid Unicode", path or None)
            continue
        if isinstance(value, (dict, list)) and depth > MAX_NESTING:
            raise bad_request(f"{path}: nested too deeply (more than {MAX_NESTING} levels)", path or None)
        if isinstance(value, dict):
            for key, item in value.items():
                if LONE_SURROGATE.search(key):
                    raise bad_request(f"{path or 'the request body'}: a key holds a lone surrogate, which is not valid "
                                      f"Unicode", path or None)
                stack.append((f"{path}.{key}" if path else key, item, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value)
                         if isinstance(item, (str, dict, list)))  # a long list of token ids costs one pass


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage so far in every chunk


class ResponseFormat(_Body):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, populate_by_name=True)

    type: str = "text"
    json_schema: dict[str, Any] | None = None  # {"name", "schema", "strict"} with type "json_schema"
    schema_: Any = Field(None, alias="schema")  # llama.cpp's form: the schema beside the type


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: Any = None
    tool_call_id: str | None = None
    function_call: Any = None  # the legacy form of one assistant tool call


class SamplingFields(_Body):
    """What both endpoints share: the model, length, sampling, stop strings, streaming; OpenAI's ranges."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-2 ** 63, le=2 ** 63 - 1)  # OpenAI's int64
    stop: Union[str, list[str], None] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int | None = Field(1, ge=1)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM's names): sampling filters transformers has, and generation past EOS
    top_k: int | None = Field(None, ge=-1)  # 0 or -1: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = False
    # structured output (engine.serve.structured): vLLM's fields, and how much whitespace JSON may have
    structured_outputs: dict[str, Any] | None = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    json_whitespace: Literal["compact", "flexible"] | None = None
    response_format: ResponseFormat | None = None  # OpenAI's; on /v1/completions too, as vLLM
    # other servers' constraint fields: mapped onto ours where they mean the same, else refused (a 400 naming them)
    grammar: Any = None  # llama.cpp: GBNF text; TGI: {"type": "json" | "regex", "value"}
    json_schema: Any = None  # llama.cpp
    regex: Any = None  # SGLang
    ebnf: Any = None  # SGLang
    grammar_lazy: Any = None  # llama.cpp (lazy grammars, triggered by tokens)
    grammar_triggers: Any = None  # llama.cpp
    guided_decoding_backend: Any = None  # vLLM: the grammar engine to use (one engine here: ignored)
    # vLLM's prefix cache partition: only requests with the same salt (and API key) share cached prompt blocks
    cache_salt: str | None = Field(None, min_length=1)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions: `prompt` is text, token ids, or a list of texts or of id lists (one choice each)."""

    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = Field(None, ge=0)  # 0: with echo or prompt_logprobs, score the prompt only
    logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's: the prompt's tokens' log-probabilities
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
