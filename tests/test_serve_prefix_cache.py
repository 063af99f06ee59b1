"""The server's prefix cache and n > 1, end to end: the real `tinyllama serve` in subprocesses, driven with the
official `openai` client, every answer compared with a `--no-prefix-cache` server's on the same weights."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from engine.runtime import native
from tests.conftest import make_random_checkpoint

openai = pytest.importorskip("openai")

from tests.serve_support import ServerProcess, metrics  # noqa: E402 - needs httpx

ONE_THREAD = {"TINYLLAMA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
SYSTEM = ("You are a patient assistant for a small bakery. You answer questions about bread, pastries, opening "
          "hours and prices, politely and briefly, and you never invent a product the bakery does not sell.")
BLOCK_BYTES = 2 * 2 * 2 * 16 * 16 * 4  # keys + values, 2 layers, 2 KV heads, head size 16, 16 tokens, float32


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tinyllama_tokenizer_dir):
    return make_random_checkpoint(tmp_path_factory.mktemp("prefix-chat"), tokenizer_from=tinyllama_tokenizer_dir,
                                  vocab_size=32000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=2048, seed=21)


def start(model, *flags, env=None):
    return ServerProcess("--model", str(model), "--served-model-name", "m", *flags,
                         env={**ONE_THREAD, **(env or {})}).wait_ready()


@pytest.fixture(scope="module")
def servers(chat_model):
    """{'on': the default server, 'off': --no-prefix-cache, 'tiny': a prefix cache of 3 blocks}"""
    started = {}
    try:
        started["on"] = start(chat_model)
        started["off"] = start(chat_model, "--no-prefix-cache")
        started["tiny"] = start(chat_model, "--prefix-cache-mb", str(3.5 * BLOCK_BYTES / 2 ** 20))
        yield started
    finally:
        for s in started.values():
            s.stop()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def exact() -> bool:
    """Whether the kernels give a prompt's logits the same bits in any batch (the avx512 variant)."""
    return native.status().available and native.status().isa == "avx512"


def ask(server, messages, stream=False, **kw):
    """One chat turn -> (text, [token logprobs], usage dict); streamed with include_usage when `stream`."""
    args = dict(model="m", messages=messages, max_tokens=12, logprobs=True, top_logprobs=2, **kw)
    c = client(server)
    if not stream:
        r = c.chat.completions.create(**args)
        return r.choices[0].message.content, [t.logprob for t in r.choices[0].logprobs.content], r.usage.model_dump()
    text, logprobs, usage = "", [], None
    for chunk in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args):
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            text += choice.delta.content or ""
            logprobs += [t.logprob for t in (choice.logprobs.content if choice.logprobs else None) or []]
    return text, logprobs, usage


def assert_same(got, want, bitwise: bool | None = None):
    assert got[0] == want[0]
    if exact() if bitwise is None else bitwise:
        assert got[1] == want[1]
    else:
        assert got[1] == pytest.approx(want[1], abs=1e-4)


def converse(server, turns: int, system: str, tag: str):
    """A conversation of `turns` turns, re-sending the history each time as chat UIs do -> the answers."""
    messages = [{"role": "system", "content": system}]
    answers = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"{tag} question {i}: what would you recommend today?"})
        sampling = dict(temperature=0.0) if i % 2 == 0 else dict(temperature=1.0, seed=100 + i)
        answer = ask(server, messages, stream=i % 2 == 1, **sampling)
        answers.append(answer)
        messages.append({"role": "assistant", "content": answer[0]})
    return answers


def test_a_conversation_reuses_its_history_and_answers_as_without_the_cache(servers):
    before = metrics(servers["on"].url)
    with_cache = converse(servers["on"], 5, SYSTEM + " (conversation 1)", "first")
    without = converse(servers["off"], 5, SYSTEM + " (conversation 1)", "first")
    for got, want in zip(with_cache, without):
        assert_same(got, want)
        assert want[2]["prompt_tokens_details"]["cached_tokens"] == 0 and got[2]["prompt_tokens"] == want[2]["prompt_tokens"]
    cached = [a[2]["prompt_tokens_details"]["cached_tokens"] for a in with_cache]
    assert cached[0] == 0 and all(b > a for a, b in zip(cached, cached[1:])), cached  # grows turn by turn
    prompts = [a[2]["prompt_tokens"] for a in with_cache]
    # each turn re-uses at least the previous turn's prompt (whole blocks of it), never its own last token
    assert all(c % 16 == 0 and q // 16 * 16 <= c < p for c, q, p in zip(cached[1:], prompts, prompts[1:])), (
        cached, prompts)
    after = metrics(servers["on"].url)
    assert after["tinyllama_prompt_tokens_cached_total"] - before["tinyllama_prompt_tokens_cached_total"] == sum(cached)
    assert (after["tinyllama_prompt_tokens_prefilled_total"] - before["tinyllama_prompt_tokens_prefilled_total"]
            == sum(prompts) - sum(cached))
    assert after["tinyllama_prefix_cache_bytes"] > 0 and after["tinyllama_prefix_cache_bytes"] % BLOCK_BYTES == 0
    assert f"prompt {prompts[-1]} tokens ({cached[-1]} cached)" in servers["on"].log


def test_conversations_share_a_system_prompt_and_never_each_others_later_tokens(servers, chat_model):
    from engine.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(chat_model)
    system = SYSTEM + " (shared)"
    first = [{"role": "system", "content": system}, {"role": "user", "content": "Do you sell rye bread?"}]
    second = [{"role": "system", "content": system}, {"role": "user", "content": "Do you sell rye rolls?"}]
    a, b = tokenizer.encode_chat(first), tokenizer.encode_chat(second)
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert common >= 32
    ask(servers["on"], first, temperature=0.0)
    got = ask(servers["on"], second, temperature=0.0)
    assert got[2]["prompt_tokens_details"]["cached_tokens"] == common // 16 * 16  # the system prompt, not more
    assert_same(got, ask(servers["off"], second, temperature=0.0))

    # second turns of both, at the same time (one busy batch), each re-using its own history only
    def turn(messages, reply):
        return messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And the price?"}]

    follow_ups = [turn(first, ask(servers["off"], first, temperature=0.0)[0]),
                  turn(second, got[0])]
    results: dict = {}
    threads = [threading.Thread(target=lambda i=i, m=m: results.__setitem__(i, ask(servers["on"], m, seed=5,
                                                                                     temperature=0.8)))
               for i, m in enumerate(follow_ups)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, m in enumerate(follow_ups):
        assert_same(results[i], ask(servers["off"], m, seed=5, temperature=0.8))
        assert results[i][2]["prompt_tokens_details"]["cached_tokens"] >= len(a) // 16 * 16


def test_eviction_under_a_tiny_cache_keeps_answers_exact(servers):
    tiny, off = servers["tiny"], servers["off"]
    for tag in ("evict-a", "evict-b"):
        system = f"({tag}) " + SYSTEM  # no block in common with the other conversation
        for got, want in zip(converse(tiny, 3, system, tag), converse(off, 3, system, tag)):
            assert_same(got, want)
    m = metrics(tiny.url)
    assert m["tinyllama_prefix_cache_evictions_total"] > 0
    assert m["tinyllama_prefix_cache_bytes"] <= m["tinyllama_prefix_cache_capacity_bytes"] == 3 * BLOCK_BYTES


def test_n_choices_share_one_prefill_and_each_has_its_own_seed(servers):
    on, off = servers["on"], servers["off"]
    messages = [{"role": "system", "content": SYSTEM + " (n)"}, {"role": "user", "content": "Three cake ideas?"}]
    args = dict(model="m", messages=messages, max_tokens=10, temperature=1.0, seed=42, logprobs=True)
    alone = [client(off).chat.completions.create(**dict(args, seed=42 + i)) for i in range(3)]
    before = metrics(on.url)
    r = client(on).chat.completions.create(n=3, **args)
    after = metrics(on.url)
    prompt = alone[0].usage.prompt_tokens
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in r.choices}) == 3
    assert r.usage.prompt_tokens == prompt  # the prompt once
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert (after["tinyllama_prompt_tokens_prefilled_total"] - before["tinyllama_prompt_tokens_prefilled_total"]
            == prompt - cached)  # one prefill for three choices

    # streamed: every chunk names its choice; each choice's text is the non-streamed one's
    texts, finishes, usage = {}, {}, None
    with httpx.stream("POST", on.url + "/v1/completions", timeout=120,
                      json={"prompt": "Once upon a time", "n": 3, "max_tokens": 10, "temperature": 1.0, "seed": 7,
                            "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                if c["finish_reason"]:
                    finishes[c["index"]] = c["finish_reason"]
    whole = client(on).completions.create(model="m", prompt="Once upon a time", n=3, max_tokens=10, temperature=1.0,
                                          seed=7)
    assert texts == {c.index: c.text for c in whole.choices} and set(finishes) == {0, 1, 2}
    assert usage["prompt_tokens"] == whole.usage.prompt_tokens
    assert usage["completion_tokens"] == whole.usage.completion_tokens
    one = client(off).completions.create(model="m", prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=9)
    assert texts[2] == one.choices[0].text  # choice 2 of seed 7 is seed 9


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_on_the_other_kernel_variants_answers_match_within_tolerance(chat_model, isa):
    """avx2 and portable do not promise a token's K/V the same bits in every batch: same text, close logprobs."""
    if not native.status().available or isa not in native.usable_isas():
        pytest.skip(f"the {isa} kernels cannot run here")
    env = {"TINYLLAMA_NATIVE_ISA": isa}
    on, off = start(chat_model, env=env), None
    try:
        off = start(chat_model, "--no-prefix-cache", env=env)
        system = f"({isa}) " + SYSTEM
        with_cache, without = converse(on, 3, system, isa), converse(off, 3, system, isa)
        for got, want in zip(with_cache, without):
            assert_same(got, want, bitwise=False)
        assert with_cache[2][2]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        on.stop()
        if off is not None:
            off.stop()
