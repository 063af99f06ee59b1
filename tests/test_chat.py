"""ChatSession (engine.generation.chat) without a terminal: KV-cache reuse across turns, overflow trimming, cancel, transcripts.

The model is a small random Llama carrying TinyLlama's real tokenizer and chat template (window 256). Prompts are
rendered here by hand from TinyLlama's template and tokenized with the real tokenizer; reply tokens are checked
against transformers' greedy decoding of the full prompt (a fresh prefill by an independent implementation).
"""
from __future__ import annotations

import json

import pytest

from engine.generation.chat import ChatSession
from engine.errors import EngineError
from tests.conftest import load_reference, model_variant, reference_greedy

SYSTEM = "You are a helpful assistant."
EOS = 2


@pytest.fixture(scope="module")
def model(tiny_chat_model):
    from engine.model import load_model

    return load_model(str(tiny_chat_model))


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    from engine.text.tokenizer import Tokenizer

    return Tokenizer.from_folder(tiny_chat_model)


@pytest.fixture(scope="module")
def reference(tiny_chat_model):
    return load_reference(tiny_chat_model)


def render(system, messages) -> str:
    """TinyLlama's chat template, written out by hand, with the generation prompt."""
    text = f"<|system|>\n{system}</s>\n" if system else ""
    for role, content in messages:
        text += f"<|{role}|>\n{content}</s>\n"
    return text + "<|assistant|>\n"


def lcp(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def greedy(reference, ids, n):
    """transformers' greedy continuation, up to and including EOS."""
    out = reference_greedy(reference, ids, n)
    return out[: out.index(EOS) + 1] if EOS in out else out


def test_turn_two_prefills_only_what_the_cache_lacks_and_matches_a_fresh_prefill(model, tok, reference):
    session = ChatSession(model, system=SYSTEM, max_new_tokens=12)
    r1 = session.reply("Hello! Who are you?")
    ids1 = tok.encode(render(SYSTEM, [("user", "Hello! Who are you?")]))
    assert r1.token_ids == greedy(reference, ids1, 12)
    assert r1.text.lstrip() == tok.decode(r1.token_ids, skip_special_tokens=True).lstrip()
    st = session.stats
    assert (st.prompt_tokens, st.reused_tokens, st.prefill_tokens) == (len(ids1), 0, len(ids1))
    assert st.context_tokens == len(ids1) + len(r1.token_ids) - 1  # the last reply token is never fed
    assert session.cached_ids == (ids1 + r1.token_ids)[: len(ids1) + len(r1.token_ids) - 1]

    r2 = session.reply("Tell me more.")
    ids2 = tok.encode(render(SYSTEM, [("user", "Hello! Who are you?"), ("assistant", r1.text),
                                      ("user", "Tell me more.")]))
    reused = lcp(ids2, ids1 + r1.token_ids[:-1])
    assert reused >= len(ids1)  # at least the whole first prompt is re-used
    assert session.stats.reused_tokens == reused
    assert session.stats.prefill_tokens == len(ids2) - reused < len(ids2) - len(ids1) + len(r1.token_ids)
    assert r2.token_ids == greedy(reference, ids2, 12)  # the cached prefix gives what a full prefill gives
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_ten_turns_each_prefill_only_their_own_tokens(model, tok):
    """With one-token replies the cache holds exactly the previous prompt: each turn prefills its own part only."""
    session = ChatSession(model, system=SYSTEM, max_new_tokens=1)
    history, previous = [], None
    for i in range(10):
        text = f"Q{i}?"
        session.reply(text)
        history.append(("user", text))
        ids = tok.encode(render(SYSTEM, history))
        st = session.stats
        assert st.prompt_tokens == len(ids) and st.dropped_turns == 0
        if previous is not None:
            assert ids[: len(previous)] == previous
            assert st.prefill_tokens == len(ids) - len(previous) < 30  # not growing with the history
        assert st.context_tokens == len(ids)
        history.append(("assistant", session.messages[-1]["content"]))
        previous = ids


def test_edited_history_reuses_the_common_prefix_only(model, tok, reference):
    """A history that stops matching the cache mid-way (an edited reply): keep the common prefix, prefill the rest."""
    session = ChatSession(model, system=SYSTEM, max_new_tokens=10)
    r1 = session.reply("Name three colours.")
    ids1 = tok.encode(render(SYSTEM, [("user", "Name three colours.")]))
    session.messages[-1]["content"] = "Red, green and blue."
    r2 = session.reply("And three animals?")
    ids2 = tok.encode(render(SYSTEM, [("user", "Name three colours."), ("assistant", "Red, green and blue."),
                                      ("user", "And three animals?")]))
    reused = lcp(ids2, ids1 + r1.token_ids[:-1])
    assert len(ids1) <= reused < len(ids1) + len(r1.token_ids) - 1
    assert session.stats.prefill_tokens == len(ids2) - reused
    assert r2.token_ids == greedy(reference, ids2, 10)


def test_overflow_drops_the_oldest_turns_keeps_the_system_prompt(model, tok, reference):
    session = ChatSession(model, system=SYSTEM, max_new_tokens=8)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma"
    sent, dropped_at = [], None
    for i in range(8):
        previous_cache = list(session.cached_ids)
        text = f"Message {i}: {words}"
        turn = session.send(text)
        ids = turn.prompt_ids
        sent.append(text)
        for _ in turn:
            pass
        st = session.stats
        assert st.prompt_tokens + 8 <= model.config.max_position_embeddings
        assert st.reused_tokens == lcp(ids, previous_cache) and st.prefill_tokens == len(ids) - st.reused_tokens
        if st.dropped_turns:
            dropped_at = i
            break
    assert dropped_at is not None, "the window (256) never filled"
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users[0] != sent[0] and users[-1] == sent[-1] and users == sent[len(sent) - len(users):]
    assert session.messages[0]["role"] == "user"
    history = []
    for m in session.messages[:-1]:
        history.append((m["role"], m["content"]))
    ids = tok.encode(render(SYSTEM, history))
    assert ids == turn.prompt_ids
    system_part = tok.encode(render(SYSTEM, [])[: -len("<|assistant|>\n")] + "<|user|>\nMessage ")
    assert session.stats.reused_tokens >= len(system_part) - 1  # the system prompt's tokens stay cached
    assert turn.result.token_ids == greedy(reference, ids, 8)


def test_a_message_longer_than_the_window_is_refused_and_the_session_goes_on(model):
    session = ChatSession(model, max_new_tokens=4)
    with pytest.raises(EngineError, match="too long"):
        session.send("word " * 400)
    assert session.messages == []
    assert session.reply("Hi").stop_reason == "max_new_tokens"


def test_cancel_keeps_the_partial_reply_and_a_consistent_cache(model, tok, reference):
    session = ChatSession(model, max_new_tokens=30)
    turn = session.send("Tell me a story.")
    for i, _ in enumerate(turn):
        if i == 4:
            turn.cancel()
            break
    r1 = turn.result
    assert r1.stop_reason == "cancelled" and len(r1.token_ids) == 5
    assert session.messages[-1] == {"role": "assistant", "content": r1.text}
    ids1 = tok.encode(render(None, [("user", "Tell me a story.")]))
    assert session.cached_ids == (ids1 + r1.token_ids)[: session.cache.length]
    r2 = session.reply("Go on.")
    ids2 = tok.encode(render(None, [("user", "Tell me a story."), ("assistant", r1.text), ("user", "Go on.")]))
    assert session.stats.reused_tokens >= len(ids1)
    assert r2.token_ids == greedy(reference, ids2, 30)


def test_an_exception_mid_reply_drops_the_cache_and_the_next_turn_prefills_everything(model, monkeypatch):
    session = ChatSession(model, max_new_tokens=20)
    session.reply("Hello")
    forward, calls = model.forward, []

    def interrupted_forward(steps):  # as if Ctrl-C landed inside the third forward step of the next reply
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return forward(steps)

    monkeypatch.setattr(model, "forward", interrupted_forward)
    turn = session.send("Go on")
    with pytest.raises(KeyboardInterrupt):
        for _ in turn:
            pass
    monkeypatch.undo()
    assert turn.done and turn.result.stop_reason == "cancelled" and len(turn.result.token_ids) == 2
    assert session.cached_ids == [] and session.cache.length == 0
    assert session.messages[-1] == {"role": "assistant", "content": turn.result.text}
    session.reply("Again")
    assert session.stats.reused_tokens == 0 and session.stats.prefill_tokens == session.stats.prompt_tokens


def test_reset_keeps_the_system_prompt_and_reuses_its_tokens(model, tok):
    session = ChatSession(model, system=SYSTEM, max_new_tokens=3)
    session.reply("First question")
    session.reset()
    assert session.messages == [] and session.system == SYSTEM
    session.reply("Fresh start")
    ids = tok.encode(render(SYSTEM, [("user", "Fresh start")]))
    assert session.stats.prompt_tokens == len(ids)
    assert session.stats.reused_tokens == lcp(ids, tok.encode(render(SYSTEM, [("user", "First question")])))
    assert session.stats.reused_tokens > 5
    session.set_system("Be brief.")
    session.reply("Third")
    assert session.history()[0] == {"role": "system", "content": "Be brief."}


def test_set_option_parses_and_validates(model):
    session = ChatSession(model, max_new_tokens=5)
    assert session.set_option("temperature", "0.7") == 0.7
    assert session.set_option("top-k", "40") == 40
    session.set_option("seed", "3")
    session.set_option("max_new_tokens", "9")
    assert session.settings() == {"temperature": 0.7, "top_k": 40, "top_p": 1.0, "min_p": 0.0,
                                 "repetition_penalty": 1.0, "seed": 3, "max_new_tokens": 9}
    for name, value, message in [("temperature", "abc", "must be a number"), ("temperature", "-1", "temperature"),
                                 ("top_p", "0", "top_p"), ("top_k", "1.5", "must be an integer"),
                                 ("max_new_tokens", "0", "max_new_tokens"), ("beam_width", "4", "unknown option")]:
        with pytest.raises(EngineError, match=message):
            session.set_option(name, value)
    assert session.settings()["temperature"] == 0.7 and session.settings()["max_new_tokens"] == 9
    session.set_option("seed", "none")
    assert session.settings()["seed"] is None
    a = session.reply("Hi")  # sampled, seed unset: it runs
    assert len(a.token_ids) == 9


def test_seeded_sampling_is_reproducible_across_sessions(model):
    replies = []
    for _ in range(2):
        session = ChatSession(model, temperature=0.9, top_p=0.9, seed=5, max_new_tokens=8)
        replies.append(session.reply("Hi").token_ids)
    assert replies[0] == replies[1]


def test_save_and_load_round_trip(model, tmp_path):
    session = ChatSession(model, system=SYSTEM, max_new_tokens=4)
    session.reply("Héllo ✓")
    path = tmp_path / "t.json"
    session.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["system"] == SYSTEM and data["messages"][0] == {"role": "user", "content": "Héllo ✓"}
    assert data["messages"][1]["role"] == "assistant"

    other = ChatSession(model, max_new_tokens=4)
    other.load(path)
    assert other.system == SYSTEM and other.messages == session.messages
    other.reply("More")
    assert len(other.messages) == 4

    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                                 {"role": "assistant", "content": "a"}]))
    other.load(plain)
    assert other.system == "S" and [m["role"] for m in other.messages] == ["user", "assistant"]

    bad = tmp_path / "bad.json"
    for content, message in [("{nope", "not a JSON transcript"), ('{"messages": [{"role": "tool", "content": "x"}]}',
                                                                   "role"), ('{"messages": 3}', "messages")]:
        bad.write_text(content)
        with pytest.raises(EngineError, match=message):
            other.load(bad)
    with pytest.raises(EngineError, match="cannot read"):
        other.load(tmp_path / "missing.json")
    with pytest.raises(EngineError, match="cannot write"):
        other.save(tmp_path / "no-such-dir" / "t.json")
    assert other.system == "S"  # a failed load leaves the conversation alone


def test_a_model_without_chat_template_is_refused(tiny_chat_model, tmp_path):
    from engine.model import Model

    no_template = model_variant(tiny_chat_model, tmp_path / "no-template", "tokenizer_config.json",
                                lambda config: config.pop("chat_template"))
    m = Model.__new__(Model)
    m.folder, m._tokenizer, m._chat_template = no_template, None, None
    with pytest.raises(EngineError, match="no chat template.*chat_template="):
        ChatSession(m)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_an_interrupted_save_keeps_the_previous_transcript(model, tmp_path, monkeypatch, failure):
    """/save writes a temporary file beside the target and renames it: a save that dies half-way (a full disk, Ctrl-C)
    leaves the previous transcript whole and no temporary file behind."""
    import engine.generation.chat as chat_module

    session = ChatSession(model, system=SYSTEM, max_new_tokens=4)
    session.reply("first")
    path = tmp_path / "t.json"
    session.save(path)
    before = path.read_bytes()
    session.reply("second")

    def dies(fd):
        raise failure

    monkeypatch.setattr(chat_module.os, "fsync", dies)  # after part of the new file is written, before the rename
    with pytest.raises(EngineError if isinstance(failure, OSError) else KeyboardInterrupt):
        session.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]
    monkeypatch.undo()
    session.save(path)
    assert len(json.loads(path.read_text(encoding="utf-8"))["messages"]) == 4
