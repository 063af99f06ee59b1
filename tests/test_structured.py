"""Structured output (JSON Schema, regex, choice, grammar): exact masking checked against masks this test computes
itself from the tokenizer's vocabulary, validity checked with jsonschema / re, the Python API, the CLI, and the real
server driven by the official `openai` client."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Annotated, Literal

import numpy as np
import pytest

import engine
from engine.cli.main import main
from engine.generation.constraints import ConstraintError
from engine.generation.generate import generate_batch
from engine.generation.sampling import SamplingParams, sample_token
from engine.generation.scheduler import Scheduler
from engine.generation.state import default_options
from tests.conftest import REPO

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pydantic = pytest.importorskip("pydantic")

from tests.serve_support import ServerProcess  # noqa: E402 - needs httpx

SCHEMA = {  # every value bounded: a random model finishes within max_new_tokens
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,5}$"}, "maxItems": 3},
        "home": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                  "indoor": {"type": "boolean"}},
                 "required": ["zip", "indoor"], "additionalProperties": False},
    },
    "required": ["name", "age", "kind", "tags", "home"],
    "additionalProperties": False,
}
WORD = "[a-z]{3,8}"
COLOURS = ["red apple", "green", "blue sky", "greenish"]
API_KEY = "sk-structured"


@pytest.fixture(scope="module")
def model(tiny_chat_model):
    return engine.load_model(str(tiny_chat_model))


@pytest.fixture(scope="module")
def token_bytes(tiny_chat_model):
    """Each token's bytes as the test reads them from tokenizer.json (SentencePiece pieces: '▁' is a space, <0xNN> a
    byte); None for the special tokens."""
    data = json.loads((tiny_chat_model / "tokenizer.json").read_text())
    table: list[bytes | None] = [None] * 32000
    for piece, i in data["model"]["vocab"].items():
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        table[i] = bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()
    for added in data["added_tokens"]:
        table[added["id"]] = None
    return table


def allowed_by_test(token_bytes, text: bytes, viable, complete, eos: int = 2) -> np.ndarray:
    """(vocab,) bool computed here by brute force: tokens whose bytes keep `text` a viable prefix, and EOS when
    `text` is complete."""
    allowed = np.array([b is not None and viable(text + b) for b in token_bytes])
    allowed[eos] = complete(text)
    return allowed


def word_rules():
    return (lambda b: re.fullmatch(rb"[a-z]{0,8}", b) is not None,
            lambda b: re.fullmatch(rb"[a-z]{3,8}", b) is not None)


def choice_rules():
    choices = [c.encode() for c in COLOURS]
    return (lambda b: any(c.startswith(b) for c in choices), lambda b: b in choices)


@pytest.mark.parametrize("kind", ["regex", "choice"])
def test_greedy_picks_the_best_allowed_token_at_every_step(model, token_bytes, kind):
    viable, complete = word_rules() if kind == "regex" else choice_rules()
    constraint = {"regex": WORD} if kind == "regex" else {"choice": COLOURS}
    prompt = model.prompt_ids("The answer is")
    r = model.complete(prompt, max_new_tokens=12, temperature=0, **constraint)
    assert r.stop_reason in ("eos", "constraint_done")
    text = b""
    for i, token in enumerate(r.token_ids):
        logits = model.logits(prompt + r.token_ids[:i])[-1]
        allowed = allowed_by_test(token_bytes, text, viable, complete)
        assert allowed.any()
        assert token == int(np.argmax(np.where(allowed, logits, -np.inf))), f"step {i}"
        if token != 2:
            text += token_bytes[token]
    assert complete(text) and text.decode() == r.text


@pytest.mark.parametrize("kind", ["regex", "choice"])
def test_the_mask_is_exactly_the_allowed_set(model, token_bytes, kind):
    """The engine's mask at each step of a sampled output equals the brute-force set, and a seeded sample equals the
    test's own draw from the raw logits masked by that set."""
    viable, complete = word_rules() if kind == "regex" else choice_rules()
    constraint = {"regex": WORD} if kind == "regex" else {"choice": COLOURS}
    prompt = model.prompt_ids("Say something:")
    options = default_options(model, max_new_tokens=10, temperature=1.0, seed=7, **constraint)
    state = options.constraint.start()
    rng = np.random.default_rng(7)
    generated, text = [], b""
    r = model.complete(prompt, max_new_tokens=10, temperature=1.0, seed=7, **constraint)
    for token in r.token_ids:
        expected = allowed_by_test(token_bytes, text, viable, complete)
        assert np.array_equal(state.allowed(), expected)
        logits = model.logits(prompt + generated)[-1]
        masked = np.where(expected, logits, np.float32(-np.inf)).astype(np.float32)
        assert token == sample_token(masked, SamplingParams(temperature=1.0), rng, prompt + generated, generated)
        state.consume(token)
        generated.append(token)
        text += token_bytes[token] or b""
    assert complete(text)


def test_logprobs_stay_the_raw_models(model):
    prompt = model.prompt_ids("Pick:")
    r = model.complete(prompt, choice=COLOURS, max_new_tokens=8, logprobs=2)
    for i, token in enumerate(r.token_ids):
        logits = model.logits(prompt + r.token_ids[:i])[-1].astype(np.float64)
        raw = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        assert r.logprobs[i].logprob == pytest.approx(raw[token], abs=1e-9)
        assert [t for t, _ in r.logprobs[i].top] == list(np.argsort(-raw, kind="stable")[:2])


def test_sampled_outputs_are_valid(model):
    regex = r"[0-9]{3}-[A-Z][a-z]{1,4}"
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    for seed in range(8):
        js = model.complete("x", json_schema=SCHEMA, temperature=1.0, seed=seed, max_new_tokens=120)
        assert js.stop_reason == "constraint_done", js
        jsonschema.validate(json.loads(js.text), SCHEMA)
        assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', js.text))  # compact by default
        assert re.fullmatch(regex, model.complete("x", regex=regex, temperature=1.0, seed=seed).text)
        assert model.complete("x", choice=COLOURS, temperature=1.0, seed=seed).text in COLOURS
        g = model.complete("x", grammar=grammar, temperature=1.0, seed=seed, max_new_tokens=40)
        if g.stop_reason != "max_new_tokens":
            assert g.stop_reason == "constraint_done" and re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", g.text)
        anything = model.complete("x", json_object=True, temperature=1.0, seed=seed, max_new_tokens=60)
        assert anything.text.startswith("{")
        if anything.stop_reason != "max_new_tokens":
            assert isinstance(json.loads(anything.text), dict)


def test_flexible_whitespace_is_an_option(model):
    texts = [model.complete("x", json_schema=SCHEMA, json_whitespace="flexible", temperature=1.0, seed=s,
                            max_new_tokens=40).text for s in range(6)]
    assert any(re.search(r"[{,:]\s", t) for t in texts)  # the random model takes the room it is given


@pytest.mark.usefixtures("always_draft")
def test_speculation_on_and_off_give_the_same_text(model):
    prompt = model.prompt_ids('{"name":"ab","age":7,"kind":"cat","tags":["x"],"home":{"zip":"12345","indoor":true}} '
                              '{"name":"ab","age":7,"kind":"cat","tags":["x"],"home":{"zip":"12345","indoor":true}}')
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        plain = model.complete(prompt, json_schema=SCHEMA, max_new_tokens=120, **sampling)
        fast = model.complete(prompt, json_schema=SCHEMA, max_new_tokens=120, speculate=6, **sampling)
        assert fast.text == plain.text and fast.token_ids == plain.token_ids
        assert fast.draft_tokens > 0
        jsonschema.validate(json.loads(fast.text), SCHEMA)


def test_batched_and_alone_agree_and_overlap_changes_nothing(model):
    prompts = [model.prompt_ids(p) for p in ("one", "two words", "a third prompt")]
    alone = [model.complete(p, json_schema=SCHEMA, temperature=1.0, seed=5, max_new_tokens=120).text for p in prompts]
    batch = generate_batch(model, prompts, json_schema=SCHEMA, temperature=1.0, seed=5, max_new_tokens=120)
    assert [r.text for r in batch] == alone
    scheduler = Scheduler(model)
    scheduler.overlap_masks = False
    opts = default_options(model, json_schema=SCHEMA, temperature=1.0, seed=5, max_new_tokens=120)
    requests = [scheduler.submit(p, opts) for p in prompts]
    for _ in scheduler.run():
        pass
    assert [r.result.text for r in requests] == alone


def test_stream_stop_strings_and_length(model):
    gen = model.stream("x", json_schema=SCHEMA, temperature=1.0, seed=2, max_new_tokens=120)
    streamed = "".join(event.text for event in gen)
    assert streamed == gen.result.text == model.complete("x", json_schema=SCHEMA, temperature=1.0, seed=2,
                                                          max_new_tokens=120).text
    cut = model.complete("x", json_schema=SCHEMA, temperature=1.0, seed=2, max_new_tokens=5)
    assert cut.stop_reason == "max_new_tokens" and len(cut.token_ids) == 5 and streamed.startswith(cut.text)
    stopped = model.complete("x", json_schema=SCHEMA, temperature=1.0, seed=2, stop='"age"')
    assert stopped.stop_reason == "stop_string" and stopped.text == streamed[:streamed.index('"age"')]


def test_a_constraint_longer_than_the_window_ends_with_length(model):
    r = model.complete("x", regex="[0-9]{1000}", temperature=1.0, seed=1)  # a token holds at most one digit here; the window is 256
    assert r.stop_reason == "context_full" and re.fullmatch("[0-9]+", r.text)
    assert len(r.prompt_token_ids) + len(r.token_ids) == 256 + 1  # the last token is sampled from a full window


@pytest.mark.parametrize("options, field, reason", [
    ({"json_schema": {"type": "strin"}}, "json_schema", "strin"),
    ({"json_schema": "{not json"}, "json_schema", "not valid JSON"),
    ({"json_schema": {"type": "string", "format": "no-such-format"}}, "json_schema", "format"),
    ({"regex": "a(b"}, "regex", "unclosed group"),
    ({"choice": []}, "choice", "non-empty list"),
    ({"grammar": "root ::= missing"}, "grammar", "missing"),
    ({"regex": "a", "choice": ["b"]}, "choice", "one constraint"),
])
def test_bad_constraints_raise_naming_the_field(model, options, field, reason):
    with pytest.raises(ConstraintError) as e:
        model.complete("x", **options)
    assert e.value.field == field and reason in str(e.value) and "\n" not in str(e.value)


def test_cli_constraints(tiny_chat_model, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    base = ["generate", "--model", str(tiny_chat_model), "--temperature", "1", "--seed", "4", "x"]
    assert main([*base, "--json-schema", str(schema), "--max-new-tokens", "120"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)
    assert main([*base, "--choice", "yes", "--choice", "no"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "id-" [0-9] [0-9]')
    assert main([*base, "--grammar", str(grammar)]) == 0
    assert re.fullmatch(r"id-[0-9]{2}", capsys.readouterr().out.strip())
    assert main([*base, "--regex", "a(b"]) == 1
    assert capsys.readouterr().err.startswith("tinyllama: error: --regex: ")
    assert main([*base, "--json-schema", str(tmp_path / "absent.json")]) == 1
    assert "--json-schema: cannot read" in capsys.readouterr().err


def test_cli_bad_schema_is_one_line_in_a_subprocess(tiny_chat_model, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"a": {"type": "strin"}}}')
    p = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", str(tiny_chat_model), "--json-schema",
                        str(bad), "x"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().splitlines() == ["tinyllama: error: --json-schema: failed to compile JSON schema: Invalid type: strin"]


# ---- the server ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_chat_model):
    s = ServerProcess("--model", str(tiny_chat_model), "--api-key", API_KEY, "--served-model-name", "x",
                      env={"TINYLLAMA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]


class Home(pydantic.BaseModel):
    zip: Annotated[str, pydantic.Field(pattern="^[0-9]{5}$")]
    indoor: bool


class Pet(pydantic.BaseModel):
    name: Annotated[str, pydantic.Field(max_length=8)]
    age: Annotated[int, pydantic.Field(ge=0, le=99)]
    kind: Literal["cat", "dog"]
    tags: Annotated[list[Annotated[str, pydantic.Field(max_length=6)]], pydantic.Field(max_length=2)]
    home: Home


def test_openai_parse_returns_a_pydantic_object(client):
    completion = client.chat.completions.parse(model="x", messages=MESSAGES, response_format=Pet, seed=1,
                                               max_tokens=150)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Pet) and message.parsed == Pet.model_validate_json(message.content)


def test_json_schema_streamed_equals_not_streamed(client, model):
    response_format = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
    whole = client.chat.completions.create(model="x", messages=MESSAGES, response_format=response_format, seed=9,
                                           max_tokens=150)
    text = whole.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    chunks = client.chat.completions.create(model="x", messages=MESSAGES, response_format=response_format, seed=9,
                                            max_tokens=150, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    # the constraint applies to the reply after the chat template: the same as the engine in this process
    ids = model.tokenizer.encode_chat(MESSAGES)
    assert model.complete(ids, json_schema=SCHEMA, temperature=1.0, seed=9, max_new_tokens=150).text == text


def test_json_object_and_vllm_fields(client):
    r = client.chat.completions.create(model="x", messages=MESSAGES, response_format={"type": "json_object"},
                                       seed=3, max_tokens=60)
    assert r.choices[0].message.content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    regex = r"[0-9]{2}:[0-9]{2}"
    for extra in ({"structured_outputs": {"regex": regex}}, {"guided_regex": regex}):
        r = client.chat.completions.create(model="x", messages=MESSAGES, seed=4, extra_body=extra)
        assert re.fullmatch(regex, r.choices[0].message.content) and r.choices[0].finish_reason == "stop"
    for extra in ({"structured_outputs": {"choice": COLOURS}}, {"guided_choice": COLOURS}):
        r = client.completions.create(model="x", prompt="My favourite colour:", seed=4, extra_body=extra)
        assert r.choices[0].text in COLOURS
    r = client.completions.create(model="x", prompt="n=", seed=4,
                                  extra_body={"structured_outputs": {"grammar": 'root ::= "n" [0-9]'}})
    assert re.fullmatch("n[0-9]", r.choices[0].text)
    r = client.completions.create(model="x", prompt="{", seed=4, max_tokens=120,
                                  extra_body={"guided_json": SCHEMA, "json_whitespace": "compact"})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    r = client.chat.completions.create(model="x", messages=MESSAGES, seed=4, max_tokens=3,
                                       extra_body={"guided_json": SCHEMA})
    assert r.choices[0].finish_reason == "length"


STRUCTURED_ERRORS = [  # (body fields, param, words in the message)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema", "strin"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex", "unclosed group"),
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"format": "nope", "type": "string"}}}}},
     "structured_outputs.json", "nope"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", "not supported"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_grammar": "root ::= nothing"}, "guided_grammar", "nothing"),
    ({"guided_json": "{oops"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "one structured-output constraint"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "one structured-output"),
    ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern", "not supported"),
    ({"json_whitespace": "lots"}, "json_whitespace", "compact"),
]


@pytest.mark.parametrize("fields, param, words", STRUCTURED_ERRORS)
def test_bad_constraints_are_400_naming_the_field(server, fields, param, words):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, **fields},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"
