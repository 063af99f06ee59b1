"""Tool calling on /v1/chat/completions against the real server (stories260K, which ships no chat template, served
with `--chat-template zephyr`), driven with the official `openai` client: every call generated under `required` or
a named function is valid against its function's schema (100 of 100 at temperature 1), streamed calls are the
non-streamed ones, history with calls and results is accepted, the legacy fields answer in their shape, and the
errors name their field. The tiny model's words are never asserted; the protocol and the constraints are."""
from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

from tests.serve_support import ServerProcess  # noqa: E402 - needs httpx

NAME = "stories"
ONE_THREAD = {"TINYLLAMA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
# Small schemas: stories260K's window is 512 tokens, and its 512-token vocabulary spends about one token per
# character of JSON. maxLength bounds the string (a sampled tiny model rarely closes one on its own).
WEATHER_PARAMETERS = {"type": "object",
                      "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1,
                                                                                           "maximum": 7}},
                      "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]
# flat JSON (under the body's nesting limit) whose $refs chain 300 deep: past the constraint limits
DEEP = {"$ref": "#/$defs/d0", "$defs": {**{f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}}
                                          for i in range(300)}, "d300": {"type": "string"}}}
CLOSED = {name: dict(schema, additionalProperties=False) for name, schema in
          (("get_weather", WEATHER_PARAMETERS), ("get_time", TIME["function"]["parameters"]))}


@pytest.fixture(scope="module")
def server(stories260k):
    s = ServerProcess("--model", str(stories260k), "--chat-template", "zephyr", "--served-model-name", NAME,
                      "--max-active", "100", env=ONE_THREAD)  # n = 100 choices run together (n <= --max-active)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def assert_valid_call(call, names=("get_weather", "get_time")):
    """A tool call in OpenAI's shape whose arguments are valid against its function's parameters."""
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), CLOSED[call.function.name])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_100_of_100_calls_are_valid_at_temperature_1(client, tool_choice):
    response = client.chat.completions.create(model=NAME, messages=USER, tools=[WEATHER, TIME],
                                              tool_choice=tool_choice, parallel_tool_calls=False, n=100,
                                              temperature=1.0, seed=7, max_tokens=110)
    assert len(response.choices) == 100
    names = ("get_weather",) if isinstance(tool_choice, dict) else ("get_weather", "get_time")
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1 and choice.message.content is None
        assert_valid_call(choice.message.tool_calls[0], names)
    assert len({c.message.tool_calls[0].id for c in response.choices}) == 100


def test_parallel_calls_are_each_valid(client):
    response = client.chat.completions.create(model=NAME, messages=USER, tools=[WEATHER, TIME],
                                              tool_choice="required", n=8, temperature=1.0, seed=3)
    for choice in response.choices:
        calls = choice.message.tool_calls
        assert calls and choice.finish_reason in ("tool_calls", "length")
        complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]  # the last may be cut off
        for call in complete:
            assert_valid_call(call)


def test_a_streamed_call_is_the_non_streamed_one(client):
    kwargs = dict(model=NAME, messages=USER, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0,
                  seed=11, max_tokens=110, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        assert not choice.delta.content
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            if delta.id:
                assert entry["id"] is None  # the id and name come once, in the call's first delta
                entry.update(id=delta.id, name=delta.function.name)
            entry["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_auto_answers_text_or_valid_calls(client):
    response = client.chat.completions.create(model=NAME, messages=USER, tools=[WEATHER, TIME], n=6,
                                              temperature=1.0, seed=5, max_tokens=60)
    for choice in response.choices:
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
        else:
            assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
            assert not choice.message.content.startswith("<tool_call>")


def test_none_answers_text_and_hides_the_tools(client):
    with_tools = client.chat.completions.create(model=NAME, messages=USER, tools=[WEATHER], tool_choice="none",
                                                max_tokens=5, temperature=0)
    without = client.chat.completions.create(model=NAME, messages=USER, max_tokens=5, temperature=0)
    assert with_tools.choices[0].message.tool_calls is None
    assert with_tools.choices[0].message.content == without.choices[0].message.content
    assert with_tools.usage.prompt_tokens == without.usage.prompt_tokens


def test_history_with_calls_and_results_is_rendered(client):
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "21 degrees"}]
    short = client.chat.completions.create(model=NAME, messages=USER, tools=[WEATHER], max_tokens=4,
                                           tool_choice="none")
    long = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER], max_tokens=4,
                                          tool_choice="none")
    assert long.usage.prompt_tokens > short.usage.prompt_tokens + 30  # the call and its result are in the prompt
    again = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False)  # the rest of the window
    assert_valid_call(again.choices[0].message.tool_calls[0])


def test_legacy_functions_answer_with_function_call(server):
    body = {"model": NAME, "messages": USER, "functions": [WEATHER["function"]],
            "function_call": {"name": "get_weather"}, "max_tokens": 110, "temperature": 1.0, "seed": 2}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "function_call" and "tool_calls" not in choice["message"]
    call = choice["message"]["function_call"]
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), CLOSED["get_weather"])


@pytest.mark.parametrize("fields, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": DEEP}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "functions"),
], ids=["unknown-name", "bad-choice", "required-without-tools", "bad-name", "duplicate", "bad-schema", "too-deep",
        "with-response-format", "tools-and-functions"])
def test_bad_tool_fields_are_400_naming_the_field(server, fields, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": USER, **fields}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
