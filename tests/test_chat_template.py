"""engine.text.chat_template against transformers' `apply_chat_template(..., tokenize=False)`."""

import json
import shutil

import pytest

from engine.text.chat_template import ChatTemplateError, NoChatTemplateError, render_chat
from engine.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tinyllama(tinyllama_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_folder(tinyllama_tokenizer_dir)


@pytest.fixture(scope="module")
def transformers_module():
    return pytest.importorskip("transformers", reason="transformers is the reference for chat rendering")


@pytest.fixture(scope="module")
def hf_tinyllama(transformers_module, tinyllama_tokenizer_dir):
    return transformers_module.AutoTokenizer.from_pretrained(str(tinyllama_tokenizer_dir))


@pytest.fixture(scope="module")
def hf_stories(transformers_module, stories260k):
    return transformers_module.AutoTokenizer.from_pretrained(str(stories260k))


CONVERSATIONS = {
    "system_user": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
    "user_only": [{"role": "user", "content": "Hi"}],
    "multi_turn": [
        {"role": "system", "content": "You are a friendly chatbot who always responds in the style of a pirate."},
        {"role": "user", "content": "How many helicopters can a human eat in one sitting?"},
        {"role": "assistant", "content": "Arr, none, matey!"},
        {"role": "user", "content": "Why not?\n  Explain  with\tspaces."},
    ],
    "ends_with_assistant": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    "unicode_and_markup": [
        {"role": "user", "content": "日本語 🙂 <b>&amp;</b> {{ not a template }} {% raw %}"},
    ],
}


def test_tinyllama_renders_the_zephyr_format(tinyllama):
    rendered = tinyllama.apply_chat_template(CONVERSATIONS["system_user"])
    assert rendered == "<|system|>\nS</s>\n<|user|>\nHi</s>\n<|assistant|>\n"  # from the task's specification


def test_tinyllama_matches_the_observed_renderings(tinyllama, tinyllama_tokenizer_dir):
    path = tinyllama_tokenizer_dir / "expected_tokens.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    expected = json.loads(path.read_text(encoding="utf-8"))
    case = expected["chat_user_hi"]
    assert tinyllama.apply_chat_template(case["messages"], case["add_generation_prompt"]) == case["rendered"]
    messages = [{"role": "system", "content": "You are a friendly chatbot."}, {"role": "user", "content": "Hi"}]
    assert tinyllama.apply_chat_template(messages) == expected["system_user_rendered"]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_tinyllama_matches_transformers(tinyllama, hf_tinyllama, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    reference = hf_tinyllama.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert tinyllama.apply_chat_template(messages, add_generation_prompt) == reference


def test_encode_chat_adds_bos_once(tinyllama):
    messages = CONVERSATIONS["multi_turn"]
    ids = tinyllama.encode_chat(messages)
    assert ids == tinyllama.encode(tinyllama.apply_chat_template(messages))
    assert ids[0] == tinyllama.bos_id and ids[1] != tinyllama.bos_id


def test_encode_chat_does_not_double_a_bos_written_by_the_template(tinyllama, tinyllama_tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a temporary copy, outside the repo
        shutil.copy(tinyllama_tokenizer_dir / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tokenizer = Tokenizer.from_folder(tmp_path)
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids == tinyllama.encode("Hi")  # one BOS, from the template
    assert ids.count(tinyllama.bos_id) == 1


# Templates that exercise the environment: whitespace control, loop controls, tojson, namespace,
# raise_exception, special-token variables; rendered by transformers with the same tokenizer.
SYNTHETIC_TEMPLATES = {
    "llama2_style": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "whitespace_blocks": (
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'system' %}\n"
        "<<{{ message['content'] }}>>\n"
        "    {% else %}\n"
        "[{{ message['role'] | upper }}] {{ message['content'] }}{{ eos_token }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}\n"
        "[ASSISTANT]\n"
        "{% endif %}"
    ),
    "tojson_namespace_break": (
        "{% set ns = namespace(count=0) %}"
        "{% for message in messages %}{% if ns.count >= 3 %}{% break %}{% endif %}"
        "{% set ns.count = ns.count + 1 %}{{ message | tojson }}\n{% endfor %}"
        "{{ {'n': ns.count, 'unk': unk_token, 'text': '<é>'} | tojson(indent=2) }}"
        "{% if add_generation_prompt %}{{ '>' }}{% endif %}"
    ),
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("template_name", sorted(SYNTHETIC_TEMPLATES))
@pytest.mark.parametrize("name", ["system_user", "multi_turn", "ends_with_assistant", "unicode_and_markup"])
def test_template_environment_matches_transformers(hf_stories, template_name, name, add_generation_prompt):
    template = SYNTHETIC_TEMPLATES[template_name]
    messages = CONVERSATIONS[name]
    special_tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    try:
        reference = hf_stories.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as error:  # the template's own raise_exception (e.g. roles not alternating)
        with pytest.raises(ChatTemplateError) as ours:
            render_chat(template, messages, add_generation_prompt, **special_tokens)
        assert str(error) in str(ours.value)
        return
    assert render_chat(template, messages, add_generation_prompt, **special_tokens) == reference


def test_reference_tokenizer_has_the_special_tokens_we_pass(hf_stories):
    assert {k: hf_stories.special_tokens_map[k] for k in ("bos_token", "eos_token", "unk_token")} == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"
    }


def test_raise_exception_becomes_a_chat_template_error(hf_stories):
    template = SYNTHETIC_TEMPLATES["llama2_style"]
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        hf_stories.apply_chat_template(messages, chat_template=template, tokenize=False)
    with pytest.raises(ChatTemplateError, match="must alternate"):
        render_chat(template, messages, bos_token="<s>", eos_token="</s>")


def test_sandbox_blocks_attribute_escapes():
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])  # immutable sandbox


def test_model_without_template_reports_it(hf_stories, stories260k):
    stories = Tokenizer.from_folder(stories260k)
    assert hf_stories.chat_template is None
    assert stories.chat_template is None
    with pytest.raises(NoChatTemplateError):
        stories.encode_chat([{"role": "user", "content": "Hi"}])
    with pytest.raises(NoChatTemplateError):
        render_chat(None, [{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize(
    "messages,fragment",
    [
        ([], "empty"),
        ("hello", "list"),
        ([["user", "hi"]], "messages[0] must be a dict"),
        ([{"role": "robot", "content": "hi"}], "role"),
        ([{"content": "hi"}], "role"),
        ([{"role": "user", "content": None}], "content"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": ["a", "list"]}], "messages[1]"),
    ],
)
def test_invalid_messages_raise_clear_errors(tinyllama, messages, fragment):
    with pytest.raises(ChatTemplateError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        tinyllama.apply_chat_template(messages)


def test_caller_messages_are_not_modified(tinyllama):
    messages = [{"role": "user", "content": "Hi"}]
    snapshot = json.dumps(messages)
    tinyllama.apply_chat_template(messages)
    assert json.dumps(messages) == snapshot
