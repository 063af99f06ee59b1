"""Tool calls as text and grammar, without a server: the generic prompt format, the reply reader (whole and streamed),
the grammar's language (llguidance's own matcher is the judge), and templates that take `tools` rendered as
transformers renders them."""
from __future__ import annotations

import json
import random

import llguidance
import pytest

from engine.generation.tool_grammar import check_parameters, tool_call_grammar
from engine.generation.constraints import ConstraintError
from engine.text.chat_template import render_chat, template_takes_tools
from engine.text.tokenizer import Tokenizer
from engine.text.tool_calls import ReplyStream, call_block, parse_reply, prompt_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"]}}}


@pytest.fixture(scope="module")
def stories_tokenizer(stories260k):
    return Tokenizer.from_folder(stories260k)


def matcher(tokenizer, grammar):
    ll = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size, eos_token=list(tokenizer.eos_ids))
    m = llguidance.LLMatcher(ll, '%llguidance {"no_forcing": true}\n' + grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    return m, ll


def accepts(tokenizer, grammar, text: str) -> bool:
    """Whether the grammar's language holds `text` whole (llguidance: every token accepted and the end allowed)."""
    m, ll = matcher(tokenizer, grammar)
    ids = ll.tokenize_str(text)
    return m.validate_tokens(ids) == len(ids) and all(m.consume_token(t) for t in ids) and m.is_accepting()


CALL = call_block("get_weather", {"city": "Paris", "unit": "c"})


@pytest.mark.parametrize("choice, parallel, text, expected", [
    ("required", True, CALL, True),
    ("required", True, CALL + "\n" + call_block("add", {"a": 1, "b": 2}), True),
    ("required", False, CALL + "\n" + CALL, False),  # one call when parallel calls are off
    ("required", True, "Sunny.", False),  # required: no text
    ("required", True, call_block("get_weather", {"city": "Paris"}), False),  # a required argument missing
    ("required", True, call_block("get_weather", {"city": "Paris", "unit": "k"}), False),  # not in the enum
    ("required", True, call_block("get_weather", {"city": "Paris", "unit": "c", "x": 1}), False),  # closed object
    ("required", True, call_block("get_weather", {"city": "A very long city", "unit": "c"}), False),  # maxLength
    ("required", True, call_block("delete_all", {}), False),  # no such tool
    ("add", True, call_block("add", {"a": 1, "b": 2}), True),
    ("add", True, CALL, False),  # named: only that function
    ("add", True, call_block("add", {"a": 12345678901234567, "b": 2}), False),  # integers within +-2**53
    ("auto", True, "Sunny.", True),
    ("auto", True, "", True),
    ("auto", True, CALL, True),
    ("auto", True, "<tool_call>\nnot json", False),  # a block that starts is a valid call
    ("auto", True, "Let me see. " + CALL, True),  # (text that does not start with a block is text)
])
def test_the_grammar_holds_exactly_valid_replies(stories_tokenizer, choice, parallel, text, expected):
    grammar = tool_call_grammar([WEATHER, ADD], choice, parallel)
    assert accepts(stories_tokenizer, grammar, text) is expected


def deep_schema(levels: int) -> dict:
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def test_a_schema_past_the_limits_names_its_tool():
    """Checked before any compiler sees it (a chain this deep would overflow llguidance's stack)."""
    deep = {"type": "function", "function": {"name": "f", "parameters": deep_schema(300)}}
    with pytest.raises(ConstraintError) as error:
        check_parameters([WEATHER, deep])
    assert error.value.field == "tools[1].function.parameters" and "deep" in str(error.value)


REPLIES = [
    "Just text, no calls.",
    "<tool_call", "<tool_call>",  # cut off before a call is known: content / nothing
    CALL,
    CALL + "\n" + call_block("add", {"a": 10, "b": -2}),
    call_block("add", {"a": 1, "b": {"nested": ["}", "\\\"", "{"]}}),  # braces and escapes inside strings
    CALL[:-5],  # cut off inside the closing tag
    CALL + "\n" + call_block("add", {"a": 10, "b": 2})[:40],  # the second call cut off inside its arguments
]


@pytest.mark.parametrize("text", REPLIES)
def test_a_streamed_reply_reads_as_the_whole_one(text):
    whole = parse_reply(text)
    rng = random.Random(len(text))
    for _ in range(20):
        reader, deltas, i = ReplyStream(), [], 0
        while i < len(text):
            step = rng.randint(1, 7)
            deltas += reader.feed(text[i:i + step])
            i += step
        deltas += reader.finish()
        content = "".join(d[1] for d in deltas if d[0] == "content")
        names = [d[2] for d in deltas if d[0] == "call"]
        arguments = ["".join(d[2] for d in deltas if d[0] == "arguments" and d[1] == k) for k in range(len(names))]
        if whole.calls:
            assert content == "" and names == [c.name for c in whole.calls]
            assert arguments == [c.arguments for c in whole.calls]
        else:
            assert content == text and not names


def test_complete_calls_parse_to_their_arguments():
    reply = parse_reply(CALL + "\n" + call_block("add", {"a": 1, "b": 2}))
    assert reply.content is None and [c.complete for c in reply.calls] == [True, True]
    assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}), ("add", {"a": 1, "b": 2})]
    cut = parse_reply(CALL[:-3])
    assert [c.complete for c in cut.calls] == [False]


def test_the_generic_format_in_tinyllamas_template(tinyllama_tokenizer_dir):
    """TinyLlama's template does not take tools: they go into the system turn, a past call into the assistant turn,
    its result into a user turn, all in the documented format."""
    tokenizer = Tokenizer.from_folder(tinyllama_tokenizer_dir)
    assert not template_takes_tools(tokenizer.chat_template)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]},
               {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "21 C"}]
    messages, tools = prompt_messages(tokenizer.chat_template, history, [WEATHER])
    assert tools is None
    rendered = tokenizer.apply_chat_template(messages)
    signature = json.dumps(WEATHER["function"])
    assert rendered == (
        "<|system|>\nYou may call these functions:\n<tools>\n" + signature + "\n</tools>\n"
        "To call one, answer with\n<tool_call>\n{\"name\": ..., \"arguments\": {...}}\n</tool_call></s>\n"
        "<|user|>\nWeather in Paris?</s>\n"
        "<|assistant|>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}"
        "\n</tool_call></s>\n"
        "<|user|>\n<tool_response>\n21 C\n</tool_response></s>\n<|assistant|>\n")


TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}[{{ c.function.name }}({{ c.function.arguments | tojson }})]"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}</{{ m.role }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_a_template_that_takes_tools_renders_them_as_transformers_does(tinyllama_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(tinyllama_tokenizer_dir))
    history = [{"role": "user", "content": "Add 1 and 2"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
               {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "3"}]
    assert template_takes_tools(TOOLS_TEMPLATE)
    messages, tools = prompt_messages(TOOLS_TEMPLATE, history, [ADD, WEATHER])
    ours = render_chat(TOOLS_TEMPLATE, messages, tools=tools, **{"bos_token": "<s>", "eos_token": "</s>"})
    theirs = reference.apply_chat_template(history, tools=[ADD, WEATHER], chat_template=TOOLS_TEMPLATE,
                                           tokenize=False, add_generation_prompt=True)
    assert ours == theirs
