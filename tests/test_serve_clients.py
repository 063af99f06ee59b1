"""The clients people point at a server, each against the real `tinyllama serve` and used the way its own docs show:
LangChain's ChatOpenAI (invoke, stream, bind_tools with tool_choice auto / required / a name, with_structured_output
with each of its three methods), instructor (Mode.TOOLS, Mode.JSON_SCHEMA), litellm (its openai provider, and its
ollama / ollama_chat providers on Ollama's routes). The model is a small random Llama with TinyLlama's real
tokenizer and chat template (which does not take tools: the generic tool format is used), 2,048 tokens of window.

What is asserted is the protocol and the constraints (the objects the clients build, valid against their schemas),
never the random model's words."""
from __future__ import annotations

import json
import os
from typing import Literal

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pydantic = pytest.importorskip("pydantic")

from tests.conftest import make_random_checkpoint  # noqa: E402
from tests.serve_support import ServerProcess  # noqa: E402 - needs httpx

pytestmark = pytest.mark.filterwarnings("ignore:Item.*ReadOnly:UserWarning")  # litellm's types, under pydantic
NAME = "tiny-chat"
ONE_THREAD = {"TINYLLAMA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
QUESTION = "What is the weather in Paris, in celsius, for the next two days?"


class Weather(pydantic.BaseModel):
    """A weather request (bounded fields: a sampled model's string or number always ends within them)."""

    city: str = pydantic.Field(max_length=12)
    unit: Literal["celsius", "fahrenheit"]
    days: int = pydantic.Field(ge=1, le=7)


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """Get the current weather in a city.

    Args:
        city: the city's name
        unit: the temperature unit
    """
    return f"21 degrees {unit} in {city}"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tinyllama_tokenizer_dir):
    return make_random_checkpoint(tmp_path_factory.mktemp("clients"), tokenizer_from=tinyllama_tokenizer_dir,
                                  vocab_size=32000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=2048, seed=5)


@pytest.fixture(scope="module")
def server(chat_model):
    s = ServerProcess("--model", str(chat_model), "--served-model-name", NAME, env=ONE_THREAD)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


# ---- LangChain -----------------------------------------------------------------------------------------------------
def chat_openai(server, **settings):
    langchain_openai = pytest.importorskip("langchain_openai")
    settings = {"temperature": 0, "max_tokens": 12, **settings}
    return langchain_openai.ChatOpenAI(model=NAME, base_url=server.url + "/v1", api_key="none", max_retries=0,
                                       timeout=300, **settings)


@pytest.fixture
def langchain_llm(server):
    return chat_openai(server)


def test_langchain_invoke_and_stream(langchain_llm):
    message = langchain_llm.invoke("Hello!")
    assert isinstance(message.content, str) and message.content
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata["output_tokens"] == 12
    chunks = list(langchain_llm.stream("Hello!"))
    assert "".join(c.content for c in chunks) == message.content  # greedy: the same reply


@pytest.mark.parametrize("tool_choice", ["required", "Weather"])
def test_langchain_bind_tools_forced(server, tool_choice):
    llm = chat_openai(server, max_tokens=120, temperature=1.0, seed=1)
    message = llm.bind_tools([Weather], tool_choice=tool_choice, parallel_tool_calls=False).invoke(QUESTION)
    assert not message.invalid_tool_calls and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["id"].startswith("call_") and call["name"] == "Weather"
    Weather.model_validate(call["args"])
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_langchain_bind_tools_auto_streamed(langchain_llm):
    llm = langchain_llm.bind_tools([get_weather], tool_choice="auto").bind(max_tokens=30)
    merged = None
    for chunk in llm.stream(QUESTION):
        merged = chunk if merged is None else merged + chunk
    if merged.tool_calls:  # the model chose to call: then it is a valid call
        assert all(c["name"] == "get_weather" for c in merged.tool_calls)
    else:
        assert isinstance(merged.content, str)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output(server, method):
    structured = chat_openai(server, max_tokens=120, temperature=1.0, seed=2).with_structured_output(
        Weather, method=method)
    weather = structured.invoke(QUESTION)
    assert isinstance(weather, Weather)


def test_langchain_structured_output_json_mode(server):
    """json_mode sends response_format json_object: the reply is a JSON object (any: the schema is only in the
    prompt), complete unless cut off by max_tokens."""
    structured = chat_openai(server, max_tokens=60).with_structured_output(Weather, method="json_mode",
                                                                          include_raw=True)
    out = structured.invoke(QUESTION + " Answer in JSON.")
    raw = out["raw"]
    assert raw.content.startswith("{")
    if raw.response_metadata["finish_reason"] == "stop":
        assert isinstance(json.loads(raw.content), dict)
    else:
        assert raw.response_metadata["finish_reason"] == "length"


# ---- instructor ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor(server, mode):
    instructor = pytest.importorskip("instructor")
    client = instructor.from_openai(openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                                  timeout=300), mode=getattr(instructor.Mode, mode))
    weather, completion = client.chat.completions.create_with_completion(
        model=NAME, response_model=Weather, messages=[{"role": "user", "content": QUESTION}], max_retries=0,
        max_tokens=120, temperature=1.0, seed=3)
    assert isinstance(weather, Weather)
    expected = "tool_calls" if mode == "TOOLS" else "stop"
    assert completion.choices[0].finish_reason == expected


# ---- litellm -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def litellm():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list
    module = pytest.importorskip("litellm")
    module.telemetry = False
    return module


def test_litellm_openai_provider(server, litellm):
    kwargs = dict(model="openai/" + NAME, api_base=server.url + "/v1", api_key="none",
                  messages=[{"role": "user", "content": "Hello!"}], max_tokens=10, temperature=0)
    response = litellm.completion(**kwargs)
    text = response.choices[0].message.content
    assert text and response.usage.completion_tokens == 10
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(stream=True, **kwargs))
    assert streamed == text
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": Weather.model_json_schema()}}]
    called = litellm.completion(**{**kwargs, "max_tokens": 120, "temperature": 1.0, "seed": 4}, tools=tools,
                                tool_choice="required")
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and called.choices[0].finish_reason == "tool_calls"
    Weather.model_validate_json(call.function.arguments)


@pytest.mark.parametrize("provider", ["ollama", "ollama_chat"])
def test_litellm_ollama_providers(server, litellm, provider):
    kwargs = dict(model=f"{provider}/{NAME}", api_base=server.url, messages=[{"role": "user", "content": "Hello!"}],
                  max_tokens=10, temperature=0)
    response = litellm.completion(**kwargs)
    assert response.choices[0].message.content and response.usage.completion_tokens == 10
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(stream=True, **kwargs))
    assert streamed == response.choices[0].message.content
    structured = litellm.completion(**{**kwargs, "max_tokens": 120, "temperature": 1.0, "seed": 6},
                                    response_format=Weather)
    Weather.model_validate_json(structured.choices[0].message.content)
