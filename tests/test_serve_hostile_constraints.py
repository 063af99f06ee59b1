"""Structured output against a hostile (or just ordinary) client: schemas that leave `additionalProperties` out,
constraints that crashed or stalled the server, unsatisfiable or out-of-range constraints, other servers' constraint
fields (issue 34's constraint defects, issue 36's schemas and fields). The real server runs in a subprocess on
127.0.0.1 with stories260K; crash reproductions run in a child server of their own so the suite survives a
regression."""
from __future__ import annotations

import json
import signal
import threading
import time

import pytest

import engine
from engine.cli.main import main

jsonschema = pytest.importorskip("jsonschema")
httpx = pytest.importorskip("httpx")

from tests.serve_support import ServerProcess  # noqa: E402 - needs httpx

COMPLETIONS = "/v1/completions"
ONE_THREAD = {"TINYLLAMA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
OPEN_KEYS = {"type": "object", "properties": {"result": {"type": "integer"}}}  # no additionalProperties
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def model(stories260k):
    return engine.load_model(str(stories260k))


@pytest.fixture(scope="module")
def server(stories260k):
    s = ServerProcess("--model", str(stories260k), "--served-model-name", "s", env=ONE_THREAD)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def post(server, body: dict, path: str = COMPLETIONS, timeout: float = 120) -> httpx.Response:
    with httpx.Client(timeout=timeout) as c:
        return c.post(server.url + path, json=body)


def assert_400(r: httpx.Response, param: str | None, *phrases: str) -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert "\n" not in error["message"] and all(p in error["message"] for p in phrases), error["message"]
    return error["message"]


def assert_closed_result(text: str) -> None:
    value = json.loads(text)
    jsonschema.validate(value, OPEN_KEYS)
    assert set(value) <= {"result"}, value


# ---- issue 36: an object schema without additionalProperties is closed -------------------------------------------
def test_objects_without_additional_properties_are_closed_in_the_python_api(model):
    for seed in range(5):
        r = model.complete(PROMPT, json_schema=OPEN_KEYS, temperature=1.0, seed=seed, max_new_tokens=100)
        assert r.stop_reason == "constraint_done", r
        assert_closed_result(r.text)


def test_additional_properties_true_still_opens_an_object(model):
    from engine.generation.state import default_options

    def accepts(schema, text: str) -> bool:
        state = default_options(model, json_schema=schema).constraint.start()
        ids = model.tokenizer.encode(text, add_special_tokens=False)
        ids = ids[1:] if model.tokenizer.id_to_token(ids[0]) == "\u2581" else ids  # SentencePiece's leading space
        return len(state.cut_draft(ids)) == len(ids)

    two_keys = '{"result":1,"other":2}'
    assert not accepts(OPEN_KEYS, two_keys) and accepts(OPEN_KEYS, '{"result":1}')
    assert accepts(dict(OPEN_KEYS, additionalProperties=True), two_keys)
    assert accepts(dict(OPEN_KEYS, additionalProperties={"type": "integer"}), two_keys)
    assert not accepts(dict(OPEN_KEYS, additionalProperties={"type": "string"}), two_keys)


def test_objects_are_closed_in_the_cli(stories260k, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(OPEN_KEYS))
    for seed in range(5):
        assert main(["generate", "--model", str(stories260k), "--json-schema", str(schema), "--temperature", "1",
                     "--seed", str(seed), "--max-new-tokens", "100", PROMPT]) == 0
        assert_closed_result(capsys.readouterr().out)


@pytest.mark.parametrize("field", ["guided_json", "structured_outputs"])
def test_objects_are_closed_in_the_server(server, field):
    constraint = {"guided_json": OPEN_KEYS} if field == "guided_json" else {"structured_outputs": {"json": OPEN_KEYS}}
    for seed in range(5):
        r = post(server, {"prompt": PROMPT, "temperature": 1.0, "seed": seed, "max_tokens": 100, **constraint})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        assert_closed_result(choice["text"])


# ---- a token with a character str.splitlines() breaks at (httpx's iter_lines) cut an event in two -----------------
def test_line_breaking_characters_in_the_text_keep_each_event_on_one_line(server):
    text = "a\u2028b\x85c\u2029d"  # JSON leaves these unescaped; httpx and the ollama client split lines at them
    body = {"prompt": PROMPT, "max_tokens": 20, "guided_choice": [text], "stream": True}
    parts = []
    with httpx.stream("POST", server.url + COMPLETIONS, json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line and line != "data: [DONE]":
                assert line.startswith("data: "), line
                parts.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(parts) == text


# ---- issue 34, defect 1: deep chains crashed the whole server (SIGSEGV inside llguidance) --------------------------
def ref_chain(n: int) -> dict:
    """The issue's schema: $defs d0 -> d1 -> ... -> dn, each an object whose property x refers to the next."""
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def rule_chain(n: int) -> str:
    """The issue's Lark grammar: rN: rN+1, n rules deep."""
    return "start: r0\n" + "\n".join(f"r{i}: r{i + 1}" for i in range(n)) + f'\nr{n}: "x"\n'


@pytest.fixture(scope="module")
def crash_server(stories260k):
    """A server of their own for the inputs that crashed the process: a regression kills this one only."""
    s = ServerProcess("--model", str(stories260k), env=ONE_THREAD)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


DEEP_CHAINS = [  # (body fields, param, the limit the message names)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": ref_chain(1000)}}},
     "response_format.json_schema.schema", "limit is 128"),
    ({"guided_json": ref_chain(1000)}, "guided_json", "limit is 128"),
    ({"guided_grammar": rule_chain(3000)}, "guided_grammar", "256 deep (the limit)"),
    ({"guided_grammar": rule_chain(4000)}, "guided_grammar", "256 deep (the limit)"),
    ({"guided_grammar": "start: %json " + json.dumps(ref_chain(1000))}, "guided_grammar", "limit is 128"),
]


@pytest.mark.parametrize("fields, param, limit", DEEP_CHAINS, ids=["response_format", "guided_json", "lark-3000",
                                                                  "lark-4000", "lark-json"])
def test_deep_chains_are_400_naming_the_limit(crash_server, fields, param, limit):
    assert len(json.dumps(fields)) > 35_000  # the sizes: 75 KB, 3,000 rules (39 KB)
    assert_400(post(crash_server, {"prompt": PROMPT, "max_tokens": 4, **fields}), param, limit)
    assert httpx.get(crash_server.url + "/health", timeout=10).status_code == 200
    assert crash_server.process.poll() is None


def test_constraints_at_the_limits_still_work(crash_server):
    """The limits leave room: a $ref chain 128 levels deep and a 256-rule chain compile and run."""
    r = post(crash_server, {"prompt": PROMPT, "max_tokens": 300, "guided_json": ref_chain(63)})  # 2 levels a link
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith('{"x":{"x":')
    r = post(crash_server, {"prompt": PROMPT, "max_tokens": 5, "guided_grammar": rule_chain(254)})  # start + 255 rules
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "x", r.text


# A server whose input limits are lifted, so the crashing inputs reach the compiler: its compile worker (a process
# of its own, with a small stack here) must die in the server's place. The time limit is short and one compile may
# wait, to show the compile bounds.
LIMITS_LIFTED = """
import engine.generation.constraint_compiler as compiler
import engine.generation.constraint_limits as limits
limits.MAX_SCHEMA_DEPTH = limits.MAX_JSON_NESTING = limits.MAX_GRAMMAR_DEPTH = 10 ** 9
limits.MAX_CONSTRAINT_BYTES = limits.MAX_CHOICES = 10 ** 9
compiler.WORKER_STACK_MB = 2
compiler.COMPILE_TIME_LIMIT = 4.0
compiler.MAX_WAITING = 1
"""


def lifted_server(stories260k, *args: str) -> ServerProcess:
    return ServerProcess("--model", str(stories260k), *args, env=ONE_THREAD, preamble=LIMITS_LIFTED).wait_ready()


@pytest.fixture(scope="module")
def unguarded(stories260k):
    s = lifted_server(stories260k)
    try:
        yield s
    finally:
        s.stop()


def test_a_native_crash_of_the_compiler_is_a_400_and_the_server_lives(unguarded):
    for fields, param in (({"guided_json": ref_chain(1000)}, "guided_json"),
                          ({"guided_grammar": rule_chain(3000)}, "guided_grammar")):
        message = assert_400(post(unguarded, {"prompt": PROMPT, "max_tokens": 4, **fields}), param,
                             "compiler failed on it", "SIGSEGV")
        assert "server was not affected" in message
        assert unguarded.process.poll() is None and httpx.get(unguarded.url + "/health").status_code == 200
        # the worker is back: a constraint compiles and holds; plain requests never noticed
        r = post(unguarded, {"prompt": PROMPT, "max_tokens": 100, "temperature": 1.0, "guided_json": OPEN_KEYS})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop", r.text
        assert_closed_result(r.json()["choices"][0]["text"])
        assert post(unguarded, {"prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert unguarded.log.count("crashed its compile worker (killed by SIGSEGV") == 2


# ---- defect 5: slow compiles starved the worker threads and stalled shutdown ---------------------------------------
HUGE_CHOICE = [f"option number {i:06d}" for i in range(100_000)]  # 2.2 MB; llguidance takes ~1 minute


def test_slow_compiles_are_bounded_and_never_delay_other_requests(unguarded):
    answers: dict[int, tuple[float, httpx.Response]] = {}

    def slow(i: int) -> None:
        r = post(unguarded, {"prompt": PROMPT, "max_tokens": 2, "guided_choice": HUGE_CHOICE})
        answers[i] = (time.monotonic(), r)

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the bodies are read and the compiles under way
    r = post(unguarded, {"prompt": PROMPT, "max_tokens": 1})
    quick_done = time.monotonic()
    assert r.status_code == 200 and httpx.get(unguarded.url + "/health").status_code == 200
    for t in threads:
        t.join(120)
    statuses = sorted(r.status_code for _, r in answers.values())
    assert len(statuses) == 8 and set(statuses) <= {400, 503} and statuses.count(503) >= 1, statuses
    for finished, r in answers.values():
        assert r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]
        if r.status_code == 503:  # more compiles than the threads and the waiting room: retry shortly
            assert r.headers["retry-after"] == "1" and "compiles are waiting" in r.json()["error"]["message"]
        else:  # the worker was stopped at the time limit; the quick request had its answer long before
            assert_400(r, "guided_choice", "longer than 4 s (the limit)")
            assert quick_done < finished


def test_sigterm_does_not_wait_for_compiles(stories260k):
    # no time limit that could end a compile first: HUGE_CHOICE compiles for about a minute, so a server that waited
    # for its compiles would answer them (a 400 or a 200) before it exits; one that does not answers 503 at once
    s = ServerProcess("--model", str(stories260k), "--shutdown-timeout", "1", env=ONE_THREAD,
                      preamble=LIMITS_LIFTED + "compiler.COMPILE_TIME_LIMIT = 3600.0\n").wait_ready()
    try:
        answers: list[httpx.Response] = []

        def slow() -> None:
            answers.append(post(s, {"prompt": PROMPT, "max_tokens": 2, "guided_choice": HUGE_CHOICE}, timeout=300))

        threads = [threading.Thread(target=slow) for _ in range(3)]  # two compiling, one waiting
        for t in threads:
            t.start()
        time.sleep(1.5)  # the bodies are read and the compiles under way (not asserted: a later start ends the same)
        s.process.send_signal(signal.SIGTERM)
        assert s.process.wait(120) == 0  # generous: a loaded machine; the old server waited ~51 s, then 500s
        for t in threads:
            t.join(120)
        assert len(answers) == 3
        for r in answers:  # cancelled, not compiled: JSON errors in OpenAI's shape, never a plain-text 500
            assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", r.text
            assert "shutting down" in r.json()["error"]["message"], r.text
        assert "to compile" not in s.log  # no compile ran to its end or its limit before the exit
    finally:
        s.stop()


# ---- defects 7, 8, 13, 15, 16: refused with a 400 naming the field ----------------------------------------------
BAD_CONSTRAINTS = [  # (body fields, param, phrases of the message)
    ({"guided_json": {"type": "integer", "minimum": 1e30, "maximum": 1e30 + 5}}, "guided_json", ("2**53",)),
    ({"guided_regex": r"[^\s\S]"}, "guided_regex", ("no text",)),
    ({"guided_grammar": "start: a\na: a"}, "guided_grammar", ("no text",)),
    ({"guided_json": {"$ref": "#"}}, "guided_json", ("no text",)),
    ({"guided_json": "[" * 1500 + "]" * 1500}, "guided_json", ("nested too deeply",)),
    ({"guided_json": '{"a":' * 100_000 + "1" + "}" * 100_000}, "guided_json", ("nested too deeply",)),
    ({"structured_outputs": {"json": "[" * 100 + "]" * 100}}, "structured_outputs.json", ("nested too deeply",)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": False}}},
     "response_format.json_schema.schema", ("must be a JSON object", "false")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
     "response_format.json_schema.schema", ("must be a JSON object",)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 0}}},
     "response_format.json_schema.schema", ("must be a JSON object",)),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object", ("boolean",)),
    ({"guided_choice": [f"o{i}" for i in range(70_000)]}, "guided_choice", ("70,000 options", "limit")),
]


@pytest.mark.parametrize("fields, param, phrases", BAD_CONSTRAINTS, ids=[
    "int-past-2**53", "empty-regex", "self-rule", "self-ref", "json-text-1500-deep", "json-text-100000-deep",
    "structured-json-text-deep", "schema-false", "schema-list", "schema-0", "json_object-yes", "70k-choices"])
def test_bad_constraints_are_400_naming_the_field(server, fields, param, phrases):
    message = assert_400(post(server, {"prompt": PROMPT, "max_tokens": 4, **fields}), param, *phrases)
    assert len(message) < 400 and not any(w in message.lower() for w in ("panic", "backtrace", ".rs:", "traceback"))


def test_a_compiler_panic_becomes_one_line_without_internals():
    """llguidance's own text for 70,000 choices (recorded from a run): a Rust panic with a backtrace."""
    from engine.generation.constraints import one_line_error

    panic = ("panic: assertion failed: grammar.symbols.len() < u16::MAX as usize - 10\n<backtrace>\n"
             + "".join(f"  {i}: <unknown>\n" for i in range(40))
             + "  at /root/.cargo/registry/src/index.crates.io-6f17d22bba15001f/llguidance-1.0.0/src/earley/"
               "grammar.rs:412\n")
    message = one_line_error(panic)
    assert "\n" not in message and "panic" not in message and "backtrace" not in message and ".rs" not in message
    assert "make the constraint smaller or simpler" in message


@pytest.mark.slow
def test_a_real_compiler_panic_is_a_one_line_constraint_error(model):
    from engine.generation.constraint_limits import MAX_CONSTRAINT_BYTES
    from engine.generation.constraints import ConstraintError, compile_constraint

    n = 70_000  # past llguidance's 65,525 grammar symbols: it panics (~5 s)
    grammar = "start: " + " | ".join(f"a{i}" for i in range(n)) + "\n" + "\n".join(f'a{i}: "x"' for i in range(n))
    assert len(grammar) > MAX_CONSTRAINT_BYTES  # the size limit refuses it before it gets here
    with pytest.raises(ConstraintError) as e:
        compile_constraint(model.tokenizer, 512, (2,), "grammar", grammar)
    assert "\n" not in str(e.value) and "panic" not in str(e.value) and "backtrace" not in str(e.value)


# ---- defect 11: response_format on /v1/completions is applied --------------------------------------------------
@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": {"name": "r", "schema": OPEN_KEYS}},
    {"type": "json_object", "schema": OPEN_KEYS},  # llama.cpp's form
    {"type": "json_schema", "schema": OPEN_KEYS},  # llama.cpp's form
])
def test_response_format_applies_to_completions(server, response_format):
    for seed in range(3):
        r = post(server, {"prompt": PROMPT, "temperature": 1.0, "seed": seed, "max_tokens": 100,
                          "response_format": response_format})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop", r.text
        assert_closed_result(r.json()["choices"][0]["text"])


def test_json_object_applies_to_completions(server):
    r = post(server, {"prompt": PROMPT, "seed": 1, "max_tokens": 60, "response_format": {"type": "json_object"}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("{"), r.text


# ---- issue 36: other servers' constraint fields -------------------------------------------------------------------
@pytest.mark.parametrize("fields, pattern", [
    ({"grammar": 'root ::= "id-" [0-9] [0-9]'}, r"id-[0-9]{2}"),  # llama.cpp's GBNF
    ({"grammar": {"type": "regex", "value": "[a-c]{3}!"}}, r"[a-c]{3}!"),  # TGI's
    ({"regex": "[0-9]{2}:[0-9]{2}"}, r"[0-9]{2}:[0-9]{2}"),  # SGLang's
    ({"ebnf": 'root ::= "yes" | "no"'}, r"yes|no"),  # SGLang's
])
def test_other_servers_grammar_fields_are_applied(server, fields, pattern):
    import re

    for seed in range(3):
        r = post(server, {"prompt": PROMPT, "temperature": 1.0, "seed": seed, "max_tokens": 20, **fields})
        assert r.status_code == 200, r.text
        assert re.fullmatch(pattern, r.json()["choices"][0]["text"]), r.json()["choices"][0]["text"]


@pytest.mark.parametrize("fields", [{"json_schema": OPEN_KEYS}, {"json_schema": json.dumps(OPEN_KEYS)},
                                    {"grammar": {"type": "json", "value": OPEN_KEYS}}])
def test_other_servers_schema_fields_are_applied(server, fields):
    r = post(server, {"prompt": PROMPT, "temperature": 1.0, "seed": 2, "max_tokens": 100, **fields})
    assert r.status_code == 200, r.text
    assert_closed_result(r.json()["choices"][0]["text"])


@pytest.mark.parametrize("fields, param", [
    ({"grammar_lazy": True, "grammar": 'root ::= "x"'}, "grammar_lazy"),
    ({"grammar_triggers": [{"type": "word", "value": "<tool_call>"}]}, "grammar_triggers"),
    ({"grammar": 5}, "grammar"),
    ({"grammar": {"type": "xml", "value": "x"}}, "grammar.type"),
    ({"json_schema": [1]}, "json_schema"),
    ({"response_format": {"type": "json_object", "schema": "yes"}}, "response_format.schema"),
    ({"grammar": 'root ::= "a"', "guided_regex": "b"}, "grammar"),
    ({"structured_outputs": {"whitespace_pattern": " *"}}, "structured_outputs.whitespace_pattern"),
])
def test_other_servers_fields_we_cannot_honour_are_400(server, fields, param):
    assert_400(post(server, {"prompt": PROMPT, "max_tokens": 4, **fields}), param)
