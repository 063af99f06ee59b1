"""`tinyllama serve` end to end: the real server in a subprocess on 127.0.0.1, driven with the official `openai` client
(and httpx for what the client hides), checked against the engine in this process on the same weights."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import engine
from tests.conftest import REPO, make_random_checkpoint

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tests.serve_support import ServerProcess, metrics  # noqa: E402 - needs httpx

API_KEY = "sk-test-key"
NAME = "tiny-chat"
ONE_THREAD = {"TINYLLAMA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
PROMPT = "Once upon a time"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


WINDOW = 2048


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tinyllama_tokenizer_dir):
    """tiny_chat_model's shape and real tokenizer, with a 2048-token window: room for generations long enough to be
    cancelled midway however fast the machine."""
    return make_random_checkpoint(tmp_path_factory.mktemp("serve-chat"), tokenizer_from=tinyllama_tokenizer_dir,
                                  vocab_size=32000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=WINDOW, seed=11)


@pytest.fixture(scope="module")
def server(chat_model):
    s = ServerProcess("--model", str(chat_model), "--served-model-name", NAME, "--api-key", API_KEY, env=ONE_THREAD)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def model(chat_model):
    return engine.load_model(str(chat_model))


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def aclient(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def log_softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def openai_finish(stop_reason: str) -> str:
    return {"max_new_tokens": "length", "context_full": "length", "eos": "stop", "stop_string": "stop"}[stop_reason]


# ---- what comes back equals the engine ------------------------------------------------------------------------------
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_greedy_equals_model_complete(client, model):
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=24)
    ids = model.tokenizer.encode_chat(MESSAGES)
    # TinyLlama-Chat's own template, written out (as `generate --chat` renders it)
    assert ids == model.tokenizer.encode("<|system|>\nYou are terse.</s>\n<|user|>\nName three colours.</s>\n"
                                         "<|assistant|>\n")
    expected = model.complete(ids, max_new_tokens=24, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == openai_finish(expected.stop_reason)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(expected.token_ids))
    assert r.usage.total_tokens == len(ids) + len(expected.token_ids)
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")


@pytest.mark.parametrize("prompt", [PROMPT, [1, 450, 4996, 29871]])
def test_completion_greedy_equals_model_complete(client, model, prompt):
    r = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=20)
    expected = model.complete(prompt, max_new_tokens=20, temperature=0)
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == openai_finish(expected.stop_reason)
    assert r.usage.prompt_tokens == len(model.prompt_ids(prompt))
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")


def create(client, kind: str, **kw):
    if kind == "chat":
        return client.chat.completions.create(model=NAME, messages=MESSAGES, **kw)
    return client.completions.create(model=NAME, prompt=PROMPT, **kw)


def text_of(response, kind: str) -> str:
    return response.choices[0].message.content if kind == "chat" else response.choices[0].text


def delta_text(chunk, kind: str) -> str:
    return (chunk.choices[0].delta.content if kind == "chat" else chunk.choices[0].text) or ""


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_text_equals_non_streamed(client, kind):
    kw = dict(max_tokens=30, temperature=0.9, seed=7)
    whole = create(client, kind, **kw)
    chunks = list(create(client, kind, stream=True, stream_options={"include_usage": True}, **kw))
    assert len({c.id for c in chunks}) == 1
    *with_choices, last = chunks
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None and len(c.choices) == 1 for c in with_choices)
    if kind == "chat":
        assert with_choices[0].choices[0].delta.role == "assistant"
        assert with_choices[0].object == "chat.completion.chunk"
    assert "".join(delta_text(c, kind) for c in with_choices) == text_of(whole, kind)
    finishes = [c.choices[0].finish_reason for c in with_choices]
    assert finishes[-1] == whole.choices[0].finish_reason == "length" and set(finishes[:-1]) == {None}
    plain = list(create(client, kind, stream=True, **kw))  # no usage chunk unless asked
    assert all(len(c.choices) == 1 and c.usage is None for c in plain)
    assert "".join(delta_text(c, kind) for c in plain) == text_of(whole, kind)


def test_continuous_usage_stats(client):
    """vLLM's stream_options.continuous_usage_stats: every chunk says how many tokens were generated so far."""
    chunks = list(create(client, "completion", max_tokens=12, temperature=0, stream=True,
                         stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 12 and {c.usage.prompt_tokens for c in chunks} == {5}
    assert counts[-2:] == [12, 12]  # the finish chunk and the usage chunk


def test_sse_wire_format(server):
    """The bytes on the wire: data: lines, one id, [DONE] last, Content-Type text/event-stream."""
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert len({p["id"] for p in payloads}) == 1 and payloads[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_stop_strings(client, model, kind):
    base = text_of(create(client, kind, temperature=0, max_tokens=40), kind)
    stop = base[len(base) // 2: len(base) // 2 + 3]
    cut = base[:base.index(stop)]
    for given in (stop, [stop, "\u2603never"]):
        r = create(client, kind, temperature=0, max_tokens=40, stop=given)
        assert text_of(r, kind) == cut and r.choices[0].finish_reason == "stop"
    streamed = [delta_text(c, kind) for c in create(client, kind, temperature=0, max_tokens=40, stop=[stop],
                                                    stream=True)]
    assert "".join(streamed) == cut  # never a partial stop string in a delta
    prompt = model.tokenizer.encode_chat(MESSAGES) if kind == "chat" else PROMPT
    assert model.complete(prompt, temperature=0, max_new_tokens=40, stop=[stop]).text == cut


def test_seeded_sampling_alone_and_in_a_busy_batch(server, client, model):
    kw = dict(temperature=1.0, top_p=0.9, seed=1234, max_tokens=40)
    alone = text_of(create(client, "chat", **kw), "chat")
    expected = model.complete(model.tokenizer.encode_chat(MESSAGES), max_new_tokens=40, temperature=1.0, top_p=0.9,
                              seed=1234)
    assert alone == expected.text

    async def busy():
        async with aclient(server) as ac:
            async def other(i):
                stream = await ac.completions.create(model=NAME, prompt=f"Story {i}:", max_tokens=60,
                                                     temperature=1.0, seed=i, stream=True)
                return "".join([c.choices[0].text async for c in stream])

            mine = ac.chat.completions.create(model=NAME, messages=MESSAGES, **kw)
            results = await asyncio.gather(*(other(i) for i in range(6)), mine)
            return results[-1].choices[0].message.content

    assert asyncio.run(busy()) == alone
    assert text_of(create(client, "chat", **dict(kw, seed=1235)), "chat") != alone


@pytest.mark.parametrize("params", [
    dict(presence_penalty=1.5, frequency_penalty=0.8, temperature=0),
    dict(temperature=0.8, seed=3, top_k=20, min_p=0.05, repetition_penalty=1.3),
    dict(temperature=0.7, seed=11, top_p=0.8, frequency_penalty=-0.5),
])
def test_sampling_fields_reach_the_engine(client, model, params):
    extensions = {k: params[k] for k in ("top_k", "min_p", "repetition_penalty") if k in params}
    standard = {k: v for k, v in params.items() if k not in extensions}
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, extra_body=extensions, **standard)
    assert r.choices[0].text == model.complete(PROMPT, max_new_tokens=30, **params).text


def test_chat_logprobs_are_the_log_softmax_of_model_logits(client, model):
    kw = dict(temperature=0, max_tokens=10, logprobs=True, top_logprobs=3)
    r = create(client, "chat", **kw)
    ids = model.tokenizer.encode_chat(MESSAGES)
    generated = model.complete(ids, max_new_tokens=10, temperature=0).token_ids
    reference = log_softmax64(model.logits(ids + generated))[len(ids) - 1:-1]
    content = r.choices[0].logprobs.content
    assert len(content) == len(generated) == r.usage.completion_tokens
    for token, entry, row in zip(generated, content, reference):
        assert entry.logprob == pytest.approx(row[token], abs=2e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(np.sort(row)[::-1][:3], abs=2e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == r.choices[0].message.content
    streamed = [e.model_dump() for c in create(client, "chat", stream=True, **kw) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == [e.model_dump() for e in content]


def test_completion_logprobs(client, model):
    r = client.completions.create(model=NAME, prompt=PROMPT, temperature=0, max_tokens=8, logprobs=2)
    ids = model.prompt_ids(PROMPT)
    generated = model.complete(PROMPT, max_new_tokens=8, temperature=0).token_ids
    reference = log_softmax64(model.logits(ids + generated))[len(ids) - 1:-1]
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([row[t] for t, row in zip(generated, reference)], abs=2e-4)
    for top, row in zip(lp.top_logprobs, reference):
        assert sorted(top.values(), reverse=True) == pytest.approx(np.sort(row)[::-1][:2], abs=2e-4)
    text = r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for offset, token in zip(lp.text_offset, lp.tokens):
        assert token.startswith("bytes:") or text[offset:].startswith(token)


# ---- many clients, and clients that go away -------------------------------------------------------------------------
def test_16_concurrent_streaming_clients(server, model):
    async def run_all():
        async with aclient(server) as ac:
            async def one(i):
                messages = [{"role": "user", "content": f"Tell me fact number {i}."}]
                stream = await ac.chat.completions.create(model=NAME, messages=messages, max_tokens=16 + i,
                                                          temperature=0.8, seed=i, stream=True,
                                                          stream_options={"include_usage": True})
                parts, times, usage, finish = [], [], None, None
                async for chunk in stream:
                    times.append(time.perf_counter())
                    if chunk.choices:
                        parts.append(chunk.choices[0].delta.content or "")
                        finish = chunk.choices[0].finish_reason or finish
                    else:
                        usage = chunk.usage
                return messages, "".join(parts), usage, finish, times

            return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(run_all())
    for i, (messages, text, usage, finish, _) in enumerate(results):
        expected = model.complete(model.tokenizer.encode_chat(messages), max_new_tokens=16 + i, temperature=0.8,
                                  seed=i)
        assert text == expected.text and finish == openai_finish(expected.stop_reason)
        assert usage.completion_tokens == len(expected.token_ids)
    # they ran together, not one after the other: many streams were under way at once. (Not always all 16: prompts
    # that arrive beside decoding streams are prefilled a bounded share per step, docs/reliability.md, so the
    # shortest stream may end before the last prompt's prefill does.)
    spans = [(times[0], times[-1]) for *_, times in results]
    assert max(sum(1 for a, b in spans if a <= t <= b) for t, _ in spans) >= 4, spans
    assert metrics(server.url)["tinyllama_requests_running"] == 0


KILLABLE_CLIENT = """
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
stream = client.completions.create(model=sys.argv[3], prompt="Once upon a time", max_tokens=2000, stream=True,
                                   extra_body={"ignore_eos": True})
for chunk in stream:
    print(repr(chunk.choices[0].text), flush=True)
"""


def wait_for_idle(url: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["tinyllama_requests_running"] == 0 and m["tinyllama_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"still running: {m['tinyllama_requests_running']}"
        time.sleep(0.05)


def test_a_client_killed_mid_stream_frees_its_sequence(server, client, model):
    before = metrics(server.url)
    aborted = 'tinyllama_requests_finished_total{finish_reason="abort"}'
    process = subprocess.Popen([sys.executable, "-c", KILLABLE_CLIENT, server.url + "/v1", API_KEY, NAME],
                               stdout=subprocess.PIPE, text=True)
    try:
        lines = [process.stdout.readline() for _ in range(3)]
        assert all(lines), lines
        assert metrics(server.url)["tinyllama_requests_running"] == 1
    finally:
        process.kill()
        process.wait()
    after = wait_for_idle(server.url)
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    generated = after["tinyllama_generation_tokens_total"] - before["tinyllama_generation_tokens_total"]
    assert 3 <= generated < 2000  # cancelled, not run to the end
    test_chat_greedy_equals_model_complete(client, model)  # the next request works


def test_a_non_streaming_client_that_gives_up_cancels_its_sequence(server):
    aborted = 'tinyllama_requests_finished_total{finish_reason="abort"}'
    before = metrics(server.url)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=httpx.Timeout(60, read=0.3))
    after = wait_for_idle(server.url)
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    assert after["tinyllama_generation_tokens_total"] - before["tinyllama_generation_tokens_total"] < 2000


# ---- errors -------------------------------------------------------------------------------------------------------
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]
BAD_INPUTS = [  # (path, body, status, param, code)
    (CHAT, {"messages": []}, 400, "messages", None),
    (CHAT, {}, 400, "messages", None),
    (CHAT, {"messages": "hi"}, 400, "messages", None),
    (CHAT, {"messages": USER, "n": 129}, 400, "n", None),
    (CHAT, {"messages": USER, "tools": [{"type": "retrieval"}]}, 400, "tools[0].type", None),
    (CHAT, {"messages": USER, "tool_choice": "required"}, 400, "tool_choice", None),
    (CHAT, {"messages": USER, "response_format": {"type": "xml"}}, 400, "response_format.type", None),
    (CHAT, {"messages": USER, "logit_bias": {"32000": 5}}, 400, "logit_bias", None),
    (CHAT, {"messages": USER, "logit_bias": {"50": 101}}, 400, "logit_bias", None),
    (CHAT, {"messages": USER, "seed": 2 ** 63}, 400, "seed", None),
    (CHAT, {"messages": USER, "temperature": 3}, 400, "temperature", None),
    (CHAT, {"messages": USER, "top_p": 0}, 400, "top_p", None),
    (CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens", None),
    (CHAT, {"messages": USER, "max_completion_tokens": 2040}, 400, "messages", "context_length_exceeded"),
    (CHAT, {"messages": USER, "presence_penalty": 2.5}, 400, "presence_penalty", None),
    (CHAT, {"messages": USER, "frequency_penalty": -3}, 400, "frequency_penalty", None),
    (CHAT, {"messages": USER, "top_k": -2}, 400, "top_k", None),
    (CHAT, {"messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty", None),
    (CHAT, {"messages": USER, "seed": "abc"}, 400, "seed", None),
    (CHAT, {"messages": USER, "stop": 5}, 400, "stop", None),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
    (CHAT, {"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, 400, "messages[0].tool_calls", None),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content", None),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0].type", None),
    (CHAT, {"messages": USER, "top_logprobs": 3}, 400, "top_logprobs", None),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
    (CHAT, {"messages": USER, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    (CHAT, {"messages": USER, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": [1, 99999]}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": [[1, 2], []]}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": "word " * 2100}, 400, "prompt", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": 2048, "stream": True}, 400, "prompt", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", None),
    (COMPLETIONS, {"prompt": "a", "seed": -2 ** 63 - 1}, 400, "seed", None),
    (COMPLETIONS, {"prompt": "a", "suffix": "b"}, 400, "suffix", None),
    (COMPLETIONS, {"prompt": "a", "best_of": 2}, 400, "best_of", None),
    (COMPLETIONS, {"prompt": "a", "logprobs": 21}, 400, "logprobs", None),
    (COMPLETIONS, {}, 400, "prompt", None),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD_INPUTS,
                         ids=[f"{'chat' if p == CHAT else 'completions'}-{i}" for i, (p, *_) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_its_status_and_openai_error_shape(server, path, body, status, param, code):
    r = httpx.post(server.url + path, json=body, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert error["message"] and "Traceback" not in r.text


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"messages": [', b""])
def test_a_body_that_is_not_a_json_object_is_400(server, raw):
    r = httpx.post(server.url + CHAT, content=raw, headers=AUTH, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored_and_content_type_is_not_required(server, model):
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "frobnicate": {"x": 1},
            "metadata": {"k": "v"}, "store": False}
    r = httpx.post(server.url + COMPLETIONS, content=json.dumps(body), timeout=60,
                   headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})  # curl -d's default
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == model.complete(PROMPT, max_new_tokens=4).text


def test_unknown_routes_and_methods(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.delete(server.url + "/v1/models")
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(server.url + "/v1/models/gpt-4", headers=AUTH).status_code == 404


def test_the_openai_client_sees_the_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=MESSAGES, n=129)
    assert e.value.status_code == 400 and e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:  # found before the first token: an HTTP error, not a 200 stream
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5000, stream=True)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(server.url + CHAT, json={"messages": []}, headers=headers)  # checked before the body
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=NAME, prompt=PROMPT, max_tokens=2)
    assert [m.id for m in wrong.models.list().data] == [NAME]  # health, models and metrics stay open
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_metrics_count_what_was_served(server, client):
    before = metrics(server.url)
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    httpx.post(server.url + CHAT, json={"messages": []}, headers=AUTH)  # one 400
    after = metrics(server.url)

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    assert delta("tinyllama_prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("tinyllama_generation_tokens_total") == r.usage.completion_tokens == 7
    assert delta("tinyllama_time_to_first_token_seconds_count") == 1
    assert delta("tinyllama_time_per_output_token_seconds_count") == 6
    assert delta("tinyllama_request_latency_seconds_count") == 1
    assert delta('tinyllama_requests_finished_total{finish_reason="length"}') == 1
    assert delta('tinyllama_request_errors_total{status="400"}') == 1
    assert after["tinyllama_requests_running"] == 0 and after["tinyllama_requests_waiting"] == 0
    assert httpx.get(server.url + "/metrics").headers["content-type"].startswith("text/plain")


def test_one_log_line_per_request(server, client):
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    deadline = time.monotonic() + 10
    while r.id not in server.log and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in server.log.splitlines() if r.id in line)
    assert "prompt 5 tokens (0 cached), completion 3 tokens, first token" in line and "tok/s" in line
    assert line.endswith("finish length")
    assert "Traceback" not in server.log


def test_a_refused_request_is_one_log_line_without_its_body(server):
    secret = "a prompt nobody else should read"
    r = httpx.post(server.url + CHAT, headers=AUTH, json={"messages": [{"role": "user", "content": secret}],
                                                          "max_tokens": 99999})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    missing = f"/v1/nothing-{time.monotonic_ns()}"
    httpx.get(server.url + missing)
    deadline = time.monotonic() + 10
    while missing not in server.log and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in server.log.splitlines() if "refused" in line]
    assert sum(f"refused 400 POST {CHAT}: {message}" in line for line in lines) == 1
    assert sum(f"refused 404 GET {missing}: no such endpoint" in line for line in lines) == 1
    assert secret not in server.log


def test_head_on_the_page_and_one_operation_id_per_route(tiny_chat_model):
    s = ServerProcess("--model", str(tiny_chat_model), env=ONE_THREAD)  # no --api-key: /openapi.json is on
    try:
        s.wait_ready()
        for path in ("/", "/static/app.js", "/health"):
            r = httpx.head(s.url + path)
            assert r.status_code == 200 and r.content == b"", path
        assert httpx.get(s.url + "/").headers["content-type"].startswith("text/html")
        assert httpx.get(s.url + "/openapi.json").status_code == 200  # FastAPI builds the schema (and warns) here
        assert "Duplicate Operation ID" not in s.log and "Warning" not in s.log
        assert "open http://127.0.0.1:" in s.log and "/ in a browser" in s.log  # the page's address, at start
    finally:
        s.stop()


def test_the_usage_chunk_carries_the_servers_timings(server, client):
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    last = chunks[-1].model_dump()
    timings = last["timings"]  # llama.cpp's field, beside OpenAI's usage
    assert timings["predicted_n"] == last["usage"]["completion_tokens"] == 12
    assert timings["prompt_n"] == last["usage"]["prompt_tokens"]
    assert timings["predicted_per_second"] == pytest.approx(11 / (timings["predicted_ms"] / 1e3))
    deadline = time.monotonic() + 10
    while last["id"] not in server.log and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in server.log.splitlines() if last["id"] in line)
    assert f"{timings['predicted_per_second']:.1f} tok/s" in line  # the log line's figure


# ---- the app in this process: loading, and a load that fails -------------------------------------------------------
def test_health_is_503_while_loading_then_200(model):
    from fastapi.testclient import TestClient

    from engine.serve import create_app

    release = threading.Event()

    def slow_load():
        release.wait(30)
        return model

    with TestClient(create_app(slow_load, NAME)) as tc:
        r = tc.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"} and "retry-after" in r.headers
        r = tc.post(CHAT, json={"messages": USER})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert tc.get("/v1/models").status_code == 200  # the name is known before the weights
        release.set()
        deadline = time.monotonic() + 30
        while tc.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = tc.post(COMPLETIONS, json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
        assert r.json()["choices"][0]["text"] == model.complete(PROMPT, max_new_tokens=3).text


def test_cors_only_for_the_allowed_origins(model):
    from fastapi.testclient import TestClient

    from engine.serve import create_app

    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with TestClient(create_app(lambda: model, NAME, allowed_origins=["http://ui.example"])) as tc:
        r = tc.options(CHAT, headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
        r = tc.options(CHAT, headers=dict(preflight, Origin="http://evil.example"))
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    with TestClient(create_app(lambda: model, NAME)) as tc:  # none by default
        assert "access-control-allow-origin" not in tc.get("/v1/models", headers={"Origin": "http://ui.example"}).headers


def tinyllama(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_a_model_that_cannot_load_is_one_error_line_and_exit_1(tmp_path):
    p = tinyllama("serve", "--port", "0", "--model", str(tmp_path / "missing"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("tinyllama: error:")]
    assert len(errors) == 1 and "missing" in errors[0]


def test_a_port_in_use_is_one_error_line(tiny_chat_model):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = tinyllama("serve", "--model", str(tiny_chat_model), "--port", str(port))
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"tinyllama: error: cannot listen on 127.0.0.1:{port}: Address already in use"]


@pytest.mark.parametrize("args, message", [(["--max-active", "0"], "--max-active"), (["--port", "70000"], "--port"),
                                           (["--api-key", " "], "--api-key")])
def test_bad_flags_are_one_error_line(tiny_chat_model, args, message):
    p = tinyllama("serve", "--model", str(tiny_chat_model), *args)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and message in p.stderr


# ---- Ctrl-C, and a busy server ------------------------------------------------------------------------------------
def stream_in_thread(url: str, body: dict, into: dict, name: str) -> threading.Thread:
    """POST a streaming request on a thread; into[name] gets the parsed events ('[DONE]' last) or the HTTP status."""

    def read():
        with httpx.stream("POST", url + COMPLETIONS, json=body, timeout=120) as r:
            if r.status_code != 200:
                into[name] = r.status_code
                return
            events = []
            for line in r.iter_lines():
                if line:
                    events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
                    into[name + ".tokens"] = len(events)
            into[name] = events

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def wait_until(condition, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_ctrl_c_lets_a_request_in_flight_finish_and_exits_0(tiny_chat_model):
    s = ServerProcess("--model", str(tiny_chat_model), "--served-model-name", NAME, "--shutdown-timeout", "30",
                      env=ONE_THREAD)
    try:
        s.wait_ready()
        got: dict = {}
        body = {"model": NAME, "prompt": PROMPT, "max_tokens": 230, "stream": True, "ignore_eos": True}
        thread = stream_in_thread(s.url, body, got, "a")
        wait_until(lambda: got.get("a.tokens", 0) >= 2, what="the first tokens")
        s.process.send_signal(signal.SIGINT)
        assert s.process.wait(60) == 0
        thread.join(30)
        events = got["a"]
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) != ""
        assert "Traceback" not in s.log and "finish length" in s.log
    finally:
        s.stop()


@pytest.fixture(scope="module")
def medium_chat_model(tmp_path_factory, tinyllama_tokenizer_dir):
    """TinyLlama's tokenizer on a 44M-parameter Llama (hidden 512, 4 layers, 2048 window): decode steps take
    milliseconds to tens of them, a 256-token prefill chunk tens to hundreds."""
    return make_random_checkpoint(tmp_path_factory.mktemp("medium-chat"), tokenizer_from=tinyllama_tokenizer_dir,
                                  vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, seed=4)


def test_a_long_embedding_runs_between_decode_steps(medium_chat_model):
    """/v1/embeddings of a 1,024-token input runs in slices between decode steps (a SlicedEmbedding, as the
    inspections): a stream started before it keeps receiving tokens while it runs, spread over it (one forward pass
    on the serving thread froze the stream for the whole pass); the vector is the Python API's."""
    from engine.inspect.embeddings import embed

    s = ServerProcess("--model", str(medium_chat_model), env=ONE_THREAD)
    try:
        s.wait_ready()
        victim: list[float] = []
        enough = threading.Event()

        def stream() -> None:
            body = {"prompt": PROMPT, "max_tokens": 1800, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", s.url + COMPLETIONS, json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if line:
                        victim.append(time.monotonic())
                    if enough.is_set():
                        return  # leaves: the server cancels the rest

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        wait_until(lambda: len(victim) >= 3, timeout=120, what="the victim's first tokens")
        ids = [1] + [450 + i % 300 for i in range(1023)]
        started = time.monotonic()
        r = httpx.post(s.url + "/v1/embeddings", json={"input": ids}, timeout=600)
        ended = time.monotonic()
        assert r.status_code == 200, r.text
        wait_until(lambda: victim[-1] > ended or not streamer.is_alive(), timeout=120, what="a token after it")
        enough.set()
        streamer.join(120)
        during = [t for t in victim if started < t < ended]
        vector = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
        np.testing.assert_allclose(vector, embed(engine.load_model(str(medium_chat_model)), ids), rtol=1e-5,
                                   atol=1e-6)
        print(f"embedding: {ended - started:.2f} s, {len(during)} victim tokens meanwhile")
        if not victim[-1] > ended:
            pytest.skip("the victim finished before the embedding did: nothing to compare")
        # the tokens the victim received while the embedding ran came spread over it, not all at its end
        assert len(during) >= 20, (len(during), ended - started)
        assert max(b - a for a, b in zip([started] + during, during + [ended])) < 0.5 * (ended - started)
    finally:
        s.stop()


def test_busy_server_answers_health_fast_refuses_past_its_queue_and_stops_on_ctrl_c(medium_chat_model):
    s = ServerProcess("--model", str(medium_chat_model), "--max-active", "2", "--max-queue", "1",
                      "--shutdown-timeout", "2")  # long enough for the draining checks below on a loaded machine
    try:
        s.wait_ready()
        rng = np.random.default_rng(0)
        got: dict = {}
        threads = [stream_in_thread(s.url, {"prompt": [1] + rng.integers(100, 30000, 200).tolist(), "max_tokens": 1800,
                                            "stream": True, "ignore_eos": True}, got, f"r{i}") for i in range(3)]

        def two_running_one_waiting():
            m = metrics(s.url)
            streaming = sum(1 for i in range(3) if got.get(f"r{i}.tokens", 0) >= 2)
            return (m["tinyllama_requests_running"], m["tinyllama_requests_waiting"], streaming) == (2, 1, 2)

        wait_until(two_running_one_waiting, timeout=180, what="two requests streaming and one waiting")

        # max-active 2 + max-queue 1 are in flight: the next request is refused with 503 and Retry-After
        r = httpx.post(s.url + COMPLETIONS, json={"prompt": PROMPT, "max_tokens": 2}, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_error" and "busy" in r.json()["error"]["message"]

        # /health is answered while the model steps the batch on its own thread: every answer comes back while the
        # streams are still mid-generation and the model ran meanwhile (no timing assumed)
        latencies = []
        tokens_before = metrics(s.url)["tinyllama_generation_tokens_total"]
        with httpx.Client(base_url=s.url, timeout=60) as h:
            for _ in range(20):
                started = time.perf_counter()
                assert h.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.025)
        m = metrics(s.url)
        assert m["tinyllama_generation_tokens_total"] > tokens_before + 5  # the model ran meanwhile
        assert (m["tinyllama_requests_running"], m["tinyllama_requests_waiting"]) == (2, 1)  # not after the batch
        assert all(got.get(f"r{i}.tokens", 0) < 1800 for i in range(3)), got
        latencies.sort()
        print(f"/health under load: median {1e3 * latencies[10]:.1f} ms, max {1e3 * latencies[-1]:.1f} ms")

        # Ctrl-C: draining (the listener open, /health and new requests 503), the requests in flight get 2 s,
        # then are cancelled; exit 0, and then nothing listens
        s.process.send_signal(signal.SIGINT)
        time.sleep(0.2)
        r = httpx.get(s.url + "/health", timeout=5)
        assert r.status_code == 503 and r.json() == {"status": "shutting down"}
        assert httpx.post(s.url + COMPLETIONS, json={"prompt": PROMPT, "max_tokens": 2}, timeout=5).status_code == 503
        assert s.process.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=5)
        for t in threads:
            t.join(30)
        for name in ("r0", "r1", "r2"):  # the one that waited for a place ends with no tokens, "abort" too
            events = got[name]
            assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "abort", name
        assert "Traceback" not in s.log and s.log.count("finish abort") == 3
    finally:
        s.stop()
