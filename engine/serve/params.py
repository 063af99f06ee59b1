"""An OpenAI request -> what the engine runs: the prompt's token ids and GenerationOptions, or a 400 naming the field.

Defaults where a field is absent: max_tokens fills the rest of the context window (generation ends at EOS, a stop
string or a full window); sampling follows the model's generation_config.json when it says do_sample, otherwise
OpenAI's defaults (temperature 1, top_p 1). The presence / frequency penalties count generated tokens only.

/v1/completions may carry several prompts (texts or token-id lists): one Job with a prompt and options per prompt,
answered as one choice per prompt (times n). `echo` puts each prompt before its choices' text, with its tokens'
log-probabilities when `logprobs` is set (the first token's null); vLLM's `prompt_logprobs` asks for them in its own
field; with either, `max_tokens: 0` scores the prompt and generates nothing.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from engine.errors import ContextOverflowError, EngineError
from engine.generation.state import GenerationOptions, check_prompt, default_options
from engine.serve.errors import bad_request
from engine.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from engine.serve.structured import ConstraintRequest, PendingConstraint, constraint_request, pending_constraint
from engine.generation.constraints import ConstraintError
from engine.serve.tools import ToolCalling, history_tool_calls, legacy_function_call, tool_calling
from engine.text.chat_template import ROLES, ChatTemplateError, NoChatTemplateError
from engine.text.tool_calls import prompt_messages

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
    cache_salt: object = None  # the prefix cache partition: the request's cache_salt, then the app's (key, salt)
    constraint: PendingConstraint | None = None  # still to compile (engine.serve.structured.attach_constraint)
    # several prompts (a completions request's list): each prompt's ids and options (see options_for)
    prompts: list[list[int]] = field(default_factory=list)  # [] means [prompt_ids]
    prompt_options: list[GenerationOptions] = field(default_factory=list)  # [] means [options]
    echo_texts: list[str] | None = None  # echo: each prompt's text, put before its choices' text
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: its field in each choice, this many alternatives
    tool_calling: ToolCalling | None = None  # a chat request whose reply may be tool calls

    def __post_init__(self):
        if not self.prompts:
            self.prompts = [self.prompt_ids]

    def options_for(self, prompt: int) -> GenerationOptions:
        """Prompt number `prompt`'s options, with the constraint compiled into `options` (one compiled constraint
        serves every prompt: each sequence starts its own matcher from it)."""
        own = self.prompt_options[prompt] if self.prompt_options else self.options
        if own.constraint is self.options.constraint:
            return own
        return dataclasses.replace(own, constraint=self.options.constraint)

    @property
    def echo_logprobs(self) -> bool:
        """Whether the echoed prompt's tokens carry log-probabilities (echo with logprobs)."""
        return self.echo_texts is not None and self.logprobs is not None


def refuse_unsupported(body: SamplingFields) -> None:
    """400 for a known field set to something this server cannot do (n > 1, tools, JSON mode, ...)."""
    if body.n is not None and body.n > MAX_CHOICES:
        raise bad_request(f"n: at most {MAX_CHOICES} choices per request, got {body.n}", "n")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options: only allowed with stream=true", "stream_options")
    if isinstance(body, ChatCompletionRequest):
        if body.audio is not None:
            raise bad_request("audio: audio output is not supported", "audio")
        if body.modalities and list(body.modalities) != ["text"]:
            raise bad_request(f"modalities: only ['text'] is supported, got {body.modalities}", "modalities")
        if body.web_search_options is not None:
            raise bad_request("web_search_options: web search is not supported", "web_search_options")
        if body.top_logprobs and not body.logprobs:
            raise bad_request("top_logprobs: needs logprobs=true", "top_logprobs")
    else:
        scoring = body.echo or body.prompt_logprobs is not None
        if body.max_tokens == 0 and not scoring:
            raise bad_request("max_tokens: 0 generates nothing; it scores the prompt with echo or prompt_logprobs",
                              "max_tokens")
        if body.suffix:
            raise bad_request("suffix: insertion (a suffix) is not supported", "suffix")
        if body.best_of is not None and body.best_of != 1:
            raise bad_request(f"best_of: only best_of=1 is supported, got {body.best_of}", "best_of")


def chat_messages(body: ChatCompletionRequest) -> list[dict]:
    """The request's messages as the chat template takes them (transformers' convention): {role, content} with
    text content; an assistant's `tool_calls` (or legacy `function_call`) with their arguments as objects; `tool`
    (and legacy `function`) results with the name of the call they answer."""
    if not body.messages:
        raise bad_request("messages: give at least one message", "messages")
    messages, call_names = [], {}
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ROLES + ("tool", "function"):
            raise bad_request(f"messages[{i}].role: must be one of {', '.join(ROLES + ('tool',))}, got {m.role!r}",
                              f"messages[{i}].role")
        calls = None
        if m.tool_calls is not None or m.function_call is not None:
            if role != "assistant":
                field = "tool_calls" if m.tool_calls is not None else "function_call"
                raise bad_request(f"messages[{i}].{field}: only an assistant message makes calls",
                                  f"messages[{i}].{field}")
            calls = (history_tool_calls(m.tool_calls, f"messages[{i}].tool_calls") if m.tool_calls is not None
                     else legacy_function_call(m.function_call, f"messages[{i}].function_call"))
            call_names.update({c["id"]: c["function"]["name"] for c in calls})
        if m.content is None:
            if role != "assistant":
                raise bad_request(f"messages[{i}].content: required for a {role} message", f"messages[{i}].content")
            content = None if calls else ""
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
        message = {"role": "tool" if role == "function" else role, "content": content}
        if calls:
            message["tool_calls"] = calls
        if role in ("tool", "function"):
            name = m.name if role == "function" else call_names.get(m.tool_call_id, m.name)
            message.update({k: v for k, v in (("tool_call_id", m.tool_call_id), ("name", name)) if v is not None})
        messages.append(message)
    return messages


def chat_prompt_ids(model, body: ChatCompletionRequest, max_tokens: int | None = None,
                    calling: ToolCalling | None = None) -> list[int]:
    """The messages rendered with the model's chat template (the tools shown as engine.text.tool_calls writes them)
    and tokenized (as `generate --chat` does); a rendering too long for the window is refused before it is
    tokenized (see refuse_long_text)."""
    tokenizer = model.tokenizer
    messages, tools = prompt_messages(tokenizer.chat_template, chat_messages(body),
                                      calling.shown_tools if calling else None)
    try:
        prompt = tokenizer.apply_chat_template(messages, tools=tools)
    except NoChatTemplateError:
        raise bad_request("this model has no chat template: use /v1/completions, or start the server with "
                          "--chat-template (chatml, zephyr, llama-2 or a Jinja file)", "messages") from None
    except ChatTemplateError as e:
        raise bad_request(f"messages: {e}", "messages") from None
    refuse_long_text(model, prompt, max_tokens, "messages")
    return tokenizer.encode_rendered_chat(prompt, threaded=True)


def completion_prompts(model, body: CompletionRequest) -> list[tuple[list[int], str | None]]:
    """Each prompt's token ids, and its text when it came as text: text is tokenized (BOS added, as Model.complete
    does), ids are taken as given; a text too long for the window is refused before it is tokenized (see
    refuse_long_text)."""
    prompt = body.prompt
    several = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
    out = []
    for i, item in enumerate(prompt if several else [prompt]):
        param = f"prompt[{i}]" if several else "prompt"
        if isinstance(item, str):
            refuse_long_text(model, item, body.max_tokens, "prompt")
            out.append((model.tokenizer.encode(item, threaded=True), item))
        elif not item:
            raise bad_request(f"{param}: the list of token ids is empty", "prompt")
        else:
            out.append((list(item), None))
    return out


TOKEN_ID = re.compile(r"[0-9]{1,10}")


def logit_bias(model, body: SamplingFields) -> tuple[tuple[int, float], ...] | None:
    """OpenAI's logit_bias ({"token id": bias}) -> (id, bias) pairs; 400 for a key that is not a token id of this
    vocabulary or a bias outside [-100, 100]."""
    if not body.logit_bias:
        return None
    vocab = model.config.vocab_size
    out = []
    for key, value in body.logit_bias.items():
        if not TOKEN_ID.fullmatch(key) or int(key) >= vocab:
            raise bad_request(f"logit_bias: keys are token ids in 0..{vocab - 1} (as strings), got {key!r}",
                              "logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias: a bias must be in [-100, 100], got {value} for token {key}", "logit_bias")
        out.append((int(key), float(value)))
    return tuple(out)


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
    one generated token; max_tokens 0, scoring: none) fits the window; the message gives both numbers (`at_least`:
    prompt_len is a lower bound)."""
    some = "at least " if at_least else ""
    if max_tokens == 0 and prompt_len > window:
        raise bad_request(f"this model's context window is {window} tokens, and the {param} has {some}{prompt_len}: "
                          f"shorten the {param}", param, code="context_length_exceeded")
    if max_tokens != 0 and prompt_len >= window:
        raise bad_request(f"this model's context window is {window} tokens, and the {param} alone has {some}"
                          f"{prompt_len} (at most {window - 1} leave room to generate): shorten the {param}",
                          param, code="context_length_exceeded")
    if max_tokens is not None and prompt_len + max_tokens > window:
        raise bad_request(
            f"this model's context window is {window} tokens, but the request asks for {some}{prompt_len + max_tokens} "
            f"({some}{prompt_len} in the {param}, {max_tokens} to generate): shorten the {param} or lower max_tokens",
            param, code="context_length_exceeded")


def generation_options(model, body: SamplingFields, max_tokens: int | None, prompt_len: int, param: str,
                       logprobs: int | None, constraint: ConstraintRequest | None = None,
                       prompt_logprobs: int | None = None, chat_stop: tuple = ()) -> GenerationOptions:
    """Validated GenerationOptions; 400 context_length_exceeded when prompt + max_tokens does not fit the window.
    `chat_stop`: the chat template's end-of-turn stop strings, added to the request's."""
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
    stop += [text for text in chat_stop if text not in stop]
    sampling = dict(temperature=temperature, top_p=body.top_p, min_p=body.min_p,
                    top_k=None if body.top_k is None else max(body.top_k, 0),
                    repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                    frequency_penalty=body.frequency_penalty, logit_bias=logit_bias(model, body),
                    seed=None if body.seed is None else body.seed % 2 ** 64)  # OpenAI's seeds may be negative
    try:
        return default_options(model, max_new_tokens=max_tokens, stop=stop, ignore_eos=bool(body.ignore_eos),
                               logprobs=logprobs, prompt_logprobs=prompt_logprobs, **sampling,
                               **(constraint.kwargs if constraint else {}))
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
    calling = tool_calling(body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    ids = chat_prompt_ids(model, body, max_tokens, calling)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    job = _job(model, body, ids, max_tokens, "messages", logprobs, tool_constraint=calling.constraint(),
               chat_stop=model.tokenizer.chat_stop)
    job.tool_calling = calling if calling.active else None
    return job


def completion_job(model, body: CompletionRequest) -> Job:
    """Validate a completions request -> Job (400 APIError naming the field otherwise): one prompt and options per
    prompt of the list; echo's texts (a text prompt as sent, ids decoded without special tokens)."""
    refuse_unsupported(body)
    prompts = completion_prompts(model, body)
    echo_logprobs = body.logprobs if body.echo else None
    wanted = [k for k in (echo_logprobs, body.prompt_logprobs) if k is not None]
    prompt_top = max(wanted) if wanted else (0 if body.echo and body.max_tokens == 0 else None)
    jobs = [_job(model, body, ids, body.max_tokens, "prompt", body.logprobs, prompt_top) for ids, _ in prompts]
    job = jobs[0]
    job.prompts, job.prompt_options = [j.prompt_ids for j in jobs], [j.options for j in jobs]
    job.prompt_logprobs = body.prompt_logprobs
    if body.echo:
        job.echo_texts = [text if text is not None else model.tokenizer.decode(ids, skip_special_tokens=True)
                          for ids, text in prompts]
    return job


def _job(model, body: SamplingFields, ids: list[int], max_tokens: int | None, param: str,
         logprobs: int | None, prompt_logprobs: int | None = None, tool_constraint: ConstraintRequest | None = None,
         chat_stop: tuple = ()) -> Job:
    try:
        check_prompt(model, ids, max_new_tokens=1 if max_tokens is None else max_tokens)  # ids inside the vocabulary
    except ContextOverflowError:
        pass  # reported below, with max_tokens, as context_length_exceeded
    except EngineError as e:
        raise bad_request(f"{param}: {e}", param) from None
    constraint = constraint_request(body)
    if tool_constraint is not None:
        if constraint.kwargs:
            other = next(iter(constraint.params.values()))
            raise bad_request(f"{other}: cannot be combined with tool calling (tool_choice 'none' allows it)", other)
        constraint = tool_constraint
    options = generation_options(model, body, max_tokens, len(ids), param, logprobs, prompt_logprobs=prompt_logprobs,
                                 chat_stop=chat_stop)
    pending = pending_constraint(model, options, constraint)  # checked here; compiled by the app, off this thread
    stream_options = body.stream_options if body.stream else None
    include_usage = bool(stream_options and stream_options.include_usage)
    # vLLM's continuous_usage_stats: usage in every chunk, but only when include_usage asks for usage at all
    continuous = include_usage and bool(stream_options.continuous_usage_stats)
    return Job(ids, options, bool(body.stream), include_usage, continuous, logprobs, body.n or 1,
               constraint=pending, cache_salt=body.cache_salt)
