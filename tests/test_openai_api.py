"""The OpenAI API as harnesses and other clients use it, end to end against the real `tinyllama serve`: echo and
prompt log-probabilities, lists of prompts, logprobs 0, logit_bias, embeddings, /tokenize and /detokenize, the routes
without /v1, model aliases and vLLM's metric names. Driven with the official `openai` client (httpx where the client
hides the wire) and checked against transformers (log-probabilities, hidden states) and `tokenizers` on the same
checkpoint: a small random Llama with TinyLlama's real tokenizer and chat template."""
from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest

import engine
from tests.conftest import load_reference, make_random_checkpoint, reference_logits

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tests.serve_support import ServerProcess, metrics  # noqa: E402 - needs httpx

NAME, ALIASES = "tiny", ("alias-one", "alias-two")
MAX_ACTIVE, MAX_QUEUE = 4, 6
ONE_THREAD = {"TINYLLAMA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
TEXT = "The quick brown fox jumps over the lazy dog. Naïve café, 東京!"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tinyllama_tokenizer_dir):
    return make_random_checkpoint(tmp_path_factory.mktemp("openai-api"), tokenizer_from=tinyllama_tokenizer_dir,
                                  vocab_size=32000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256, seed=5)


@pytest.fixture(scope="module")
def server(folder):
    s = ServerProcess("--model", str(folder), "--served-model-name", NAME, *ALIASES, "--max-active", str(MAX_ACTIVE),
                      "--max-queue", str(MAX_QUEUE), env=ONE_THREAD)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def model(folder):
    return engine.load_model(str(folder))


@pytest.fixture(scope="module")
def reference(folder):
    return load_reference(folder)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def log_softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def sse_events(response: httpx.Response) -> list[dict]:
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# ---- scoring: echo, prompt_logprobs, lists of prompts ---------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_the_prompt_with_transformers_log_probabilities(client, model, reference, max_tokens):
    """lm-evaluation-harness' request: echo + logprobs (+ max_tokens 1): every prompt token's log-probability."""
    ids = model.tokenizer.encode(TEXT)
    r = client.completions.create(model=NAME, prompt=TEXT, echo=True, logprobs=3, max_tokens=max_tokens,
                                  temperature=0)
    choice = r.choices[0]
    generated = model.generate(ids, max_new_tokens=max_tokens) if max_tokens else []
    rows = log_softmax64(reference_logits(reference, ids + generated))
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [rows[j - 1][t] for j, t in enumerate(ids + generated) if j]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    for j, top in enumerate(lp.top_logprobs[1:], start=1):
        best = np.sort(rows[j - 1])[::-1][:3]
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(best, abs=1e-4)
        assert lp.token_logprobs[j] in top.values()  # the prompt's own token is always listed
    assert choice.text == TEXT + (model.complete(ids, max_new_tokens=max_tokens).text if max_tokens else "")
    assert "".join(t for t in lp.tokens[:len(ids)] if not t.startswith("bytes:")) == TEXT
    for offset, token in zip(lp.text_offset, lp.tokens):
        assert token.startswith("bytes:") or choice.text[offset:].startswith(token)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), max_tokens)
    assert choice.finish_reason == "length"


def test_a_list_of_prompts_is_one_choice_each_in_order_batched(server, client, model):
    """Token-id prompts (as lm-eval sends them) and text prompts; n choices each, index = prompt * n + choice."""
    texts = ["Once upon a time", "A", "The cat sat on the mat and looked at the"]
    prompts = [model.tokenizer.encode(t) for t in texts]
    singles = [client.completions.create(model=NAME, prompt=p, echo=True, logprobs=1, max_tokens=3, temperature=0)
               for p in prompts]
    for prompt in (prompts, texts):
        r = client.completions.create(model=NAME, prompt=prompt, echo=True, logprobs=1, max_tokens=3, temperature=0,
                                      n=2)
        assert [c.index for c in r.choices] == list(range(6))
        for c in r.choices:
            single = singles[c.index // 2].choices[0]
            assert c.logprobs.token_logprobs[1:] == pytest.approx(single.logprobs.token_logprobs[1:], abs=1e-5)
            assert c.text.endswith(single.text[len(texts[c.index // 2]):])
        assert r.usage.prompt_tokens == sum(map(len, prompts)) and r.usage.completion_tokens == 18
    body = {"model": NAME, "prompt": texts, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    events = sse_events(post(server, "/v1/completions", body))
    streamed = {}
    for e in events[:-1]:
        for c in e["choices"]:
            streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    whole = client.completions.create(model=NAME, prompt=texts, max_tokens=4, temperature=0)
    assert streamed == {c.index: c.text for c in whole.choices}
    assert events[-1]["usage"]["prompt_tokens"] == sum(map(len, prompts))


def test_every_prompt_of_a_list_is_constrained(server):
    r = post(server, "/v1/completions", {"prompt": ["Is it red?", "Is it blue?"], "guided_choice": ["yes", "no"],
                                         "n": 2, "temperature": 1, "seed": 3})
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert {c["text"] for c in r.json()["choices"]} <= {"yes", "no"}


def test_a_list_of_prompts_counts_toward_admission(server):
    too_many = [[1, 450]] * (MAX_ACTIVE + MAX_QUEUE + 1)
    r = post(server, "/v1/completions", {"prompt": too_many, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(server, "/v1/completions", {"prompt": too_many[1:], "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == MAX_ACTIVE + MAX_QUEUE


def test_prompt_logprobs_in_vllm_shape(server, model, reference):
    ids = model.tokenizer.encode(TEXT)
    rows = log_softmax64(reference_logits(reference, ids))
    for stream in (False, True):
        r = post(server, "/v1/completions", {"prompt": ids, "prompt_logprobs": 2, "max_tokens": 1, "stream": stream})
        choices = [c for e in sse_events(r) for c in e["choices"]] if stream else r.json()["choices"]
        scores = next(c["prompt_logprobs"] for c in choices if "prompt_logprobs" in c)
        assert len(scores) == len(ids) and scores[0] is None
        for j, entry in enumerate(scores[1:], start=1):
            row = rows[j - 1]
            order = np.argsort(-row, kind="stable")
            mine = entry[str(ids[j])]
            assert mine["logprob"] == pytest.approx(row[ids[j]], abs=1e-4)
            assert mine["rank"] == 1 + int((row > row[ids[j]] + 1e-7).sum())
            for rank, t in enumerate(order[:2], start=1):
                assert entry[str(t)]["rank"] == rank and entry[str(t)]["logprob"] == pytest.approx(row[t], abs=1e-4)
            assert set(entry) == {str(t) for t in order[:2]} | {str(ids[j])}


def test_logprobs_zero_gives_the_sampled_token(client):
    r = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, logprobs=0, temperature=1,
                                  seed=7)
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs) == 6
    for top, value in zip(lp.top_logprobs, lp.token_logprobs):
        assert list(top.values()) == [value]


# ---- sampling fields ------------------------------------------------------------------------------------------------
def test_logit_bias_on_both_endpoints(client, model):
    prompt_ids = model.tokenizer.encode("Once upon a time")
    chat_ids = model.tokenizer.encode_chat(MESSAGES)
    for ids, ask in ((prompt_ids, lambda **kw: client.completions.create(model=NAME, prompt="Once upon a time", **kw)),
                     (chat_ids, lambda **kw: client.chat.completions.create(model=NAME, messages=MESSAGES, **kw))):
        greedy = model.generate(ids, max_new_tokens=6)
        banned = {str(t): -100 for t in set(greedy)}
        expected = model.complete(ids, max_new_tokens=6, temperature=0,
                                  logit_bias=tuple((int(t), -100.0) for t in banned))
        assert not set(expected.token_ids) & set(greedy)
        r = ask(max_tokens=6, temperature=0, logit_bias=banned)
        text = r.choices[0].text if hasattr(r.choices[0], "text") else r.choices[0].message.content
        assert text == expected.text
        forced = model.tokenizer.encode("zebra", add_special_tokens=False)[-1]
        expected = model.complete(ids, max_new_tokens=5, temperature=1, seed=1, logit_bias=((forced, 100.0),))
        assert expected.token_ids == [forced] * 5
        r = ask(max_tokens=5, temperature=1, seed=1, logit_bias={str(forced): 100})
        text = r.choices[0].text if hasattr(r.choices[0], "text") else r.choices[0].message.content
        assert text == expected.text


def test_continuous_usage_stats_needs_include_usage(server):
    body = {"model": NAME, "prompt": "Once", "max_tokens": 4, "stream": True,
            "stream_options": {"continuous_usage_stats": True}}
    assert all("usage" not in e for e in sse_events(post(server, "/v1/completions", body)))
    body["stream_options"]["include_usage"] = True
    assert all(e["usage"] is not None for e in sse_events(post(server, "/v1/completions", body)))


# ---- routes and names -----------------------------------------------------------------------------------------------
def test_routes_without_v1_and_model_aliases(server):
    bare = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in bare.models.list()] == [NAME, *ALIASES]
    assert bare.models.retrieve(ALIASES[1]).id == ALIASES[1]
    for name in (NAME, *ALIASES):
        r = bare.completions.create(model=name, prompt="Once", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
    assert bare.chat.completions.create(model=ALIASES[0], messages=MESSAGES, max_tokens=2).choices[0].message.role \
        == "assistant"
    with pytest.raises(openai.NotFoundError):
        bare.completions.create(model="gpt-4o", prompt="Once", max_tokens=2)
    assert len(bare.embeddings.create(model=NAME, input="Once").data) == 1


def test_metrics_under_vllm_names(server, folder):
    def read():
        m = metrics(server.url)
        label = f'{{model_name="{NAME}"}}'
        return (m[f"vllm:num_requests_running{label}"], m[f"vllm:num_requests_waiting{label}"],
                m[f"vllm:kv_cache_usage_perc{label}"], m["tinyllama_requests_running"])

    done = threading.Event()
    streamer = threading.Thread(target=lambda: (post(server, "/v1/completions", {
        "prompt": "Once", "max_tokens": 200, "ignore_eos": True}), done.set()))
    streamer.start()
    seen = None
    while not done.is_set():
        running, waiting, usage, ours = read()
        if running == 1 and usage > 0:
            seen = (running, waiting, usage, ours)
            break
    streamer.join()
    assert seen is not None, "never saw the request running"
    assert seen[3] == 1 and 0 < seen[2] <= 1 / MAX_ACTIVE  # one sequence of at most a full window
    deadline = time.monotonic() + 30  # the loop counts after delivering the last token: allow it a moment
    while read()[:3] != (0, 0, 0):
        assert time.monotonic() < deadline, read()
        time.sleep(0.05)


# ---- embeddings -----------------------------------------------------------------------------------------------------
def test_embeddings_with_the_openai_client_match_transformers(client, server, model, folder):
    base = transformers.LlamaModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()

    def expected(ids):
        with torch.no_grad():
            states = base(torch.tensor([ids])).last_hidden_state[0].double().numpy()
        vector = states.mean(axis=0)
        return vector / np.linalg.norm(vector)

    texts = ["Once upon a time", "A completely different sentence about dogs."]
    ids = [model.tokenizer.encode(t) for t in texts]
    for given, inputs in ((texts[0], ids[:1]), (texts, ids), (ids[0], ids[:1]), (ids, ids)):
        for fmt in ({}, {"encoding_format": "float"}):  # by default the client asks for base64 and decodes it
            r = client.embeddings.create(model=NAME, input=given, **fmt)
            assert [d.index for d in r.data] == list(range(len(inputs)))
            for d, i in zip(r.data, inputs):
                vector = np.asarray(d.embedding)
                assert vector.shape == (64,) and np.linalg.norm(vector) == pytest.approx(1, abs=1e-5)
                np.testing.assert_allclose(vector, expected(i), atol=1e-5)
            assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, inputs))
    raw = post(server, "/v1/embeddings", {"input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, expected(ids[0]), atol=1e-5)
    plain = post(server, "/v1/embeddings", {"input": ids[0], "normalize": False}).json()["data"][0]["embedding"]
    assert np.linalg.norm(plain) != pytest.approx(1, abs=1e-3)
    bad = (({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [[1, 2], [1, 32000]]}, "input[1]"),
           ({"input": "x", "dimensions": 8}, "dimensions"), ({"input": "x", "encoding_format": "hex"}, "encoding_format"))
    for body, param in bad:
        r = post(server, "/v1/embeddings", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ---- tokenize -------------------------------------------------------------------------------------------------------
def test_tokenize_and_detokenize_in_llama_cpp_and_vllm_shapes(server, folder, model):
    reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    plain = reference.encode(TEXT, add_special_tokens=False)
    with_bos = reference.encode(TEXT)
    # llama.cpp: content, add_special (default false), with_pieces
    assert post(server, "/tokenize", {"content": TEXT}).json()["tokens"] == plain.ids
    assert post(server, "/tokenize", {"content": TEXT, "add_special": True}).json()["tokens"] == with_bos.ids
    pieces = post(server, "/tokenize", {"content": TEXT, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == plain.ids
    raw = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert raw.decode("utf-8").lstrip(" ") == TEXT
    # vLLM: prompt (add_special_tokens default true), return_token_strs; messages through the chat template
    r = post(server, "/tokenize", {"model": NAME, "prompt": TEXT, "return_token_strs": True}).json()
    assert r["tokens"] == with_bos.ids and r["count"] == len(with_bos.ids) and r["token_strs"] == with_bos.tokens
    assert r["max_model_len"] == 256
    chat = post(server, "/tokenize", {"model": NAME, "messages": MESSAGES}).json()
    assert chat["tokens"] == model.tokenizer.encode_chat(MESSAGES)
    # detokenize: both servers' field names, special tokens kept
    text = post(server, "/detokenize", {"tokens": with_bos.ids}).json()
    assert text["content"] == text["prompt"] == reference.decode(with_bos.ids, skip_special_tokens=False)
    for path, body, param in (("/tokenize", {}, "content"), ("/tokenize", {"content": "a", "prompt": "b"}, "content"),
                              ("/detokenize", {"tokens": [32000]}, "tokens"), ("/detokenize", {}, "tokens")):
        r = post(server, path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
