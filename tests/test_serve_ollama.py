"""Ollama's API on the real server (stories260K served with `--chat-template zephyr`), driven with the official
`ollama` Python client the way its README does: list / ps / show, chat and generate streamed and whole, `format`
as a JSON Schema, `options`, errors as the client raises them. The same server answers OpenAI's routes, and the two
faces give the same tokens for the same request."""
from __future__ import annotations

import json

import pytest

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

import engine  # noqa: E402
from engine.generation.tool_grammar import tool_call_grammar  # noqa: E402
from engine.serve.ollama import OllamaAnswer  # noqa: E402
from engine.serve.responses import TokenStrings  # noqa: E402
from engine.serve.tools import ToolCalling  # noqa: E402
from engine.text.tool_calls import prompt_messages  # noqa: E402
from tests.serve_support import ServerProcess  # noqa: E402 - needs httpx

NAME, ALIAS = "stories", "tiny-stories"
ONE_THREAD = {"TINYLLAMA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
HELLO = [{"role": "user", "content": "Tell me a story."}]
SCHEMA = {"type": "object", "properties": {"happy": {"type": "boolean"},
                                           "mood": {"type": "string", "enum": ["glad", "sad"]}},
          "required": ["happy", "mood"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["unit"]}}}


@pytest.fixture(scope="module")
def server(stories260k):
    s = ServerProcess("--model", str(stories260k), "--chat-template", "zephyr", "--served-model-name", NAME, ALIAS,
                      env=ONE_THREAD)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture
def client(server):
    return ollama.Client(host=server.url, timeout=300)


def test_list_ps_show_and_version(server, client, stories260k):
    listed = client.list().models
    assert [m.model for m in listed] == [NAME, ALIAS]  # the aliases too, as /v1/models lists them
    assert listed[0].details.family == "llama" and listed[0].size > 0 and len(listed[0].digest) == 64
    running = client.ps().models
    assert [m.model for m in running] == [NAME] and running[0].context_length == 512
    shown = client.show(ALIAS + ":latest")  # Ollama's clients add the tag
    config = json.loads((stories260k / "config.json").read_text())
    assert shown.modelinfo["llama.context_length"] == config["max_position_embeddings"]
    assert shown.modelinfo["llama.block_count"] == config["num_hidden_layers"]
    assert {"completion", "tools"} <= set(shown.capabilities) and "im_start" not in shown.template
    assert set(httpx.get(server.url + "/api/version").json()) == {"version"}


def test_chat_streamed_is_chat_whole(client):
    options = {"seed": 4, "temperature": 1.0, "num_predict": 24}
    whole = client.chat(model=NAME, messages=HELLO, options=options, stream=False)
    parts = list(client.chat(model=NAME, messages=HELLO, options=options, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done_reason == whole.done_reason == "length"
    assert parts[-1].eval_count == whole.eval_count == 24 and whole.prompt_eval_count > 5
    assert whole.eval_duration > 0 and whole.total_duration >= whole.eval_duration


def test_both_faces_give_the_same_tokens(server, client):
    """Ollama's /api/generate with raw=true and OpenAI's /v1/completions, greedy: the same text."""
    theirs = client.generate(model=NAME, prompt="Once upon a time", raw=True,
                             options={"temperature": 0, "num_predict": 16})
    openai_client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    ours = openai_client.completions.create(model=NAME, prompt="Once upon a time", temperature=0, max_tokens=16)
    assert theirs.response == ours.choices[0].text and theirs.eval_count == ours.usage.completion_tokens


def test_format_json_schema_constrains_the_reply(client):
    for seed in range(3):
        reply = client.chat(model=NAME, messages=HELLO, format=SCHEMA, options={"seed": seed, "temperature": 1.0})
        assert reply.done_reason == "stop"
        jsonschema.validate(json.loads(reply.message.content), SCHEMA)
    generated = client.generate(model=NAME, prompt="Once", raw=True, format=SCHEMA, options={"seed": 9})
    jsonschema.validate(json.loads(generated.response), SCHEMA)


def test_history_with_tool_calls_and_results_is_accepted(client):
    messages = HELLO + [{"role": "assistant", "content": "",
                         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"unit": "c"}}}]},
                        {"role": "tool", "content": "21 degrees", "tool_name": "get_weather"}]
    reply = client.chat(model=NAME, messages=messages, tools=[TOOL], options={"num_predict": 8, "seed": 1})
    assert reply.done and reply.prompt_eval_count > client.chat(
        model=NAME, messages=HELLO, tools=[TOOL], options={"num_predict": 1}).prompt_eval_count


def test_tool_calls_in_ollamas_shape_parse_in_the_client(stories260k):
    """A reply generated under the tool grammar, written by OllamaAnswer (streamed and whole), is what the
    official client's ChatResponse reads: message.tool_calls with a name and an arguments object."""
    model = engine.load_model(str(stories260k), chat_template="zephyr")
    messages, _ = prompt_messages(model.tokenizer.chat_template, HELLO, [TOOL])
    ids = model.tokenizer.encode_chat(messages)
    gen = model.stream(ids, grammar=tool_call_grammar([TOOL], "required", parallel=False), temperature=1.0,
                       seed=3, max_new_tokens=80)
    events = list(gen)
    answer = OllamaAnswer("chat", NAME, TokenStrings(model.tokenizer), None, len(ids), ToolCalling([TOOL], "required"))
    whole = ollama.ChatResponse.model_validate(answer.complete(events, gen.result))
    call = whole.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments["unit"] in ("c", "f")
    streamed = OllamaAnswer("chat", NAME, TokenStrings(model.tokenizer), None, len(ids),
                            ToolCalling([TOOL], "required"))
    lines = [streamed.delta_chunk([e]) for e in events]
    lines = [line for line in lines if line is not None] + streamed.final_chunk(gen.result)
    parts = [ollama.ChatResponse.model_validate(json.loads(text)) for line in lines
             for text in streamed.frame(line).splitlines()]
    assert [c.function for p in parts for c in p.message.tool_calls or []] == [call.function]
    assert "".join(p.message.content or "" for p in parts) == "" and parts[-1].done


@pytest.mark.parametrize("call, status, field", [
    (lambda c: c.chat(model=NAME, messages=[{"role": "user", "content": "What is this?", "images": [b"\x89PNG"]}]),
     400, "images"),
    (lambda c: c.chat(model="llama3.2", messages=HELLO), 404, "llama3.2"),
    (lambda c: c.generate(model=NAME, prompt="Hi", options={"temperature": "hot"}), 400, "options.temperature"),
    (lambda c: c.generate(model=NAME, prompt="Hi", template="{{ .Prompt }}"), 400, "template"),
], ids=["images", "unknown-model", "bad-option", "go-template"])
def test_errors_are_ollamas(client, call, status, field):
    with pytest.raises(ollama.ResponseError) as error:
        result = call(client)
        list(result) if not hasattr(result, "done") else result
    assert error.value.status_code == status and field in error.value.error


def test_an_error_is_one_json_object_with_the_message(server):
    r = httpx.post(server.url + "/api/chat", json={"model": NAME, "messages": HELLO, "format": "yaml"})
    assert r.status_code == 400 and list(r.json()) == ["error"] and r.json()["error"].startswith("format:")


def test_embed_is_the_openai_routes_embedding(server, client):
    """Ollama's /api/embed and OpenAI's /v1/embeddings pool the same vectors (unit length); the older
    /api/embeddings gives one vector, not normalized."""
    texts = ["Once upon a time", "there was a cat"]
    theirs = client.embed(model=NAME, input=texts)
    openai_client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    ours = openai_client.embeddings.create(model=NAME, input=texts, encoding_format="float")
    assert len(theirs.embeddings) == 2 and theirs.prompt_eval_count == ours.usage.prompt_tokens
    for mine, reference in zip(theirs.embeddings, ours.data):
        assert mine == pytest.approx(reference.embedding, abs=1e-6)
        assert sum(x * x for x in mine) == pytest.approx(1.0, abs=1e-5)
    legacy = client.embeddings(model=NAME, prompt=texts[0]).embedding
    norm = sum(x * x for x in legacy) ** 0.5
    assert [x / norm for x in legacy] == pytest.approx(theirs.embeddings[0], abs=1e-5)
    with pytest.raises(ollama.ResponseError) as error:
        client.embed(model=NAME, input="word " * 600, truncate=False)
    assert error.value.status_code == 400 and "input" in error.value.error
    assert len(client.embed(model=NAME, input="word " * 600).embeddings[0]) == len(theirs.embeddings[0])
