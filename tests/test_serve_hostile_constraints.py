"""Structured output against a hostile (or just ordinary) client: schemas that leave `additionalProperties` out,
constraints that crashed or stalled the server, unsatisfiable or out-of-range constraints, other servers' constraint
fields (issue 34's constraint defects, issue 36's schemas and fields). The real server runs in a subprocess on
127.0.0.1 with stories260K; crash reproductions run in a child server of their own so the suite survives a
regression."""
from __future__ import annotations

import json

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
