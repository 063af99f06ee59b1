"""`tinyllama chat` as a user runs it: on a pseudo-terminal (pexpect) and with stdin piped.

The model is a small random Llama with TinyLlama's real tokenizer and chat template (window 256). Expected token
counts come from the real tokenizer on prompts rendered here by hand from TinyLlama's template.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, model_variant

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>> "
SYSTEM = "You are terse."


def command(*args) -> list[str]:
    return [sys.executable, "-m", "engine", "chat", *args]


def environment(tmp_path) -> dict:
    return dict(os.environ, TERM="dumb", TINYLLAMA_CHAT_HISTORY=str(tmp_path / "history"), PYTHONUNBUFFERED="1")


def spawn(tmp_path, *args):
    cmd = command(*args)
    child = pexpect.spawn(cmd[0], cmd[1:], cwd=str(REPO), env=environment(tmp_path), encoding="utf-8",
                          timeout=60, dimensions=(40, 250))
    child.expect("/help for commands")
    child.expect_exact(PROMPT)
    return child


def ask(child, line: str) -> str:
    """Send a line, wait for the next prompt; the output in between (without the echoed line)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    out = child.before.replace("\r\n", "\n")
    return out[len(line) + 1:] if out.startswith(line) else out


def stats(child) -> dict:
    out = ask(child, "/stats")
    found = {name: int(re.search(rf"{name} tokens: (\d+)", out).group(1))
             for name in ("prefill", "context", "generated")}
    assert "time to first token:" in out and "tok/s" in out, out
    found["stop"] = re.search(r"stop: (\w+)", out).group(1)
    return found


def render(system, messages) -> str:
    """TinyLlama's chat template, written out by hand, with the generation prompt."""
    text = f"<|system|>\n{system}</s>\n" if system else ""
    for role, content in messages:
        text += f"<|{role}|>\n{content}</s>\n"
    return text + "<|assistant|>\n"


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    from engine.text.tokenizer import Tokenizer

    return Tokenizer.from_folder(tiny_chat_model)


def test_turn_two_prefills_only_its_new_tokens_and_commands_work(tiny_chat_model, tok, tmp_path):
    child = spawn(tmp_path, "--model", str(tiny_chat_model), "--system", SYSTEM, "--max-new-tokens", "1")
    ask(child, "Hello there")
    s1 = stats(child)
    ids1 = tok.encode(render(SYSTEM, [("user", "Hello there")]))
    # One reply token: it is never fed back, so the cache holds exactly the first prompt.
    assert (s1["prefill"], s1["context"], s1["generated"], s1["stop"]) == (len(ids1), len(ids1), 1, "max_new_tokens")

    transcript = tmp_path / "t1.json"
    assert "saved 2 messages" in ask(child, f"/save {transcript}")
    reply1 = json.loads(transcript.read_text(encoding="utf-8"))["messages"][1]["content"]
    ask(child, "What is next?")
    s2 = stats(child)
    ids2 = tok.encode(render(SYSTEM, [("user", "Hello there"), ("assistant", reply1), ("user", "What is next?")]))
    assert ids2[: len(ids1)] == ids1
    assert s2["prefill"] == len(ids2) - len(ids1)  # the reply token, the template glue and the new message only
    assert s2["context"] == len(ids2)

    assert "/save FILE" in ask(child, "/help")
    assert "error: temperature must be a number" in ask(child, "/set temperature abc")
    assert "error: unknown option" in ask(child, "/set beam_width 3")
    assert "error: top_p" in ask(child, "/set top_p 2")
    assert "(max_new_tokens = 3)" in ask(child, "/set max_new_tokens 3")
    assert "top_k = 0" in ask(child, "/set")
    assert SYSTEM in ask(child, "/system")
    assert "system prompt set" in ask(child, "/system Be kind.")
    assert "Be kind." in ask(child, "/system")
    assert "error: unknown command /frobnicate" in ask(child, "/frobnicate")
    assert "error: cannot read" in ask(child, f"/load {tmp_path / 'missing.json'}")
    ask(child, "A third message")
    assert stats(child)["generated"] == 3  # the /set took effect
    assert "loaded 2 messages" in ask(child, f"/load {transcript}")
    assert SYSTEM in ask(child, "/system")
    assert "conversation cleared" in ask(child, "/reset")
    ask(child, "Hello there")
    s = stats(child)
    assert s["context"] == len(ids1) + 2 and 0 < s["prefill"] < len(ids1)  # BOS and '<|system|>' were cached
    ask(child, "/reset")
    ask(child, "Hello there")  # the cache holds this whole prompt already: only its last token is run again
    s = stats(child)
    assert s["context"] == len(ids1) + 2 and s["prefill"] == 1

    # Overflow: long messages fill the 256-token window; the oldest turns go, the system prompt stays.
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau"
    dropped = None
    for i in range(8):
        out = ask(child, f"Message {i}: {words}")
        if "dropped the oldest" in out:
            dropped = out
            break
    assert dropped is not None and "the system prompt stays" in dropped
    s = stats(child)
    assert s["context"] <= 256 and 0 < s["prefill"] < s["context"]
    assert "dropped turns:" in ask(child, "/stats")
    ask(child, f"/save {transcript}")
    saved = json.loads(transcript.read_text(encoding="utf-8"))
    assert saved["system"] == SYSTEM and saved["messages"][0]["content"] != "Hello there"

    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.fixture
def long_window_model(tiny_chat_model, tmp_path):
    """The same weights with a 4096-token window, so a reply can run long enough to interrupt."""
    return model_variant(tiny_chat_model, tmp_path / "long", "config.json",
                         lambda config: config.update(max_position_embeddings=4096))


def test_ctrl_c_stops_the_streaming_reply_and_clears_the_line(long_window_model, tmp_path):
    child = spawn(tmp_path, "--model", str(long_window_model), "--max-new-tokens", "4000")
    child.sendline("Tell me a very long story")
    child.expect_exact("Tell me a very long story")
    streamed = ""
    while len(streamed.strip()) < 20:  # the reply streams: text shows long before 4000 tokens are done
        streamed += child.read_nonblocking(200, timeout=30)
    child.sendintr()
    child.expect("reply stopped")
    child.expect_exact(PROMPT)
    s = stats(child)
    assert s["stop"] == "cancelled" and 1 <= s["generated"] < 4000

    child.send("half a line")
    child.expect_exact("half a line")  # echoed by readline: it is waiting for more keys
    time.sleep(0.3)
    child.sendintr()  # at the prompt: the line is dropped, the session goes on
    child.expect_exact(PROMPT)
    assert "(max_new_tokens = 5)" in ask(child, "/set max_new_tokens 5")
    ask(child, "Go on")
    s2 = stats(child)
    assert s2["generated"] == 5 and s2["prefill"] < s2["context"] - 5  # the interrupted turn's cache is re-used

    transcript = tmp_path / "t.json"
    ask(child, f"/save {transcript}")
    messages = json.loads(transcript.read_text(encoding="utf-8"))["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Tell me a very long story", "Go on"]
    partial = messages[1]["content"]
    assert partial.strip() and streamed.strip()[:10] in partial  # the partial reply stays in the history

    child.sendeof()  # Ctrl-D quits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def run_piped(*args, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), input=stdin, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, TINYLLAMA_CHAT_HISTORY=""))


def test_piped_stdin_prints_only_the_replies(tiny_chat_model, tmp_path):
    transcript = tmp_path / "t.json"
    p = run_piped("--model", str(tiny_chat_model), "--max-new-tokens", "6",
                  stdin=f"Hello there\n\n/set top_k 3\nSecond message\n/save {transcript}\n/stats\n")
    assert p.returncode == 0, p.stderr
    messages = json.loads(transcript.read_text(encoding="utf-8"))["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hello there", "Second message"]
    replies = [m["content"].lstrip() + "\n" for m in messages if m["role"] == "assistant"]
    assert p.stdout.startswith("".join(replies))
    assert p.stdout[len("".join(replies)):].startswith("prefill tokens: ")
    assert "(top_k = 3)" in p.stderr and "Traceback" not in p.stderr


def test_chat_refuses_a_model_without_a_chat_template(tiny_chat_model, tmp_path):
    folder = model_variant(tiny_chat_model, tmp_path / "no-template", "tokenizer_config.json",
                           lambda config: config.pop("chat_template"))
    p = run_piped("--model", str(folder), stdin="Hello\n")
    assert p.returncode == 1 and p.stdout == ""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no chat template" in lines[0] and "tinyllama generate" in lines[0], p.stderr


def test_chat_with_a_missing_model_folder_is_one_line(tmp_path):
    p = run_piped("--model", str(tmp_path / "nope"), stdin="Hello\n")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len([line for line in p.stderr.splitlines() if line.strip()]) == 1

