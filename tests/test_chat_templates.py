"""`--chat-template FILE|NAME`: the named formats render as their published descriptions say (zephyr as TinyLlama's
own template does, through transformers), a file or Jinja text works, mistakes are one line naming the flag, and the
bundled stories260K, which ships no template, chats with one (`tinyllama chat`, `generate --chat`, the Python API)."""
from __future__ import annotations

import pytest

import engine
from engine.errors import EngineError
from engine.generation.chat import ChatSession
from engine.text.chat_template import render_chat
from engine.text.chat_templates import NAMED, resolve_chat_template
from tests.test_cli import one_line_error, tinyllama

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


def test_chatml_is_chatml():
    assert render_chat(NAMED["chatml"].text, CONVERSATION, **SPECIAL) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert NAMED["chatml"].stop == ("<|im_end|>",)  # not a token of most vocabularies: a stop string


def test_llama_2_is_llama_2_chat():
    assert render_chat(NAMED["llama-2"].text, CONVERSATION, **SPECIAL) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]")


def test_zephyr_renders_as_tinyllamas_own_template(tinyllama_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(tinyllama_tokenizer_dir))
    for messages in (CONVERSATION, CONVERSATION[1:2], CONVERSATION[:3]):
        for generation_prompt in (True, False):
            assert render_chat(NAMED["zephyr"].text, messages, generation_prompt, **SPECIAL) == \
                reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_a_file_or_jinja_text_is_a_template(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] ")
    template = resolve_chat_template(str(path))
    assert template.source == str(path)
    assert render_chat(template.text, CONVERSATION[1:2]) == "[user] Hi\n[assistant] "
    assert resolve_chat_template("{{ messages[0].content }}").source == "text"


@pytest.mark.parametrize("value, message", [
    ("chatmlx", "neither a file nor a template name"),
    ("/no/such/file.jinja", "neither a file nor a template name"),
    ("{% for m in messages %}", "not a valid Jinja template"),
])
def test_a_bad_template_is_one_error_naming_the_option(value, message):
    with pytest.raises(EngineError, match=f"^--chat-template: .*{message}"):
        resolve_chat_template(value, "--chat-template")


def test_the_python_api_chats_with_a_chosen_template(stories260k):
    model = engine.load_model(str(stories260k), chat_template="chatml")
    session = ChatSession(model, max_new_tokens=8, temperature=0)
    assert "<|im_end|>" in session.generation_options().stop_strings
    result = session.reply("Hello")
    assert len(result.token_ids) >= 1 and session.messages[-1]["role"] == "assistant"
    plain = engine.load_model(str(stories260k))
    with pytest.raises(EngineError, match="no chat template"):
        ChatSession(plain)


def test_tinyllama_chat_with_stories260k_needs_and_takes_the_flag(stories260k):
    refused = tinyllama("chat", "--model", str(stories260k), stdin="Hello\n")
    assert "--chat-template" in one_line_error(refused)
    p = tinyllama("chat", "--model", str(stories260k), "--chat-template", "zephyr", "--max-new-tokens", "8",
                  stdin="Hello\nAnd then?\n")
    assert p.returncode == 0, p.stderr
    assert len([line for line in p.stdout.splitlines() if line.strip()]) >= 1 and "Traceback" not in p.stderr


def test_generate_chat_takes_the_flag(stories260k, tmp_path):
    assert "--chat-template" in one_line_error(tinyllama("generate", "--model", str(stories260k), "--chat", "Hi"))
    p = tinyllama("generate", "--model", str(stories260k), "--chat", "--chat-template", "llama-2",
                  "--max-new-tokens", "5", "--json", "Hi")
    assert p.returncode == 0, p.stderr
    assert "needs --chat" in one_line_error(tinyllama("generate", "--model", str(stories260k), "--chat-template",
                                                      "zephyr", "Hi"))


def test_serve_refuses_a_bad_template_before_listening(stories260k):
    error = one_line_error(tinyllama("serve", "--model", str(stories260k), "--port", "0", "--chat-template", "nope"))
    assert error.startswith("tinyllama: error: --chat-template:")


def test_a_gguf_model_takes_the_template_too(stories260k, tmp_path):
    """A GGUF file's tokenizer comes from its own metadata (no tokenizer_config.json): the chosen template still
    applies, and the GGUF model chats with it as the folder's model does."""
    from tests.gguf_support import write_gguf

    path = write_gguf(stories260k, tmp_path / "stories.gguf", "F32")
    model = engine.load_model(str(path), chat_template="zephyr")
    folder = engine.load_model(str(stories260k), chat_template="zephyr")
    assert model.tokenizer.chat_template == NAMED["zephyr"].text
    hello = [{"role": "user", "content": "Hello"}]
    assert model.tokenizer.encode_chat(hello) == folder.tokenizer.encode_chat(hello)
