"""engine.text.tokenizer against the shared model folders' observed ids and `tokenizers.decode`.

The shared folders are read in place (never copied into the repo); tests skip when they are absent.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.text.tokenizer import NoChatTemplateError, StreamDecoder, Tokenizer


def _read_json(path: Path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _read_json_or_skip(path: Path):
    """An optional shared fixture file: its JSON, or skip the test when it is absent."""
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return _read_json(path)


@pytest.fixture(scope="module")
def tinyllama(tinyllama_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_folder(tinyllama_tokenizer_dir)


@pytest.fixture(scope="module")
def stories(stories260k) -> Tokenizer:
    return Tokenizer.from_folder(stories260k)


@pytest.fixture(scope="module")
def expected_tokens(tinyllama_tokenizer_dir) -> dict:
    return _read_json_or_skip(tinyllama_tokenizer_dir / "expected_tokens.json")


@pytest.fixture(params=["tinyllama", "stories"])
def any_tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------- loading


def test_tinyllama_special_ids_and_template_come_from_the_folder(tinyllama, tinyllama_tokenizer_dir):
    config = _read_json(tinyllama_tokenizer_dir / "config.json")
    tokenizer_config = _read_json(tinyllama_tokenizer_dir / "tokenizer_config.json")
    generation_config = _read_json(tinyllama_tokenizer_dir / "generation_config.json")
    assert tinyllama.bos_id == config["bos_token_id"] == 1
    assert tinyllama.eos_ids == (generation_config["eos_token_id"],) == (2,)
    assert tinyllama.vocab_size == config["vocab_size"]
    assert tinyllama.chat_template == tokenizer_config["chat_template"]
    assert tinyllama.special_tokens["eos_token"] == tokenizer_config["eos_token"]


def test_stories_has_no_chat_template(stories, stories260k):
    config = _read_json(stories260k / "config.json")
    assert stories.vocab_size == config["vocab_size"] == 512
    assert stories.bos_id == config["bos_token_id"]
    assert stories.eos_ids == (config["eos_token_id"],)
    assert stories.chat_template is None
    with pytest.raises(NoChatTemplateError) as error:
        stories.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert isinstance(error.value, ValueError)
    assert "no chat template" in str(error.value)


def test_eos_ids_union_tokenizer_first_then_generation_then_model_config(tmp_path, stories260k):
    shutil.copy(stories260k / "tokenizer.json", tmp_path / "tokenizer.json")  # tmp copy, outside the repo
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}, "bos_token": "<s>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 5]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 9, "bos_token_id": 1}))
    tokenizer = Tokenizer.from_folder(tmp_path)
    assert tokenizer.eos_ids == (2, 7, 5, 9)
    assert tokenizer.bos_id == 1


def test_chat_template_jinja_file_is_read(tmp_path, stories260k):
    shutil.copy(stories260k / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tokenizer = Tokenizer.from_folder(tmp_path)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


# ---------------------------------------------------------------- encode / decode


def test_encode_matches_observed_raw_tokenizer_ids(tinyllama, expected_tokens):
    hello = expected_tokens["hello_world"]
    assert tinyllama.encode(hello["text"]) == hello["raw_with_bos"]
    for text, observed in expected_tokens["edge_cases_no_bos"].items():
        reference = observed.get("raw", observed.get("raw_tf5_spm"))
        assert reference is not None, f"no raw ids recorded for {text!r}"
        assert tinyllama.encode(text, add_special_tokens=False) == reference, text


def test_encode_chat_matches_observed_raw_ids(tinyllama, expected_tokens):
    case = expected_tokens["chat_user_hi"]
    assert tinyllama.apply_chat_template(case["messages"], case["add_generation_prompt"]) == case["rendered"]
    assert tinyllama.encode_chat(case["messages"], case["add_generation_prompt"]) == case[
        "raw_encode_rendered_with_bos"
    ]


@pytest.fixture(scope="module")
def stories_reference(stories260k) -> dict:
    return _read_json_or_skip(stories260k / "reference_outputs.json")


def test_stories_encode_and_decode_match_reference_outputs(stories, stories_reference):
    assert stories.encode(stories_reference["prompt"]) == stories_reference["prompt_ids"]
    for key in ("greedy_from_bos", "greedy_from_prompt"):
        ids_key = next(name for name in stories_reference if name.startswith(key + "_ids"))
        ids, text = stories_reference[ids_key], stories_reference[key + "_text"]
        assert stories.decode(ids, skip_special_tokens=True) == text
        assert "".join(_stream(stories, ids, skip_special_tokens=True)) == text


def _reference_decode(tokenizer_json: dict, ids, skip_special_tokens: bool) -> str:
    """Independent decoder for the Llama tokenizer.json decoder chain, from the JSON alone.

    Replace('▁', ' ') -> ByteFallback (a run of <0xNN> tokens is decoded as one UTF-8 string; if the run
    is not valid UTF-8, every byte in it becomes U+FFFD) -> Fuse -> Strip(one leading ' ').
    """
    assert [step["type"] for step in tokenizer_json["decoder"]["decoders"]] == [
        "Replace", "ByteFallback", "Fuse", "Strip"
    ]
    id_to_piece = {token_id: piece for piece, token_id in tokenizer_json["model"]["vocab"].items()}
    specials = {token["id"] for token in tokenizer_json["added_tokens"] if token["special"]}
    for token in tokenizer_json["added_tokens"]:
        id_to_piece[token["id"]] = token["content"]
    pieces, byte_run = [], bytearray()

    def end_byte_run():
        try:
            pieces.append(byte_run.decode("utf-8"))
        except UnicodeDecodeError:
            pieces.append("\ufffd" * len(byte_run))
        byte_run.clear()

    for token_id in ids:
        if skip_special_tokens and token_id in specials:
            continue
        piece = id_to_piece[token_id].replace("\u2581", " ")
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            byte_run.append(int(piece[3:5], 16))
            continue
        if byte_run:
            end_byte_run()
        pieces.append(piece)
    if byte_run:
        end_byte_run()
    text = "".join(pieces)
    return text[1:] if text.startswith(" ") else text


@pytest.mark.parametrize("folder_fixture", ["tinyllama_tokenizer_dir", "stories260k"])
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_matches_an_independent_decoder(request, folder_fixture, skip_special_tokens):
    folder = request.getfixturevalue(folder_fixture)
    tokenizer = Tokenizer.from_folder(folder)
    tokenizer_json = _read_json(folder / "tokenizer.json")
    rng = np.random.default_rng(5)
    texts_ids = [tokenizer.encode(text) for text in STREAM_TEXTS]
    random_ids = [rng.integers(0, tokenizer.vocab_size, size=40).tolist() for _ in range(100)]
    byte_heavy = [rng.integers(0, 300, size=40).tolist() for _ in range(100)]
    for ids in texts_ids + random_ids + byte_heavy:
        assert tokenizer.decode(ids, skip_special_tokens) == _reference_decode(tokenizer_json, ids, skip_special_tokens)


ROUND_TRIP_TEXTS = [
    "Hello, World!",
    " leading space",
    "  two  spaces\nnewline\ttab",
    "ünïcödé 日本語 🙂 \u2028 x",
    "def f(x):\n    return  x  +  1\n\n\n\tdone   ",
    "emoji 👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷",
    "中文测试，标点符号。한국어",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_round_trips_text(tinyllama, stories, text):
    for tokenizer in (tinyllama, stories):
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(ids[1:]) == text


def test_special_tokens_in_user_text_are_special(tinyllama, tinyllama_tokenizer_dir, expected_tokens):
    text = "Hello</s> World"
    assert tinyllama.encode(text, add_special_tokens=False) == expected_tokens["edge_cases_no_bos"][text]["raw"]
    ids = tinyllama.encode(text)
    assert ids.count(2) == 1 and ids[0] == tinyllama.bos_id
    tokenizer_json = _read_json(tinyllama_tokenizer_dir / "tokenizer.json")
    for skip in (False, True):
        assert tinyllama.decode(ids, skip) == _reference_decode(tokenizer_json, ids, skip)


# ---------------------------------------------------------------- streaming


def _stream(tokenizer: Tokenizer, ids, skip_special_tokens: bool, context_ids=()) -> list[str]:
    decoder = tokenizer.stream_decoder(skip_special_tokens=skip_special_tokens, context_ids=context_ids)
    chunks = [decoder.push(token_id) for token_id in ids]
    chunks.append(decoder.flush())
    return chunks


def _assert_stream_invariant(tokenizer: Tokenizer, ids, skip_special_tokens: bool) -> list[str]:
    chunks = _stream(tokenizer, ids, skip_special_tokens)
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(chunks) == expected, f"ids={list(ids)}"
    return chunks


STREAM_TEXTS = ROUND_TRIP_TEXTS + [
    "Hello</s> World<s>again </s>\n<s>",
    "<s><s>x</s></s> y",
    "🙂🙂🙂 end",
    "x" + " " * 17 + "y\n\n\n\n  z",
]


@pytest.mark.parametrize("skip_special_tokens", [False, True])
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_equals_decode_on_real_text(any_tokenizer, text, skip_special_tokens):
    ids = any_tokenizer.encode(text)
    chunks = _assert_stream_invariant(any_tokenizer, ids, skip_special_tokens)
    assert not any("\ufffd" in chunk for chunk in chunks), "emitted U+FFFD for valid text"


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_random_ids_over_the_whole_vocab(any_tokenizer, skip_special_tokens):
    rng = np.random.default_rng(1234)
    for _ in range(150):
        ids = rng.integers(0, any_tokenizer.vocab_size, size=int(rng.integers(1, 48))).tolist()
        _assert_stream_invariant(any_tokenizer, ids, skip_special_tokens)


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_random_mixes_of_bytes_specials_and_spaces(any_tokenizer, skip_special_tokens):
    """Byte-fallback runs (valid and invalid UTF-8), special tokens and space tokens, densely mixed."""
    byte_ids = sorted(any_tokenizer.byte_fallback_ids)
    assert len(byte_ids) == 256
    special_ids = sorted(any_tokenizer.special_ids)
    space_ids = [any_tokenizer.encode(" ", add_special_tokens=False)[-1]] + any_tokenizer.encode(
        "a\n b", add_special_tokens=False
    )
    emoji_bytes = any_tokenizer.encode("🙂é€", add_special_tokens=False)
    rng = np.random.default_rng(99)
    for _ in range(200):
        pools = [byte_ids, special_ids, space_ids, emoji_bytes, list(range(any_tokenizer.vocab_size))]
        ids = [int(rng.choice(pools[rng.integers(len(pools))])) for _ in range(int(rng.integers(1, 40)))]
        _assert_stream_invariant(any_tokenizer, ids, skip_special_tokens)


def test_split_utf8_character_is_emitted_only_when_complete(tinyllama):
    ids = tinyllama.encode("a 🙂 b", add_special_tokens=False)
    pieces = [tinyllama.id_to_token(token_id) for token_id in ids]
    assert pieces.count("<0xF0>") == 1, pieces  # the emoji really is split into byte-fallback tokens
    chunks = _assert_stream_invariant(tinyllama, ids, skip_special_tokens=False)
    for token_id, chunk in zip(ids, chunks):
        if token_id in tinyllama.byte_fallback_ids:
            assert chunk == "", "emitted text in the middle of a byte-fallback run"
    assert any("🙂" in chunk for chunk in chunks)
    assert chunks[0] == "a"  # the leading SentencePiece space is dropped at the start of the stream


def test_plain_tokens_are_emitted_as_they_arrive(tinyllama):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tinyllama.encode(text, add_special_tokens=False)
    chunks = _assert_stream_invariant(tinyllama, ids, skip_special_tokens=False)
    assert all(chunks[:-1]), f"some token produced no text: {chunks}"
    assert chunks[-1] == ""  # nothing was held back for flush


def test_space_after_special_token_is_kept_like_decode(tinyllama, tinyllama_tokenizer_dir):
    tokenizer_json = _read_json(tinyllama_tokenizer_dir / "tokenizer.json")
    hello, world = tinyllama.encode("Hello World", add_special_tokens=False)  # '▁Hello', '▁World'
    for ids in ([1, hello, 2, world], [2, world], [hello, 2, 2, world, 1]):
        for skip in (False, True):
            chunks = _stream(tinyllama, ids, skip_special_tokens=skip)
            assert "".join(chunks) == _reference_decode(tokenizer_json, ids, skip)
    assert "".join(_stream(tinyllama, [2, world], skip_special_tokens=False)) == "</s> World"
    assert "".join(_stream(tinyllama, [2, world], skip_special_tokens=True)) == "World"


def test_context_ids_keep_the_leading_space_of_a_continuation(tinyllama):
    prompt = tinyllama.encode("Once upon a time")
    continuation = tinyllama.encode(" there was a 🙂 fox", add_special_tokens=False)[1:]  # drop the lone '▁'
    chunks = _stream(tinyllama, continuation, skip_special_tokens=True, context_ids=prompt[-4:])
    whole = tinyllama.decode(prompt + continuation, skip_special_tokens=True)
    assert "".join(chunks) == whole[len(tinyllama.decode(prompt, skip_special_tokens=True)) :]
    assert "".join(chunks).startswith(" there")


def test_decoding_work_per_token_is_bounded_by_a_window(tinyllama, monkeypatch):
    ids = tinyllama.encode("Streaming text, with words and 日本語 and emoji 🙂. " * 60)
    assert len(ids) > 1000
    window_lengths = []
    real_decode = Tokenizer.decode

    def recording_decode(self, token_ids, skip_special_tokens=False):
        token_ids = list(token_ids)
        window_lengths.append(len(token_ids))
        return real_decode(self, token_ids, skip_special_tokens)

    monkeypatch.setattr(Tokenizer, "decode", recording_decode)
    decoder = tinyllama.stream_decoder()
    text = "".join(decoder.push(token_id) for token_id in ids) + decoder.flush()
    monkeypatch.undo()
    assert text == tinyllama.decode(ids)
    assert max(window_lengths) <= 12, max(window_lengths)


def test_push_after_flush_is_an_error(tinyllama):
    decoder = tinyllama.stream_decoder()
    assert isinstance(decoder, StreamDecoder)
    decoder.push(15043)
    decoder.flush()
    with pytest.raises(RuntimeError):
        decoder.push(15043)
