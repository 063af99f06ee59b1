"""`tinyllama serve` against a hostile or broken client: the real server in a subprocess on 127.0.0.1, driven with
httpx and raw sockets where the `openai` client cannot express the abuse (huge, deep, half-sent or malformed bodies,
stalled sockets, disconnects, SIGTERM mid-upload). Each case was a defect of the server (issues 28 and 34)."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
from multiprocessing.pool import ThreadPool
from pathlib import Path
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


def health_during(server, send_big, rounds: int = 10) -> list[httpx.Response]:
    """Send big requests (send_big() -> a response) one after the other while /health is asked in a loop, until a
    /health answer came back while a big request was in flight (asked after it was sent, answered before its
    answer) or `rounds` were sent -> the big requests' responses. Asserts every /health was a 200 and that one
    such answer came: the event loop answers while a big request is handled, not after it (no timing assumed)."""
    healths: list[tuple[float, float]] = []
    flights: list[tuple[float, float, httpx.Response]] = []

    def inside() -> bool:
        return any(s <= hs and he <= e for s, e, _ in flights for hs, he in list(healths))

    def send() -> None:
        while len(flights) < rounds and not inside():
            started = time.monotonic()
            r = send_big()
            flights.append((started, time.monotonic(), r))

    sender = threading.Thread(target=send)
    with httpx.Client(base_url=server.url, timeout=60) as h:
        sender.start()
        while sender.is_alive():
            started = time.monotonic()
            assert h.get("/health").status_code == 200
            healths.append((started, time.monotonic()))
            time.sleep(0.005)
    sender.join()
    assert inside(), f"no /health answer came back while one of {len(flights)} big requests was in flight"
    return [r for _, _, r in flights]


def test_health_stays_fast_while_multi_megabyte_prompts_are_refused(server):
    words = " ".join(f"w{i % 9973}x" for i in range(500_000))  # ~3.4 MB: under the cap, far over the window
    assert len(words) < MAX_REQUEST_MB * 2 ** 20
    big = json.dumps({"prompt": words}).encode()
    answers = health_during(server, lambda: post(server, COMPLETIONS, content=big))
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


# ==== issue 34: one client never crashes the server nor stalls the others ==========================================
KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"
AUTH_A, AUTH_B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
ATTENTION, LENS = "/v1/inspect/attention", "/v1/inspect/lens"
TRACE_LIMIT_MB = 320
# a fault planted in the server's process: the sampler of a request with the stop string "planted-step-bug" raises
# at its 4th token (a constraint or sampler bug in one sequence of a batched step)
PLANTED_STEP_BUG = """
from engine.generation.state import SequenceState
real_accept = SequenceState.accept
def accept(self, logits, context_length=None):
    if "planted-step-bug" in (self.options.stop_strings or ()) and len(self.generated) == 3:
        raise ValueError("a planted step bug")
    return real_accept(self, logits, context_length)
SequenceState.accept = accept
"""


@pytest.fixture(scope="module")
def strict_server(chat_model):
    """Small limits: 4 sequences at once, 8 waiting, two API keys, one inspection at a time, 320 MB per inspection."""
    s = ServerProcess("--model", str(chat_model), "--served-model-name", NAME, "--api-key", KEY_A, "--api-key", KEY_B,
                      "--max-active", "4", "--max-queue", "8", "--max-inspections", "1",
                      "--trace-memory-limit", str(TRACE_LIMIT_MB), env=ONE_THREAD, preamble=PLANTED_STEP_BUG)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def stream_events(url: str, path: str, body: dict, headers: dict, sink: list, timeout: float = 120) -> None:
    """POST a streaming request and append (time, parsed event or '[DONE]') to `sink` as each arrives."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, headers=headers, timeout=timeout) as r:
        sink.append((time.monotonic(), r.status_code))
        for line in r.iter_lines():
            if line.startswith("data: "):
                sink.append((time.monotonic(), "[DONE]" if line == "data: [DONE]" else json.loads(line[6:])))


def long_text(words: int) -> str:
    return " ".join(f"w{i % 997}x" for i in range(words))


# ---- defect 2: a fault in one sequence's step ends that sequence alone ---------------------------------------------
def test_a_fault_in_one_sequence_ends_it_alone_and_its_neighbour_streams_on(strict_server):
    s = strict_server
    victim: list = []
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}
    streamer = threading.Thread(target=stream_events, args=(s.url, COMPLETIONS, body, AUTH_A, victim), daemon=True)
    streamer.start()
    wait_for(lambda: len(victim) >= 3, what="the victim's first tokens")
    bad = httpx.post(s.url + COMPLETIONS, json={"prompt": "Hello", "max_tokens": 50, "stop": ["planted-step-bug"]},
                     headers=AUTH_A, timeout=60)
    failed_at = time.monotonic()
    assert bad.status_code == 500 and "internal error" in bad.json()["error"]["message"]
    assert "planted" not in bad.text  # the reason goes to the log, not to the client
    bad_stream: list = []
    stream_events(s.url, COMPLETIONS, {"prompt": "Hi", "max_tokens": 50, "stop": ["planted-step-bug"]}, AUTH_A,
                  bad_stream)
    assert bad_stream[-2][1]["error"]["type"] == "server_error" and bad_stream[-1][1] == "[DONE]"
    streamer.join(120)
    events = [e for _, e in victim[1:]]
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert victim[-1][0] > failed_at  # it was still streaming when its neighbour failed
    texts = "".join(e["choices"][0]["text"] for e in events[:-1])
    alone = httpx.post(s.url + COMPLETIONS, json=body, headers=AUTH_A, timeout=120).json()["choices"][0]["text"]
    assert texts == alone
    assert s.log.count("ValueError: a planted step bug") == 2  # each failure logged once, with its traceback


# ---- defects 4, 9: each choice of n counts toward --max-active and the queue ---------------------------------------
def test_n_choices_count_toward_max_active(strict_server):
    s = strict_server
    seen, done = [], threading.Event()

    def watch():
        while not done.is_set():
            seen.append(metrics(s.url).get("tinyllama_requests_running", 0))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    body = {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "n": 4}
    with ThreadPool(3) as pool:
        answers = pool.map(lambda b: httpx.post(s.url + COMPLETIONS, json=b, headers=AUTH_A, timeout=120),
                           [body, body, {"prompt": "Hi", "max_tokens": 5, "ignore_eos": True}])
    done.set()
    watcher.join()
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [len(r.json()["choices"]) for r in answers] == [4, 4, 1]
    assert max(seen) == 4, seen  # two requests of 4 choices never ran at once


def test_n_that_can_never_fit_is_a_400(strict_server):
    for n in (5, 16):
        r = httpx.post(strict_server.url + COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2, "n": n},
                       headers=AUTH_A, timeout=30)
        error = assert_openai_error(r, 400, "n")
        assert f"{n} choices" in error["message"] and "at most 4" in error["message"]
        assert "--max-active 4" in error["message"] and "retry-after" not in r.headers
    # the bound admission keeps, said at start: 4 sequences of 2 layers x 2 KV heads x 16 x 2048 positions, float32
    assert "up to 4 sequences at once: their KV cache takes at most 4 MB" in strict_server.log


# ---- defect 17: a client leaving an n > 1 request is a client gone, never a 503 -----------------------------------
def test_a_client_leaving_an_n_request_is_counted_as_gone(strict_server):
    s = strict_server
    before = metrics(s.url)

    def delta(name):
        return metrics(s.url).get(name, 0) - before.get(name, 0)

    body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "n": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(s.url + COMPLETIONS, json=body, headers=AUTH_A, timeout=httpx.Timeout(60, read=0.3))
    wait_for(lambda: delta('tinyllama_requests_finished_total{finish_reason="abort"}') == 2, what="the cancel")
    with httpx.stream("POST", s.url + COMPLETIONS, json={**body, "stream": True}, headers=AUTH_A, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # the first chunk: leave
    wait_for(lambda: delta('tinyllama_requests_finished_total{finish_reason="abort"}') == 4, what="the cancel")
    assert delta('tinyllama_clients_gone_total{stage="waiting"}') == 1
    assert delta('tinyllama_clients_gone_total{stage="streaming"}') == 1
    assert delta('tinyllama_request_errors_total{status="503"}') == 0


# ---- defect 10: the prefix cache does not tell one client what another sent ----------------------------------------
def test_the_prefix_cache_is_partitioned_by_api_key_and_cache_salt(strict_server):
    s = strict_server
    secret = "The password of the vault is " + long_text(60)

    def cached(headers, **extra):
        r = httpx.post(s.url + COMPLETIONS, json={"prompt": secret, "max_tokens": 1, **extra}, headers=headers,
                       timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(AUTH_A) == 0
    assert cached(AUTH_B) == 0  # another key: nothing of A's
    assert cached(AUTH_A) >= 48  # the same key: its own prompt
    assert cached(AUTH_A, cache_salt="conversation-1") == 0  # a salt: a partition of its own
    assert cached(AUTH_A, cache_salt="conversation-1") >= 48
    assert cached(AUTH_B, cache_salt="conversation-1") == 0  # the same salt under another key
    assert_openai_error(httpx.post(s.url + COMPLETIONS, json={"prompt": "a", "cache_salt": ""}, headers=AUTH_A,
                                   timeout=30), 400, "cache_salt")
    assert_openai_error(httpx.post(s.url + COMPLETIONS, json={"prompt": "a", "cache_salt": 5}, headers=AUTH_A,
                                   timeout=30), 400, "cache_salt")


# ---- defect 14: the inspect endpoints' strict types ----------------------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    (ATTENTION, {"prompt": [1, 450, 4996], "layer": True}, "layer"),
    (ATTENTION, {"prompt": [1, 450, 4996], "layer": 1.0}, "layer"),
    (ATTENTION, {"prompt": [1, 450, 4996], "head": "0"}, "head"),
    (ATTENTION, {"prompt": [1, 450, 4996], "summary": "yes"}, "summary"),
    (ATTENTION, {"prompt": [1, 450, 4996], "summary": 1}, "summary"),
    (ATTENTION, {"prompt": [1, True]}, "prompt"),
    (LENS, {"prompt": [1, 2.0]}, "prompt"),
    (LENS, {"prompt": [1, 450], "model": 5}, "model"),
])
def test_inspect_fields_have_strict_types(server, path, body, param):
    assert_openai_error(post(server, path, body), 400, param)


# ---- defect 3: inspection is bounded like generation ---------------------------------------------------------------
@pytest.mark.parametrize("path, field", [(ATTENTION, "prompt"), (LENS, "messages")])
def test_health_stays_fast_while_huge_inspections_are_refused(server, path, field):
    words = long_text(500_000)  # ~3.4 MB: under the body cap, far over the window
    body = {"prompt": words} if field == "prompt" else {"messages": [{"role": "user", "content": words}]}
    big = json.dumps(body).encode()
    answers = health_during(server, lambda: post(server, path, content=big))  # tokenizing on the loop: 6.7-8.2 s
    for r in answers:  # refused from its length alone, before it was tokenized
        error = assert_openai_error(r, 400, field, "context_length_exceeded")
        assert "at least" in error["message"] and f"{WINDOW}-token window" in error["message"]


def test_a_long_inspection_interleaves_with_streams(strict_server):
    """A whole-window attention summary runs in slices between decode steps: a stream started before it keeps
    receiving tokens while it runs (a trace in one piece froze it for the whole trace)."""
    s = strict_server
    victim: list = []
    body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
    streamer = threading.Thread(target=stream_events, args=(s.url, COMPLETIONS, body, AUTH_A, victim), daemon=True)
    streamer.start()
    wait_for(lambda: len(victim) >= 3, what="the victim's first tokens")
    started = time.monotonic()
    r = httpx.post(s.url + ATTENTION, json={"prompt": [1] + [450 + i % 300 for i in range(2040)], "layer": 1},
                   headers=AUTH_A, timeout=300)
    ended = time.monotonic()
    assert r.status_code == 200, r.text
    answer = r.json()
    assert len(answer["attention"]) == 2041 and len(answer["heads"]["entropy"]) == 2
    during = [t for t, e in victim if started < t < ended]
    streamer.join(300)
    assert victim[-1][1] == "[DONE]"
    if not victim[-1][0] > ended:
        pytest.skip("the victim finished before the inspection did: nothing to compare")
    # the tokens the victim received while the inspection ran came spread over it, not all at its end
    assert len(during) >= 20, (len(during), ended - started)
    assert max(b - a for a, b in zip([started] + during, during + [ended])) < 0.5 * (ended - started)


def test_inspections_beyond_the_limit_are_503_and_a_client_leaving_cancels_its_own(strict_server):
    s = strict_server
    before = metrics(s.url)
    long_lens = {"prompt": [1] + [450 + i % 300 for i in range(2040)]}
    result: dict = {}

    def first():
        result["r"] = httpx.post(s.url + LENS, json=long_lens, headers=AUTH_A, timeout=300)

    runner = threading.Thread(target=first)
    runner.start()
    wait_for(lambda: metrics(s.url)["tinyllama_inspections_running"] == 1 or "r" in result, timeout=60,
             what="the first inspection to start")
    busy = httpx.post(s.url + LENS, json={"prompt": [1, 450, 4996]}, headers=AUTH_A, timeout=60)
    runner.join(300)
    assert result["r"].status_code == 200 and len(result["r"].json()["top_ids"][0]) == 2041
    if busy.status_code != 503:
        pytest.skip("the first inspection ended before a second one was sent")
    error = assert_openai_error(busy, 503)
    assert busy.headers["retry-after"] == "1" and "--max-inspections" in error["message"]
    # a client that leaves frees its slot: its inspection is cancelled, not run to the end
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(s.url + LENS, json=long_lens, headers=AUTH_A, timeout=httpx.Timeout(60, read=0.5))
    wait_for(lambda: "went away during its inspection" in s.log, timeout=60, what="the cancel")
    after = metrics(s.url)
    assert after['tinyllama_clients_gone_total{stage="waiting"}'] == \
        before.get('tinyllama_clients_gone_total{stage="waiting"}', 0) + 1
    r = httpx.post(s.url + LENS, json={"prompt": [1, 450, 4996]}, headers=AUTH_A, timeout=60)
    assert r.status_code == 200


# ---- defect 6: --trace-memory-limit bounds the process's growth ----------------------------------------------------
def peak_growth(pid: int, action) -> int:
    """The most the process's resident memory rose above its level before `action()` (bytes), from VmHWM."""
    def status():
        text = Path(f"/proc/{pid}/status").read_text()
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in text.splitlines())
                if k in ("VmRSS", "VmHWM")}

    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the high-water mark restarts from the current size
    before = status()["VmRSS"]
    action()
    return status()["VmHWM"] - before


@pytest.mark.parametrize("path, body", [
    (LENS, {"prompt": [1] + [450 + i % 300 for i in range(1999)]}),
    (ATTENTION, {"prompt": [1] + [450 + i % 300 for i in range(1999)], "layer": 0}),
])
def test_an_inspection_grows_the_process_by_no_more_than_the_limit(strict_server, path, body):
    if not Path(f"/proc/{strict_server.process.pid}/clear_refs").exists():
        pytest.skip("needs Linux's /proc/PID/clear_refs")
    answers = []
    grown = peak_growth(strict_server.process.pid, lambda: answers.append(
        httpx.post(strict_server.url + path, json=body, headers=AUTH_A, timeout=300)))
    assert answers[0].status_code == 200, answers[0].text
    assert grown < TRACE_LIMIT_MB * 2 ** 20, grown / 2 ** 20
