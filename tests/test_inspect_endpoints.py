"""The web page's server side, in process (FastAPI's TestClient, the real app and serving loop): POST
/v1/inspect/attention and /v1/inspect/lens give engine.inspect's numbers (Model.trace, head_summary, logit_lens) for
the conversation the chat template renders; their errors (400 naming the field, the trace limit, a backend that cannot
trace, 401 without the key); and GET / with its static files and Content-Security-Policy."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.inspect.attention import head_summary
from engine.inspect.lens import logit_lens
from tests.web_support import make_html_reply_checkpoint

pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402 - needs httpx

from engine.serve import create_app  # noqa: E402

NAME = "tiny-html"
KEY = "sk-page"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say <b>hi</b>"},
        {"role": "assistant", "content": "Hello! I am a tiny test model"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tinyllama_tokenizer_dir):
    return make_html_reply_checkpoint(tmp_path_factory.mktemp("html-reply"), tinyllama_tokenizer_dir, window=256)


@pytest.fixture(scope="module")
def model(folder):
    return engine.load_model(str(folder))


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(lambda: model, NAME, api_key=KEY)) as tc:
        assert tc.get("/health").status_code == 200 or _wait_ready(tc)
        yield tc


def _wait_ready(tc) -> bool:
    import time

    for _ in range(200):
        if tc.get("/health").status_code == 200:
            return True
        time.sleep(0.05)
    raise AssertionError("the app did not get ready")


def test_attention_equals_model_trace_and_head_summary(client, model):
    r = client.post("/v1/inspect/attention", json={"messages": CHAT, "layer": 1, "head": 2}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    ids = model.tokenizer.encode_chat(CHAT, add_generation_prompt=False)  # the reply is the last message
    assert [t["id"] for t in body["tokens"]] == ids
    assert [t["piece"] for t in body["tokens"]] == [model.tokenizer.id_to_token(i) for i in ids]
    assert (body["num_layers"], body["num_heads"], body["layer"], body["head"]) == (2, 4, 1, 2)
    expected = model.trace(ids, attentions=True).attentions[1][2]
    got = np.array(body["attention"], dtype=np.float32)
    assert got.shape == (len(ids), len(ids))
    np.testing.assert_array_equal(got, expected)  # float32 -> JSON -> float32 is exact
    summary = head_summary(model, ids)
    for name in ("to_first", "to_previous", "entropy"):
        np.testing.assert_array_equal(np.array(body["heads"][name]), getattr(summary, name))
    lean = client.post("/v1/inspect/attention", json={"messages": CHAT, "layer": 0, "head": 0, "summary": False},
                       headers=AUTH).json()
    assert "heads" not in lean
    np.testing.assert_array_equal(np.array(lean["attention"], np.float32), model.trace(ids, attentions=True,
                                                                                        layers=[0]).attentions[0][0])


def test_a_conversation_ending_with_the_user_gets_the_generation_prompt_and_ids_pass_through(client, model):
    messages = CHAT[:2]
    body = client.post("/v1/inspect/attention", json={"messages": messages, "summary": False}, headers=AUTH).json()
    assert [t["id"] for t in body["tokens"]] == model.tokenizer.encode_chat(messages)  # ends '<|assistant|>\n'
    ids = [1, 450, 4996, 17354, 1701]
    body = client.post("/v1/inspect/attention", json={"prompt": ids, "summary": False}, headers=AUTH).json()
    assert [t["id"] for t in body["tokens"]] == ids
    np.testing.assert_array_equal(np.array(body["attention"], np.float32),
                                  model.trace(ids, attentions=True).attentions[0][0])


def test_lens_equals_logit_lens(client, model):
    r = client.post("/v1/inspect/lens", json={"messages": CHAT}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    ids = model.tokenizer.encode_chat(CHAT, add_generation_prompt=False)
    expected = logit_lens(model, ids)
    assert [t["id"] for t in body["tokens"]] == ids
    assert body["rows"] == ["embeddings", "layer 0", "layer 1"]
    assert body["top_ids"] == expected.top_ids.tolist()
    assert body["top_pieces"] == [[model.tokenizer.id_to_token(int(t)) for t in row] for row in expected.top_ids]
    np.testing.assert_array_equal(np.array(body["top_probs"]), expected.top_probs)
    np.testing.assert_array_equal(np.array(body["next_probs"]), expected.next_probs)


@pytest.mark.parametrize("payload, param, words", [
    ({"messages": CHAT, "layer": 2}, "layer", "layers 0..1"),
    ({"messages": CHAT, "head": 4}, "head", "heads 0..3"),
    ({"messages": CHAT, "layer": -1}, "layer", "greater than or equal to 0"),
    ({"messages": CHAT, "prompt": "both"}, "messages", "either"),
    ({}, "messages", "either"),
    ({"prompt": [1]}, "prompt", "at least 2 tokens"),
    ({"prompt": [1, 32000]}, "prompt", "0..31999"),
    ({"prompt": [1] * 300}, "prompt", "256-token window"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "must be one of"),
])
def test_bad_requests_are_400_naming_the_field(client, payload, param, words):
    r = client.post("/v1/inspect/attention", json=payload, headers=AUTH)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_inspection_needs_the_api_key_and_the_served_model(client):
    for path in ("/v1/inspect/attention", "/v1/inspect/lens"):
        r = client.post(path, json={"messages": CHAT})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.post("/v1/inspect/lens", json={"messages": CHAT, "model": "other"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_an_inspection_above_the_memory_limit_is_a_400(model):
    """--trace-memory-limit bounds what an inspection holds (KV cache, arrays, its smallest slices) and its answer's
    size: one byte under what a request needs is a 400 trace_too_large, exactly that much runs."""
    from engine.serve.inspect_routes import AttentionRequest, InspectRequest, attention_job, lens_job

    needs = {"/v1/inspect/attention": attention_job(model, AttentionRequest(messages=CHAT), 1 << 40).bytes_needed,
             "/v1/inspect/lens": lens_job(model, InspectRequest(messages=CHAT), 1 << 40).bytes_needed}
    for path, needed in needs.items():
        with TestClient(create_app(lambda: model, NAME, trace_memory_limit=needed - 1)) as tc:
            _wait_ready(tc)
            r = tc.post(path, json={"messages": CHAT})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "trace_too_large" and "--trace-memory-limit" in error["message"]
            assert error["param"] == "messages"
        with TestClient(create_app(lambda: model, NAME, trace_memory_limit=needed)) as tc:
            _wait_ready(tc)
            assert tc.post(path, json={"messages": CHAT}).status_code == 200
            longer = CHAT + [{"role": "user", "content": "and more " * 20}]
            r = tc.post(path, json={"messages": longer})
            assert r.status_code == 400 and r.json()["error"]["code"] == "trace_too_large"


def test_the_triton_backend_is_refused_with_the_reason(folder, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's CPU interpreter: the real backend, no GPU
    try:
        triton_model = engine.load_model(str(folder), backend="triton", dtype="float32")
    except Exception as e:  # noqa: BLE001 - a machine where the interpreter cannot run
        pytest.skip(f"the Triton backend does not load here: {e}")
    with TestClient(create_app(lambda: triton_model, NAME)) as tc:
        _wait_ready(tc)
        for path in ("/v1/inspect/attention", "/v1/inspect/lens"):
            r = tc.post(path, json={"messages": CHAT})
            assert r.status_code == 400
            assert "numpy backend only" in r.json()["error"]["message"] and "triton" in r.json()["error"]["message"]


def test_the_page_and_its_files_are_served_with_a_content_security_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    tags = html_tags(r.text)
    assert ("script", {"type": "module", "src": "/static/app.js"}) in tags
    for tag, attributes in tags:  # what the policy would block: inline script, handlers, styles
        assert not any(name.startswith("on") or name == "style" for name in attributes), (tag, attributes)
        assert tag != "style" and (tag != "script" or "src" in attributes)
    for name, kind in (("app.js", "text/javascript"), ("api.js", "text/javascript"), ("app.css", "text/css"),
                       ("icon.svg", "image/svg+xml")):
        f = client.get(f"/static/{name}")
        assert f.status_code == 200 and f.headers["content-type"].startswith(kind), name
    for missing in ("/static/nothing.js", "/static/..%2Fpage.py", "/static/../page.py"):
        assert client.get(missing).status_code == 404, missing


def html_tags(html: str) -> list[tuple[str, dict]]:
    """Every start tag of a page as (name, attributes), read with the standard library's HTML parser."""
    from html.parser import HTMLParser

    tags = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, dict(attrs)))

    Parser().feed(html)
    return tags
