"""An OpenAI request -> what the engine runs: the prompt's token ids and GenerationOptions, or a 400 naming the field.

Defaults where a field is absent: max_tokens fills the rest of the context window (generation ends at EOS, a stop
string or a full window); sampling follows the model's generation_config.json when it says do_sample, otherwise
OpenAI's defaults (temperature 1, top_p 1). The presence / frequency penalties count generated tokens only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import ContextOverflowError, EngineError
from engine.generation.state import GenerationOptions, check_prompt, default_options
from engine.serve.errors import bad_request
from engine.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from engine.serve.structured import ConstraintRequest, PendingConstraint, constraint_request, pending_constraint
from engine.generation.constraints import ConstraintError
from engine.text.chat_template import ROLES, ChatTemplateError, NoChatTemplateError

TEXT_PARTS = ("text", "input_text")
MAX_CHOICES = 128  # OpenAI's own limit on n


@dataclass
class Job:
    """A validated request: prompt ids, options, and how to answer (stream, usage chunk, log-probabilities)."""

    prompt_ids: list[int]
    options: GenerationOptions
    stream: bool
    include_usage: bool
    continuous_usage: bool  # usage so far in every chunk (vLLM's stream_options.continuous_usage_stats)
    logprobs: int | None  # top alternatives per token (0: the chosen token only); None: no log-probabilities
    n: int = 1  # choices: continuations of the prompt sharing one prefill, choice i seeded with seed + i
    constraint: PendingConstraint | None = None  # still to compile (engine.serve.structured.attach_constraint)


def refuse_unsupported(body: SamplingFields) -> None:
    """400 for a known field set to something this server cannot do (n > 1, tools, JSON mode, ...)."""
    if body.n is not None and body.n > MAX_CHOICES:
        raise bad_request(f"n: at most {MAX_CHOICES} choices per request, got {body.n}", "n")
    if body.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options: only allowed with stream=true", "stream_options")
    if isinstance(body, ChatCompletionRequest):
        if body.tools:
            raise bad_request("tools: tool calling is not supported", "tools")
        if body.functions:
            raise bad_request("functions: function calling is not supported", "functions")
        for name in ("tool_choice", "function_call"):
            value = getattr(body, name)
            if value not in (None, "none", "auto"):
                raise bad_request(f"{name}: tool calling is not supported", name)
        if body.audio is not None:
            raise bad_request("audio: audio output is not supported", "audio")
        if body.modalities and list(body.modalities) != ["text"]:
            raise bad_request(f"modalities: only ['text'] is supported, got {body.modalities}", "modalities")
        if body.web_search_options is not None:
            raise bad_request("web_search_options: web search is not supported", "web_search_options")
        if body.top_logprobs and not body.logprobs:
            raise bad_request("top_logprobs: needs logprobs=true", "top_logprobs")
    else:
        if body.echo:
            raise bad_request("echo: echoing the prompt is not supported", "echo")
        if body.suffix:
            raise bad_request("suffix: insertion (a suffix) is not supported", "suffix")
        if body.best_of is not None and body.best_of != 1:
            raise bad_request(f"best_of: only best_of=1 is supported, got {body.best_of}", "best_of")


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """The request's messages as the chat template takes them: {role, content} with text content."""
    if not body.messages:
        raise bad_request("messages: give at least one message", "messages")
    messages = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if role in ("tool", "function"):
            raise bad_request(f"messages[{i}].role: {role!r} messages are not supported (no tool calling)",
                              f"messages[{i}].role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {m.role!r}",
                              f"messages[{i}].role")
        if m.tool_calls:
            raise bad_request(f"messages[{i}].tool_calls: tool calling is not supported", f"messages[{i}].tool_calls")
        if m.content is None:
            if role != "assistant":
                raise bad_request(f"messages[{i}].content: required for a {role} message", f"messages[{i}].content")
            content = ""
        elif isinstance(m.content, str):
            content = m.content
        else:
            for j, part in enumerate(m.content):
                if part.type not in TEXT_PARTS:
                    raise bad_request(f"messages[{i}].content[{j}]: only text content is supported, got type "
                                      f"{part.type!r}", f"messages[{i}].content[{j}].type")
                if part.text is None:
                    raise bad_request(f"messages[{i}].content[{j}].text: a {part.type!r} part needs its 'text' field",
                                      f"messages[{i}].content[{j}].text")
            content = "\n".join(part.text for part in m.content)
        messages.append({"role": role, "content": content})
    return messages


def chat_prompt_ids(model, body: ChatCompletionRequest, max_tokens: int | None = None) -> list[int]:
    """The messages rendered with the model's own chat template and tokenized (as `generate --chat` does); a
    rendering too long for the window is refused before it is tokenized (see refuse_long_text)."""
    messages = chat_messages(body)
    tokenizer = model.tokenizer
    try:
        prompt = tokenizer.apply_chat_template(messages)
    except NoChatTemplateError:
        raise bad_request("this model has no chat template: use /v1/completions", "messages") from None
    except ChatTemplateError as e:
        raise bad_request(f"messages: {e}", "messages") from None
    refuse_long_text(model, prompt, max_tokens, "messages")
    return tokenizer.encode_rendered_chat(prompt, threaded=True)


def completion_prompt_ids(model, body: CompletionRequest) -> list[int]:
    """The prompt's token ids: text is tokenized (BOS added, as Model.complete does), ids are taken as given; a
    text too long for the window is refused before it is tokenized (see refuse_long_text)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(f"prompt: one prompt per request, got {len(prompt)}", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        refuse_long_text(model, prompt, body.max_tokens, "prompt")
        return model.tokenizer.encode(prompt, threaded=True)
    if not prompt:
        raise bad_request("prompt: the list of token ids is empty", "prompt")
    return list(prompt)


def refuse_long_text(model, text: str, max_tokens: int | None, param: str) -> None:
    """400 context_length_exceeded, without tokenizing, for a text that cannot fit the window: no token stands for
    more than the tokenizer's longest piece (max_chars_per_token characters; a byte-fallback token for less than
    one), so `text` has at least ceil(len(text) / that) tokens. Nothing is refused when the tokenizer gives no
    sound bound; then the exact count decides, after tokenizing."""
    per_token = model.tokenizer.max_chars_per_token()
    if per_token:
        check_fits(model.config.max_position_embeddings, math.ceil(len(text) / per_token), max_tokens, param,
                   at_least=True)


def check_fits(window: int, prompt_len: int, max_tokens: int | None, param: str, at_least: bool = False) -> None:
    """400 context_length_exceeded unless a prompt of prompt_len tokens plus max_tokens (or, when None, at least
    one generated token) fits the window; the message gives both numbers (`at_least`: prompt_len is a lower bound)."""
    some = "at least " if at_least else ""
    if prompt_len >= window:
        raise bad_request(f"this model's context window is {window} tokens, and the {param} alone has {some}"
                          f"{prompt_len} (at most {window - 1} leave room to generate): shorten the {param}",
                          param, code="context_length_exceeded")
    if max_tokens is not None and prompt_len + max_tokens > window:
        raise bad_request(
            f"this model's context window is {window} tokens, but the request asks for {some}{prompt_len + max_tokens} "
            f"({some}{prompt_len} in the {param}, {max_tokens} to generate): shorten the {param} or lower max_tokens",
            param, code="context_length_exceeded")


def generation_options(model, body: SamplingFields, max_tokens: int | None, prompt_len: int, param: str,
                       logprobs: int | None, constraint: ConstraintRequest | None = None) -> GenerationOptions:
    """Validated GenerationOptions; 400 context_length_exceeded when prompt + max_tokens does not fit the window."""
    window = model.config.max_position_embeddings
    check_fits(window, prompt_len, max_tokens, param)
    if max_tokens is None:
        max_tokens = window - prompt_len
    temperature = body.temperature
    if temperature is None and not (model.generation_config or {}).get("do_sample"):
        temperature = 1.0  # OpenAI's default
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if "" in stop:
        raise bad_request("stop: a stop string cannot be empty", "stop")
    sampling = dict(temperature=temperature, top_p=body.top_p, min_p=body.min_p,
                    top_k=None if body.top_k is None else max(body.top_k, 0),
                    repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                    frequency_penalty=body.frequency_penalty,
                    seed=None if body.seed is None else body.seed % 2 ** 64)  # OpenAI's seeds may be negative
    try:
        return default_options(model, max_new_tokens=max_tokens, stop=stop, ignore_eos=bool(body.ignore_eos),
                               logprobs=logprobs, **sampling, **(constraint.kwargs if constraint else {}))
    except ConstraintError as e:  # name the HTTP field the constraint came from, with llguidance's reason
        name = constraint.param_for(e.field)
        message = str(e)[len(e.field) + 2:] if str(e).startswith(e.field + ": ") else str(e)
        raise bad_request(f"{name}: {message}", name) from None
    except EngineError as e:
        name = next((k for k in sampling if str(e).startswith(k)), None)
        raise bad_request(str(e), name) from None


def chat_job(model, body: ChatCompletionRequest) -> Job:
    """Validate a chat request -> Job (400 APIError naming the field otherwise)."""
    refuse_unsupported(body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    ids = chat_prompt_ids(model, body, max_tokens)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return _job(model, body, ids, max_tokens, "messages", logprobs)


def completion_job(model, body: CompletionRequest) -> Job:
    """Validate a completions request -> Job (400 APIError naming the field otherwise)."""
    refuse_unsupported(body)
    ids = completion_prompt_ids(model, body)
    return _job(model, body, ids, body.max_tokens, "prompt", body.logprobs)


def _job(model, body: SamplingFields, ids: list[int], max_tokens: int | None, param: str,
         logprobs: int | None) -> Job:
    try:
        check_prompt(model, ids)  # token ids inside the vocabulary
    except ContextOverflowError:
        pass  # reported below, with max_tokens, as context_length_exceeded
    except EngineError as e:
        raise bad_request(f"{param}: {e}", param) from None
    constraint = constraint_request(body)
    options = generation_options(model, body, max_tokens, len(ids), param, logprobs)
    pending = pending_constraint(model, options, constraint)  # checked here; compiled by the app, off this thread
    stream_options = body.stream_options if body.stream else None
    return Job(ids, options, bool(body.stream), bool(stream_options and stream_options.include_usage),
               bool(stream_options and stream_options.continuous_usage_stats), logprobs, body.n or 1, pending)
