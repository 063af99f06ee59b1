"""`tinyllama serve` against a hostile or broken client: the real server in a subprocess on 127.0.0.1, driven with
httpx and raw sockets where the `openai` client cannot express the abuse (huge, deep, half-sent or malformed bodies,
stalled sockets, disconnects, SIGTERM mid-upload). Each case was a defect of the server (issue 28)."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

from tests.conftest import make_random_checkpoint

httpx = pytest.importorskip("httpx")

from tests.serve_support import ServerProcess, metrics  # noqa: E402 - needs httpx

API_KEY = "sk-hostile"
NAME = "tiny-chat"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ONE_THREAD = {"TINYLLAMA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]
WINDOW = 2048
READ_TIMEOUT = 1.5
MAX_REQUEST_MB = 4
# a bug planted in the server's process: a completions request with user "planted-bug" raises (a 500)
PLANTED_BUG = """
import engine.serve.app as app
real_completion_job = app.completion_job
def completion_job(model, body):
    if body.user == "planted-bug":
        raise RuntimeError("a planted bug")
    return real_completion_job(model, body)
app.completion_job = completion_job
"""


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tinyllama_tokenizer_dir):
    return make_random_checkpoint(tmp_path_factory.mktemp("hostile-chat"), tokenizer_from=tinyllama_tokenizer_dir,
                                  vocab_size=32000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=WINDOW, seed=11)


@pytest.fixture(scope="module")
def server(chat_model):
    s = ServerProcess("--model", str(chat_model), "--served-model-name", NAME, "--api-key", API_KEY,
                      "--max-request-mb", str(MAX_REQUEST_MB), "--read-timeout", str(READ_TIMEOUT),
                      env=ONE_THREAD, preamble=PLANTED_BUG)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def post(server, path: str, body=None, content: bytes | None = None, timeout: float = 60) -> httpx.Response:
    """One request on a connection of its own (the server closes idle ones after READ_TIMEOUT)."""
    with httpx.Client(timeout=timeout) as c:
        return c.post(server.url + path, json=body, content=content, headers=AUTH)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    return error


# ---- raw HTTP/1.1 on a socket -----------------------------------------------------------------------------------
def connect(server) -> socket.socket:
    parts = urlsplit(server.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    return sock


def request_head(path: str, length: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response (with a Content-Length body) -> status, lower-cased headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed inside a response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes this connection within `within` seconds (reading whatever it sends first)."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def wait_for(condition, timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- 1. size: a body cap, and a huge prompt never stalls the event loop -------------------------------------------
def test_a_body_over_the_cap_is_413_in_openai_shape(server):
    big = b'{"prompt": "' + b"x" * (MAX_REQUEST_MB * 2 ** 20 + 10) + b'"}'
    error = assert_openai_error(post(server, COMPLETIONS, content=big), 413)
    assert f"{MAX_REQUEST_MB} MB" in error["message"] and "--max-request-mb" in error["message"]
    assert post(server, COMPLETIONS, {"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_health_stays_fast_while_multi_megabyte_prompts_are_refused(server):
    words = " ".join(f"w{i % 9973}x" for i in range(500_000))  # ~3.4 MB: under the cap, far over the window
    assert len(words) < MAX_REQUEST_MB * 2 ** 20
    answers = []

    def send_big():
        for _ in range(3):
            answers.append(post(server, COMPLETIONS, {"prompt": words}))

    sender = threading.Thread(target=send_big)
    latencies = []
    with httpx.Client(base_url=server.url, timeout=60) as h:
        sender.start()
        while sender.is_alive() or len(latencies) < 10:
            started = time.perf_counter()
            assert h.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    sender.join()
    latencies.sort()
    assert latencies[int(0.9 * len(latencies))] < 0.1, latencies
    for r in answers:  # refused from its length alone, before it was tokenized
        error = assert_openai_error(r, 400, "prompt", "context_length_exceeded")
        assert "prompt alone has at least" in error["message"] and f"{WINDOW} tokens" in error["message"]


# ---- 2, 3: bodies that are not valid Unicode text, or nested absurdly ----------------------------------------------
@pytest.mark.parametrize("path, raw, param", [
    (COMPLETIONS, r'{"prompt": "\ud800abc"}', "prompt"),
    (COMPLETIONS, r'{"prompt": "a", "stop": ["\udfff"]}', "stop[0]"),
    (CHAT, r'{"messages": [{"role": "user", "content": "hi \ud800"}]}', "messages[0].content"),
    (CHAT, r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}',
     "messages[0].content[0].text"),
])
def test_a_lone_surrogate_is_400_naming_the_field(server, path, raw, param):
    error = assert_openai_error(post(server, path, content=raw.encode()), 400, param)
    assert "surrogate" in error["message"]


def test_a_surrogate_pair_is_text(server):
    r = post(server, COMPLETIONS, content=rb'{"prompt": "smile \ud83d\ude00", "max_tokens": 2}')
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 2


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_400(server, depth):
    raw = '{"prompt": "a", "metadata": ' + "[" * depth + "]" * depth + "}"
    r = post(server, COMPLETIONS, content=raw.encode())
    assert r.status_code == 400 and "Traceback" not in r.text
    error = r.json()["error"]
    assert "nested too deeply" in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == (None if depth > 1000 else "metadata" + "[0]" * 63)  # the field, when it has a path


# ---- 4: a 500 leaves the keep-alive connection usable -------------------------------------------------------------
def test_the_next_request_on_a_keep_alive_connection_after_a_500_is_answered(server):
    bad = json.dumps({"prompt": "Hi", "max_tokens": 2, "user": "planted-bug"}).encode()
    good = json.dumps({"prompt": "Hi", "max_tokens": 2, "temperature": 0}).encode()
    with connect(server) as sock:
        sock.sendall(request_head(COMPLETIONS, len(bad)) + bad)
        status, headers, body = read_response(sock)
        assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
        assert "a planted bug" not in body.decode()  # the traceback goes to the log, never into a response
        assert headers.get("connection", "").lower() != "close"
        sock.sendall(request_head(COMPLETIONS, len(good)) + good)
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2
    assert server.log.count("RuntimeError: a planted bug") == 1  # logged once, with its traceback


# ---- 5, 6: clients going away are not server errors ---------------------------------------------------------------
def test_a_client_that_disconnects_during_its_upload_is_one_log_line(server):
    before = metrics(server.url)
    with connect(server) as sock:
        sock.sendall(request_head(COMPLETIONS, 100_000) + b'{"prompt": "' + b"a" * 1000)
        time.sleep(0.2)
    wait_for(lambda: "went away while sending its request" in server.log, what="the log line")
    after = metrics(server.url)
    assert after.get('tinyllama_clients_gone_total{stage="upload"}', 0) == \
        before.get('tinyllama_clients_gone_total{stage="upload"}', 0) + 1
    assert after.get('tinyllama_request_errors_total{status="500"}', 0) == \
        before.get('tinyllama_request_errors_total{status="500"}', 0)
    assert server.log.count("went away while sending its request") == 1
    assert "ClientDisconnect" not in server.log


def test_a_non_streaming_client_that_times_out_is_not_a_503(server):
    before = metrics(server.url)
    body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + COMPLETIONS, json=body, headers=AUTH, timeout=httpx.Timeout(60, read=0.3))

    def delta(name):
        return metrics(server.url).get(name, 0) - before.get(name, 0)

    wait_for(lambda: delta('tinyllama_requests_finished_total{finish_reason="abort"}') == 1, what="the cancel")
    assert delta('tinyllama_clients_gone_total{stage="waiting"}') == 1
    assert delta('tinyllama_request_errors_total{status="503"}') == 0


# ---- 9, 10, 12: messages that name the field, and OpenAI's strict types --------------------------------------------
BAD_FIELDS = [  # (path, body, param, code, a phrase of the message)
    (COMPLETIONS, {"prompt": [1] + [450] * 2100}, "prompt", "context_length_exceeded", "prompt alone has 2101"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 2100}]}, "messages", "context_length_exceeded",
     "messages alone has"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", None,
     "'text' field"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": True}, "max_tokens", None, "integer"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": "10"}, "max_tokens", None, "integer"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": 5.0}, "max_tokens", None, "integer"),
    (CHAT, {"messages": USER, "max_completion_tokens": 5.0}, "max_completion_tokens", None, "integer"),
    (COMPLETIONS, {"prompt": "a", "stream": "yes"}, "stream", None, "boolean"),
    (CHAT, {"messages": USER, "stream": 1}, "stream", None, "boolean"),
    (COMPLETIONS, {"prompt": "a", "stop": ""}, "stop", None, "empty"),
    (CHAT, {"messages": USER, "stop": ["x", ""]}, "stop", None, "empty"),
    (COMPLETIONS, {"prompt": "a", "top_k": 1e20}, "top_k", None, "integer"),
    (CHAT, {"messages": USER, "top_k": True}, "top_k", None, "integer"),
    (CHAT, {"messages": USER, "n": 1.0}, "n", None, "integer"),
    (CHAT, {"messages": USER, "seed": 1.5}, "seed", None, "integer"),
    (COMPLETIONS, {"prompt": "a", "seed": True}, "seed", None, "integer"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": "3"}, "top_logprobs", None, "integer"),
    (COMPLETIONS, {"prompt": "a", "logprobs": True}, "logprobs", None, "integer"),
    (CHAT, {"messages": USER, "logprobs": 1}, "logprobs", None, "boolean"),
    (COMPLETIONS, {"prompt": "a", "best_of": 1.0}, "best_of", None, "integer"),
    (COMPLETIONS, {"prompt": "a", "echo": 0}, "echo", None, "boolean"),
    (COMPLETIONS, {"prompt": "a", "ignore_eos": "true"}, "ignore_eos", None, "boolean"),
    (CHAT, {"messages": USER, "temperature": "0.5"}, "temperature", None, "number"),
    (CHAT, {"messages": USER, "temperature": True}, "temperature", None, "number"),
    (COMPLETIONS, {"prompt": "a", "top_p": "1"}, "top_p", None, "number"),
    (COMPLETIONS, {"prompt": "a", "presence_penalty": False}, "presence_penalty", None, "number"),
    (CHAT, {"messages": USER, "frequency_penalty": "0"}, "frequency_penalty", None, "number"),
    (CHAT, {"messages": USER, "min_p": True}, "min_p", None, "number"),
    (COMPLETIONS, {"prompt": "a", "repetition_penalty": "1.1"}, "repetition_penalty", None, "number"),
    (COMPLETIONS, {"prompt": "a", "stream": True, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage", None, "boolean"),
    (CHAT, {"messages": USER, "stream": True, "stream_options": {"continuous_usage_stats": "yes"}},
     "stream_options.continuous_usage_stats", None, "boolean"),
    (COMPLETIONS, {"prompt": [1, 2.0]}, "prompt", None, ""),
    (COMPLETIONS, {"prompt": [1, True]}, "prompt", None, ""),
]


@pytest.mark.parametrize("path, body, param, code, phrase", BAD_FIELDS,
                         ids=[f"{p.rsplit('/', 1)[1]}-{i}" for i, (p, *_) in enumerate(BAD_FIELDS)])
def test_bad_fields_are_400_naming_the_field(server, path, body, param, code, phrase):
    error = assert_openai_error(post(server, path, body), 400, param, code)
    assert phrase in error["message"]


def test_a_prompt_over_the_window_gives_both_numbers(server):
    error = assert_openai_error(post(server, COMPLETIONS, {"prompt": [1] * 2100}), 400, "prompt",
                                "context_length_exceeded")
    assert "2100" in error["message"] and f"{WINDOW} tokens" in error["message"] and "-" not in error["message"]


@pytest.mark.parametrize("raw, param", [(b'{"prompt": "a", "temperature": NaN}', None),
                                        (b'{"prompt": "a", "repetition_penalty": Infinity}', None),
                                        (b'{"prompt": "a", "repetition_penalty": 1e999}', "repetition_penalty")])
def test_nan_and_infinity_are_400(server, raw, param):
    assert_openai_error(post(server, COMPLETIONS, content=raw), 400, param)


def test_integers_as_numbers_and_huge_integers_are_fine(server):
    """OpenAI takes an integer where a number is due (temperature 1), and a huge top_k is simply no filter (a seed
    past int64 is refused, as OpenAI does: tests/test_serve.py)."""
    base = post(server, COMPLETIONS, {"prompt": "Hi", "max_tokens": 6, "temperature": 0})
    r = post(server, COMPLETIONS, {"prompt": "Hi", "max_tokens": 6, "temperature": 0, "top_p": 1, "top_k": 10 ** 30,
                                   "seed": -(2 ** 63)})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == base.json()["choices"][0]["text"]


# ---- 11: completions' logprobs tokens are the text -----------------------------------------------------------------
def test_completion_logprob_tokens_join_to_the_text(server):
    # this seed samples byte-fallback tokens: <0x50> ('P', a whole character) and a stray <0xBF>
    r = post(server, COMPLETIONS, {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 1.0, "seed": 0,
                                   "logprobs": 1, "ignore_eos": True}).json()
    text, lp = r["choices"][0]["text"], r["choices"][0]["logprobs"]
    assert "".join(t for t in lp["tokens"] if not t.startswith("bytes:")) == text
    for offset, token in zip(lp["text_offset"], lp["tokens"]):
        assert text[offset:].startswith("" if token.startswith("bytes:") else token)


def test_completion_logprob_tokens_of_newlines_and_split_characters(chat_model):
    """Byte-fallback tokens: a newline byte is a whole character; a character split over bytes is carried whole by
    the token that completes it, the others read 'bytes:\\x..' and take no room in the text."""
    import engine
    from engine.generation.state import TokenEvent, TokenLogprob
    from engine.serve.responses import Answer, TokenStrings

    tokenizer = engine.load_model(str(chat_model)).tokenizer
    text = "Hello\nworld — ok 😀!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert "<0x0A>" in [tokenizer.id_to_token(i) for i in ids] and "<0xF0>" in [tokenizer.id_to_token(i) for i in ids]
    for split in (1, 3, 7, len(ids)):  # as one response, and as stream chunks cut anywhere
        answer = Answer("completion", NAME, TokenStrings(tokenizer), logprobs=0)
        events = [TokenEvent(i, "", TokenLogprob(-1.0)) for i in ids + list(tokenizer.eos_ids[:1])]
        blocks = [answer.logprobs_block(events[k:k + split]) for k in range(0, len(events), split)]
        tokens = [t for b in blocks for t in b["tokens"]]
        offsets = [o for b in blocks for o in b["text_offset"]]
        prompt = tokenizer.encode("Once")  # the text of generated tokens as it reads after a prompt
        reference = tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)):]
        assert "".join(t for t in tokens if not t.startswith("bytes:")) == reference == " " + text
        assert tokens[1] == "\n" and tokens.count("😀") == 1 and tokens[-1] == ""  # EOS adds no text
        assert [t for t in tokens if t.startswith("bytes:")] == ["bytes:\\xf0", "bytes:\\x9f", "bytes:\\x98"]
        for offset, token in zip(offsets, tokens):
            assert reference[offset:].startswith("" if token.startswith("bytes:") else token)


# ---- 13: stalled sockets are closed; the docs are not open past the key --------------------------------------------
def test_stalled_connections_are_closed(server):
    silent = [connect(server) for _ in range(5)]
    half_lines = [connect(server) for _ in range(5)]
    for sock in half_lines:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: te")
    half_body = connect(server)
    half_body.sendall(request_head(COMPLETIONS, 100) + b'{"prompt": ')
    try:
        status, headers, body = read_response(half_body)  # the body's own deadline: 408, then the close
        assert status == 408 and headers["connection"] == "close" and json.loads(body)["error"]["message"]
        assert closed_by_server(half_body, within=5)
        for sock in silent + half_lines:  # the head's deadline
            assert closed_by_server(sock, within=READ_TIMEOUT + 5)
    finally:
        for sock in silent + half_lines + [half_body]:
            sock.close()


def test_the_docs_are_off_when_the_server_has_a_key(server, chat_model):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 404
        assert httpx.get(server.url + path, headers=AUTH).status_code == 404


def test_the_docs_are_served_without_a_key(chat_model):
    from fastapi.testclient import TestClient

    import engine
    from engine.serve import create_app

    with TestClient(create_app(lambda: engine.load_model(str(chat_model)), NAME)) as tc:
        assert tc.get("/openapi.json").status_code == 200 and tc.get("/docs").status_code == 200


# ---- 7, 8: SIGTERM drains: /health 503, new requests 503, in flight finish; a stalled upload is answered -----------
def test_sigterm_drains_and_answers_a_stalled_upload(chat_model):
    grace = 1.5
    s = ServerProcess("--model", str(chat_model), "--served-model-name", NAME, "--shutdown-timeout", str(grace),
                      env=ONE_THREAD)
    try:
        s.wait_ready()
        got: dict = {}

        def stream():
            body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", s.url + COMPLETIONS, json=body, timeout=60) as r:
                events = []
                for line in r.iter_lines():
                    if line:
                        events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
                        got["count"] = len(events)
                got["events"] = events

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        wait_for(lambda: got.get("count", 0) >= 2, what="the first tokens")
        stalled = connect(s)
        stalled.sendall(request_head(COMPLETIONS, 1000) + b'{"prompt": ')
        time.sleep(0.1)
        started = time.monotonic()
        s.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # draining: the listener is open, /health says so, a new request is refused, the stream goes on
        r = httpx.get(s.url + "/health", timeout=5)
        assert r.status_code == 503 and r.json() == {"status": "shutting down"}
        assert_openai_error(httpx.post(s.url + COMPLETIONS, json={"prompt": "a"}, timeout=5), 503)
        if "events" not in got:  # still streaming (a fast machine may have finished the 2000 tokens)
            count = got["count"]
            wait_for(lambda: got["count"] > count or "events" in got, timeout=grace, what="tokens while draining")
        # the stalled upload is answered when the grace period ends, and its connection closed
        status, headers, body = read_response(stalled)
        assert status == 503 and headers["connection"] == "close" and json.loads(body)["error"]["type"] == "server_error"
        assert closed_by_server(stalled, within=5)
        stalled.close()
        assert s.process.wait(30) == 0
        elapsed = time.monotonic() - started
        assert grace <= elapsed < grace + 2.5, elapsed
        streamer.join(10)
        events = got["events"]
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("abort", "length")
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=5)
        assert "Traceback" not in s.log and "CancelledError" not in s.log, s.log
    finally:
        s.stop()


# ---- the length bound that refuses a prompt before tokenizing it ---------------------------------------------------
def test_the_length_bound_never_exceeds_the_real_token_count(chat_model):
    import math

    import engine

    tokenizer = engine.load_model(str(chat_model)).tokenizer
    per_token = tokenizer.max_chars_per_token()
    pieces = sorted((tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)), key=len)
    assert per_token == len(pieces[-1]) == 16  # TinyLlama's longest piece
    tightest = "".join(p.replace("\u2581", " ") for p in pieces[-300:])  # the longest pieces back to back
    rng = __import__("random").Random(0)
    texts = [tightest, " " * 5000, "a" * 5000, "😀" * 300, "\n" * 300, "</s>" * 50,
             "".join(chr(rng.randrange(32, 0x3000)) for _ in range(3000))]
    for text in texts:
        ids = tokenizer.encode(text)
        assert len(ids) >= math.ceil(len(text) / per_token), text[:40]
        assert tokenizer.encode(text, threaded=True) == ids  # the GIL-releasing path gives the same ids


def test_no_length_bound_where_a_normalizer_can_merge_characters():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers

    from engine.text.tokenizer import Tokenizer

    for normalizer, pre_tokenizer in [(normalizers.NFKC(), None),
                                      (normalizers.Sequence([normalizers.Prepend("_"), normalizers.NFC()]), None),
                                      (normalizers.Replace("ab", "c"), None),
                                      (None, pre_tokenizers.WhitespaceSplit())]:
        hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
        if normalizer is not None:
            hf.normalizer = normalizer
        if pre_tokenizer is not None:
            hf.pre_tokenizer = pre_tokenizer
        assert Tokenizer(hf).max_chars_per_token() is None
    hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")], byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("_"), normalizers.Replace(" ", "_")])
    assert Tokenizer(hf).max_chars_per_token() == 2
