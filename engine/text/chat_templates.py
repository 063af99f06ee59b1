"""Chat templates a user can name or give as a file (`--chat-template FILE|NAME`): for a model that ships none (the
bundled stories260K) or to override the one it ships.

Three formats by name, each written from its published description:

- `chatml`: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then `<|im_start|>assistant\\n` (OpenAI's ChatML,
  Qwen, Hermes). Its end-of-turn marker is text, not a special token of most vocabularies, so it is also a stop string.
- `zephyr`: `<|{role}|>\\n{content}{eos}\\n`, then `<|assistant|>\\n` (Zephyr; TinyLlama-Chat's own format).
- `llama-2`: `{bos}[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} {eos}` (Llama-2-Chat).

A FILE is a Jinja template in transformers' dialect (the same variables: messages, add_generation_prompt, bos_token,
eos_token, tools); Python callers may also pass the template text itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.errors import EngineError
from engine.text.chat_template import ChatTemplateError, compile_template

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ZEPHYR = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ raise_exception('zephyr: unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

LLAMA_2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('llama-2: roles must be system (first), then user and assistant') }}"
    "{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template to render conversations with: its Jinja text, where it came from (a name, a file, or
    'text'), and the stop strings that end an assistant turn when its end marker is not a special token."""

    text: str
    source: str
    stop: tuple[str, ...] = ()


NAMED = {
    "chatml": ChatTemplate(CHATML, "chatml", ("<|im_end|>",)),
    "zephyr": ChatTemplate(ZEPHYR, "zephyr"),
    "llama-2": ChatTemplate(LLAMA_2, "llama-2"),
}


def resolve_chat_template(value, option: str = "chat_template") -> ChatTemplate:
    """A template name (chatml, zephyr, llama-2), a Jinja file's path, Jinja text (it holds '{{' or '{%'), or a
    ChatTemplate -> ChatTemplate; EngineError naming `option` (e.g. '--chat-template') when it is none of these."""
    if isinstance(value, ChatTemplate):
        return value
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise EngineError(f"{option}: give a template name ({', '.join(NAMED)}) or a Jinja file, got {value!r}")
    text = str(value)
    if text in NAMED:
        return NAMED[text]
    if isinstance(value, str) and ("{{" in text or "{%" in text):
        return _checked(ChatTemplate(text, "text"), option)
    path = Path(text).expanduser()
    if path.is_file():
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EngineError(f"{option}: cannot read {text}: {getattr(e, 'strerror', None) or e}") from None
        if not content.strip():
            raise EngineError(f"{option}: {text} is empty")
        return _checked(ChatTemplate(content, str(path)), option)
    raise EngineError(f"{option}: {text!r} is neither a file nor a template name (choose from {', '.join(NAMED)}, "
                      "or give a Jinja file)")


def _checked(template: ChatTemplate, option: str) -> ChatTemplate:
    """The template, once Jinja has compiled it; EngineError naming `option` and the syntax error otherwise."""
    try:
        compile_template(template.text)
    except ChatTemplateError as e:
        raise EngineError(f"{option}: {template.source if template.source != 'text' else 'the template'}: {e}") from None
    return template
