"""The web page at / in a real browser: headless Chromium (Debian's package) driven by Playwright, against the real
`tinyllama serve` in a subprocess, with a small model that has TinyLlama's tokenizer and chat template and whose
greedy reply contains HTML (tests/web_support.py). Every number the page shows is checked against the API or
against engine.inspect / Model.trace in this process.

Skips (with the reason) without Playwright for Python or a Chromium binary (`apt-get install chromium`).
TINYLLAMA_WEB_SCREENSHOTS=FOLDER makes the tests also write the screenshots of docs/web-page.md there.

Besides that model (a 2048-token window), the page runs against the same model with a 512-token window (the window
rules), a random model of TinyLlama's 22 x 32 heads (the head summary) and stories260K, which has no chat template
(the page continues its text through /v1/completions; the logit lens against the PNG of `tinyllama inspect lens`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.inspect.attention import head_summary
from engine.inspect.lens import logit_lens
from tests.conftest import make_random_checkpoint
from tests.web_support import make_html_reply_checkpoint

httpx = pytest.importorskip("httpx")
playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                     "(pip install playwright; the system Chromium is used, no download)")
CHROMIUM = os.environ.get("TINYLLAMA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no Chromium binary (apt-get install chromium, or set TINYLLAMA_CHROMIUM)", allow_module_level=True)

from tests.serve_support import ServerProcess, metrics  # noqa: E402 - needs httpx

NAME = "tiny-html"
KEY = "sk-web-page"
ONE_THREAD = {"TINYLLAMA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = os.environ.get("TINYLLAMA_WEB_SCREENSHOTS")
HTML_IN_REPLY = '<script>alert(1)</script><img src=x onerror="fail()">'


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tinyllama_tokenizer_dir):
    return make_html_reply_checkpoint(tmp_path_factory.mktemp("web-model"), tinyllama_tokenizer_dir)


@pytest.fixture(scope="module")
def model(folder):
    return engine.load_model(str(folder))


@pytest.fixture(scope="module")
def server(folder):
    s = ServerProcess("--model", str(folder), "--served-model-name", NAME, env=ONE_THREAD)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Watched:
    """A page with what went wrong on it: console errors, uncaught exceptions, failed requests, HTTP errors,
    dialogs (an alert() from injected script would show here)."""

    def __init__(self, browser, url: str, viewport: dict):
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        p = self.page
        p.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        p.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        p.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}")
             if not self.stopping(r) else None)
        p.on("response", lambda r: self.problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
        p.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.requests: list[tuple[str, dict]] = []  # (path, JSON body) of every POST the page sent
        p.on("request", lambda r: self.requests.append((r.url.split("/", 3)[3], r.post_data_json))
             if r.method == "POST" else None)
        self.response = p.goto(url + "/")
        p.wait_for_selector("body[data-ready='1']")

    @staticmethod
    def stopping(request) -> bool:  # the Stop button aborts its fetch on purpose
        return request.url.endswith("/v1/chat/completions") and "ABORTED" in (request.failure or "")

    def bodies(self, path: str = "v1/chat/completions") -> list[dict]:
        """The JSON bodies the page POSTed to `path`, in order."""
        return [body for p, body in self.requests if p == path]

    def close(self):
        self.context.close()


@pytest.fixture
def watched(browser, server):
    w = Watched(browser, server.url, DESKTOP)
    yield w
    w.close()


# ---- helpers --------------------------------------------------------------------------------------------------
def set_options(page, temperature="0", max_tokens="40", system=None):
    """Fill the settings panel as a user would (it opens and closes with its button)."""
    page.click("#toggle-settings")
    page.fill("#set-temperature", temperature)
    page.fill("#set-max-tokens", max_tokens)
    if system is not None:
        page.fill("#set-system", system)
    page.click("#toggle-settings")


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_reply(page, index: int, state: str = "done"):
    """The reply article at `index` once it reached `state` -> its locator."""
    page.wait_for_selector(f"article.assistant[data-index='{index}'][data-state='{state}']", timeout=60_000)
    return page.locator(f"article.assistant[data-index='{index}']")


def conversation(page) -> list[dict]:
    """The messages the page shows, as the API takes them (exact text: textContent)."""
    return page.evaluate("""() => [...document.querySelectorAll('#messages article')].map(a => ({
        role: a.classList.contains('user') ? 'user' : 'assistant', content: a.querySelector('.body').textContent}))""")


def api_greedy(server, messages, max_tokens: int | None, key: str | None = None) -> dict:
    """The API's greedy reply with 5 top log-probabilities (max_tokens None: the server's default, the rest of the
    window): the first choice."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"messages": messages, "temperature": 0, "logprobs": True, "top_logprobs": 5}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    r = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60, json=body)
    r.raise_for_status()
    return r.json()["choices"][0]


def shown_percent(logprob: float) -> str:
    """The page's percentage (tokens.js percent()): two decimals, or two significant digits below 0.01%
    (JavaScript's toPrecision(2), fixed notation down to 1e-6)."""
    p = 100 * np.exp(logprob)
    if p >= 0.01:
        return f"{p:.2f}%"
    exponent = int(f"{p:.1e}".split("e")[1])  # after rounding to two digits (0.00999 -> 1.0e-02)
    return f"{p:.{1 - exponent}f}%" if p >= 1e-6 else None


def screenshot(target, name: str) -> None:
    """With TINYLLAMA_WEB_SCREENSHOTS set: a PNG of the page's viewport, or of one element (all of it)."""
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        target.screenshot(path=str(Path(SCREENSHOTS) / name))


# ---- the tests ------------------------------------------------------------------------------------------------
def test_the_page_loads_cleanly_and_streams_the_greedy_reply(watched, server):
    page = watched.page
    csp = watched.response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe" not in csp
    assert page.text_content("#model-name").startswith(f"· {NAME}")
    set_options(page, max_tokens="120")
    page.evaluate("""() => { window.seen = [];
        new MutationObserver(() => { const b = document.querySelector('article.assistant .body');
            if (b) window.seen.push(b.textContent); })
          .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    send(page, "Name three colours.")
    reply = wait_reply(page, 1)
    text = reply.locator(".body").text_content()
    expected = api_greedy(server, [{"role": "user", "content": "Name three colours."}], 120)
    assert text == expected["message"]["content"] and HTML_IN_REPLY in text
    partial = {s for s in page.evaluate("window.seen") if s and s != text}
    assert len(partial) >= 2 and all(text.startswith(s) for s in partial)  # it streamed, in order
    meta = reply.locator(".meta").text_content()
    assert "tokens/s" in meta and "first token" in meta and "120 tokens" in meta and "max tokens reached" in meta
    assert not watched.problems and not watched.dialogs


def test_stop_cancels_on_the_server_and_the_next_message_works(watched, server):
    page = watched.page
    set_options(page, max_tokens="1900")
    aborted = metrics(server.url).get('tinyllama_requests_finished_total{finish_reason="abort"}', 0)
    # Stop is clicked in the page as soon as 20 characters show: a round trip through this (loaded) process could
    # come after the whole reply
    page.evaluate("""() => new MutationObserver((_, observer) => {
        const body = document.querySelector('article.assistant .body'), stop = document.getElementById('stop');
        if (body && body.textContent.length > 20 && !stop.hidden) { observer.disconnect(); stop.click(); }
      }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true})""")
    send(page, "Tell me a long story.")
    reply = wait_reply(page, 1, "stopped")
    partial = reply.locator(".body").text_content()
    m = {}
    for _ in range(100):  # the server sees the connection close and cancels at its next step
        m = metrics(server.url)
        if m["tinyllama_requests_running"] == 0 and m.get(
                'tinyllama_requests_finished_total{finish_reason="abort"}', 0) == aborted + 1:
            break
        page.wait_for_timeout(100)
    assert m["tinyllama_requests_running"] == 0
    assert m['tinyllama_requests_finished_total{finish_reason="abort"}'] == aborted + 1
    # what came before the stop is the greedy reply's beginning (every token has at least one character)
    start = api_greedy(server, [{"role": "user", "content": "Tell me a long story."}], len(partial) + 1)
    assert start["message"]["content"].startswith(partial)
    assert reply.locator(".meta .stopped").text_content() == "stopped"
    assert 0 < int(reply.locator(".meta .count").text_content().split()[0]) < 1900
    assert page.is_visible("#send") and not page.is_visible("#stop")
    set_options(page, max_tokens="16")
    send(page, "Shorter, please.")
    following = wait_reply(page, 3)
    assert following.locator(".body").text_content() == api_greedy(server, conversation(page)[:3], 16)["message"][
        "content"]
    assert not watched.problems and not watched.dialogs


def test_the_probability_view_shows_the_api_numbers(watched, server):
    page = watched.page
    set_options(page, max_tokens="40")
    send(page, "Hi!")
    reply = wait_reply(page, 1)
    reply.locator("button.show-tokens").click()
    expected = api_greedy(server, [{"role": "user", "content": "Hi!"}], 40)["logprobs"]["content"]
    spans = page.locator("article.assistant[data-index='1'] .tok")
    assert spans.count() == len(expected) == 40  # one element per token
    got = spans.evaluate_all("s => s.map(e => [e.textContent, Number(e.dataset.logprob)])")
    assert [g[1] for g in got] == [e["logprob"] for e in expected]
    assert "".join(g[0] for g in got) == "".join(e["token"] for e in expected)  # pieces, as text ('<' included)
    for k in (4, 13):  # hover one token, then another: the tooltip follows
        spans.nth(k).hover()
        page.wait_for_selector("#tooltip:not([hidden])")
        rows = page.locator("#tooltip tr.alt").evaluate_all(
            "rs => rs.map(r => [r.dataset.token, Number(r.dataset.logprob), r.querySelector('.alt-prob').textContent])")
        top = expected[k]["top_logprobs"]
        assert [(r[0], r[1]) for r in rows] == [(t["token"], t["logprob"]) for t in top] and len(rows) == 5
        assert [r[2] for r in rows] == [shown_percent(t["logprob"]) for t in top]
    if SCREENSHOTS:
        spans.nth(13).hover()
        screenshot(page, "desktop-chat.png")
    assert not watched.problems and not watched.dialogs


def test_the_attention_heatmap_and_the_lens_equal_engine_inspect(watched, server, model):
    page = watched.page
    set_options(page, max_tokens="12", system="You are a test.")
    send(page, "Look inside.")
    wait_reply(page, 1).locator("button.inspect").click()
    canvas = page.locator("#attention-canvas")
    page.wait_for_selector("#attention-canvas[data-ready='1']")
    page.select_option("#pick-layer", "1")
    page.wait_for_selector("#attention-canvas[data-ready='1'][data-layer='1']")
    page.select_option("#pick-head", "2")
    page.wait_for_selector("#attention-canvas[data-ready='1'][data-layer='1'][data-head='2']")
    messages = [{"role": "system", "content": "You are a test."}] + conversation(page)
    ids = model.tokenizer.encode_chat(messages, add_generation_prompt=False)
    assert canvas.evaluate("c => c.tokenIds") == ids
    t = len(ids)
    assert canvas.get_attribute("data-rows") == canvas.get_attribute("data-cols") == str(t)
    values = np.array(canvas.evaluate("c => c.values"), dtype=np.float32)
    expected = model.trace(ids, attentions=True).attentions[1][2]
    assert values.shape == (t, t)
    np.testing.assert_allclose(values, expected, rtol=0, atol=2e-7)  # another process: BLAS may round differently
    np.testing.assert_array_equal(values[np.triu_indices(t, 1)], 0)
    # the pixels: a masked cell is grey, a seen one is not
    colour = """([q, k]) => { const c = document.getElementById('attention-canvas'), r = devicePixelRatio;
        const cell = Number(c.dataset.cell), m = Number(c.dataset.margin);
        return [...c.getContext('2d').getImageData(Math.floor((m + (k + .5) * cell) * r),
                                                   Math.floor((m + (q + .5) * cell) * r), 1, 1).data].slice(0, 3); }"""
    assert canvas.evaluate(f"c => ({colour})([0, {t - 1}])") == [200, 200, 200]
    assert canvas.evaluate(f"c => ({colour})([{t - 1}, {t - 1}])") != [200, 200, 200]
    heads = page.locator("#heads-canvas")
    assert (heads.get_attribute("data-rows"), heads.get_attribute("data-cols")) == ("2", "4")
    summary = head_summary(model, ids)
    got = heads.evaluate("c => c.values")
    for name in ("to_first", "to_previous", "entropy"):
        np.testing.assert_allclose(np.array(got[name]), getattr(summary, name), rtol=1e-6, atol=1e-7)
    cell, margin = float(canvas.get_attribute("data-cell")), float(canvas.get_attribute("data-margin"))
    canvas.hover(position={"x": margin + (t - 14.5) * cell, "y": margin + (t - 4.5) * cell})  # describes that cell
    info = page.text_content("#attention-info")
    assert info.startswith(f"query {t - 5} ") and f"key {t - 15} " in info
    assert info.endswith(f"{float(values[t - 5, t - 15]):.4f}")
    screenshot(page.locator("#inspector"), "desktop-attention.png")
    page.click("#tab-lens")
    page.wait_for_selector("#lens-canvas[data-ready='1']")
    lens = logit_lens(model, ids)
    first = int(page.get_attribute("#lens-canvas", "data-first"))
    assert first == max(0, t - 32)
    assert page.locator("#lens-canvas").evaluate("c => c.values") == lens.top_ids[:, first:].tolist()
    assert not watched.problems and not watched.dialogs


def test_html_in_messages_and_replies_is_shown_as_text(watched):
    page = watched.page
    set_options(page, max_tokens="40")
    attack = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold?</b>'
    send(page, attack)
    reply = wait_reply(page, 1)
    assert page.locator("article.user .body").text_content() == attack
    assert HTML_IN_REPLY in reply.locator(".body").text_content()
    reply.locator("button.show-tokens").click()
    assert page.locator(".tok", has_text="<").count() >= 3  # pieces with '<' as text too
    page.click("article.user button.edit")
    assert page.input_value("article.user .edit-box textarea") == attack
    page.click("article.user button.edit-cancel")
    assert page.locator("#messages img, #messages script, #messages b, #tooltip img").count() == 0
    assert page.evaluate("window.pwned") is None
    assert not watched.problems and not watched.dialogs


def test_regenerate_edit_new_chat_keys_and_what_is_kept(watched, server):
    page = watched.page
    set_options(page, max_tokens="8", system="Be brief.")
    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")
    page.locator("#input").press_sequentially("second line")
    assert page.input_value("#input") == "first line\nsecond line"  # Shift+Enter: a new line, nothing sent
    assert page.locator("article").count() == 0
    page.press("#input", "Enter")
    first = wait_reply(page, 1).locator(".body").text_content()
    assert page.locator("article.user .body").text_content() == "first line\nsecond line"
    page.click("article.assistant button.regenerate")
    assert wait_reply(page, 1).locator(".body").text_content() == first  # greedy: the same again
    assert page.locator("article.assistant").count() == 1
    page.click("article.user button.edit")
    page.fill("article.user .edit-box textarea", "edited question")
    page.click("article.user button.edit-send")
    reply = wait_reply(page, 1).locator(".body").text_content()
    assert conversation(page)[0] == {"role": "user", "content": "edited question"}
    assert reply == api_greedy(server, [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "edited question"}], 8)["message"]["content"]
    page.click("#new-chat")
    assert page.locator("article").count() == 0 and page.locator("#chat-list li").count() == 2
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#chat-list li").count() == 2  # conversations and settings are kept (localStorage)
    assert page.input_value("#set-temperature") == "0" and page.input_value("#set-max-tokens") == "8"
    assert page.input_value("#set-system") == "Be brief."
    page.click("#chat-list li:nth-child(2) button.open")
    assert conversation(page) == [{"role": "user", "content": "edited question"},
                                  {"role": "assistant", "content": reply}]
    assert not watched.problems and not watched.dialogs


def test_usable_at_390_pixels(browser, server):
    w = Watched(browser, server.url, PHONE)
    try:
        page = w.page
        set_options(page, max_tokens="24")
        send(page, "Hello from a phone")
        wait_reply(page, 1)
        width = "() => document.documentElement.scrollWidth"
        assert page.evaluate(width) <= PHONE["width"]  # nothing sticks out sideways
        page.click("article.assistant button.show-tokens")
        page.locator(".tok").nth(3).click()  # a tap shows the alternatives
        page.wait_for_selector("#tooltip:not([hidden])")
        screenshot(page, "phone-chat.png")
        page.click("article.assistant button.inspect")
        page.wait_for_selector("#attention-canvas[data-ready='1']")
        assert page.evaluate(width) <= PHONE["width"]  # the heatmap scrolls inside its box
        screenshot(page.locator("#inspector"), "phone-attention.png")
        page.click("#toggle-chats")
        assert page.is_visible("#new-chat")
        assert not w.problems and not w.dialogs
    finally:
        w.close()


def test_the_page_asks_for_the_api_key_and_works_once_given(browser, folder):
    s = ServerProcess("--model", str(folder), "--served-model-name", NAME, "--api-key", KEY, env=ONE_THREAD)
    try:
        s.wait_ready()
        w = Watched(browser, s.url, DESKTOP)
        page = w.page
        set_options(page, max_tokens="10")
        send(page, "Hello?")
        page.wait_for_selector("#key-panel:not([hidden])")
        assert "API key" in page.text_content("#key-panel")
        assert page.locator("article.assistant").count() == 0  # nothing generated yet
        page.fill("#key-input", "wrong-key")
        page.click("#key-save")
        page.wait_for_selector("#key-panel:not([hidden])")  # asked again
        page.fill("#key-input", KEY)
        page.click("#key-save")
        reply = wait_reply(page, 1)
        assert page.is_hidden("#key-panel")
        assert reply.locator(".body").text_content() == api_greedy(
            s, [{"role": "user", "content": "Hello?"}], 10, key=KEY)["message"]["content"]
        reply.locator("button.inspect").click()  # the inspection endpoints take the key too
        page.wait_for_selector("#attention-canvas[data-ready='1']")
        assert [p for p in w.problems if "401" not in p] == []  # only the two refused requests
        assert len([p for p in w.problems if "401" in p]) >= 2
        w.close()
    finally:
        s.stop()


# ---- the window: what a conversation sends as it grows (a 512-token model) -----------------------------------
@pytest.fixture(scope="module")
def small_server(tmp_path_factory, tinyllama_tokenizer_dir):
    """The same model with a 512-token window (stories260K's, and small enough to outgrow in a few turns)."""
    folder = make_html_reply_checkpoint(tmp_path_factory.mktemp("web-model-512"), tinyllama_tokenizer_dir, window=512)
    s = ServerProcess("--model", str(folder), "--served-model-name", NAME, env=ONE_THREAD)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def chat_shape(messages: list[dict], system: str | None) -> None:
    """Assert a request's messages: the system prompt first (when one is set), then user / assistant turns ending with
    the user's newest message, none empty."""
    if system is not None:
        assert messages[0] == {"role": "system", "content": system}
        messages = messages[1:]
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + ["user"]
    assert all(m["content"] for m in messages)


def test_the_first_message_on_a_512_token_model_gets_its_reply(browser, small_server):
    w = Watched(browser, small_server.url, DESKTOP)
    try:
        page = w.page
        page.click("#toggle-settings")
        assert page.input_value("#set-max-tokens") == ""  # by default none is sent
        page.fill("#set-temperature", "0")
        page.click("#toggle-settings")
        send(page, "Hi!")
        reply = wait_reply(page, 1)
        assert "window holds 512 tokens" in page.text_content("#window-hint")  # said where the max tokens are set
        sent = w.bodies()[-1]
        assert "max_tokens" not in sent  # the server's default: the rest of the window
        expected = api_greedy(small_server, [{"role": "user", "content": "Hi!"}], None)
        assert reply.locator(".body").text_content() == expected["message"]["content"]
        assert "max tokens reached" in reply.locator(".meta").text_content()  # this model never ends: a full window
        assert reply.locator(".meta .window").text_content() == "window 512 of 512"
        # a max tokens kept from the old page (512): clamped to what fits, after leaving the full turn out
        set_options(page, max_tokens="512")
        send(page, "And again?")
        wait_reply(page, 3)
        sent = w.bodies()[-1]
        assert 1 <= sent["max_tokens"] < 512 and sent["messages"] == [{"role": "user", "content": "And again?"}]
        assert page.locator(".window-divider").is_visible()
        assert not w.problems and not w.dialogs
    finally:
        w.close()


def test_a_ten_turn_chat_past_the_window_leaves_out_its_oldest_turns(browser, small_server):
    w = Watched(browser, small_server.url, DESKTOP)
    try:
        page = w.page
        set_options(page, max_tokens="40", system="Be brief.")
        for turn in range(10):
            send(page, f"Question {turn + 1}: and what comes next, in a few words?")
            wait_reply(page, 2 * turn + 1)
        shown = conversation(page)
        bodies = w.bodies()
        assert len(bodies) == 10  # each turn one request: none refused and sent again
        for turn, body in enumerate(bodies):
            chat_shape(body["messages"], "Be brief.")
            sent = body["messages"][1:]
            assert sent == shown[:2 * turn + 1][-len(sent):]  # the newest turns, in order
        counts = [len(b["messages"]) for b in bodies]
        assert counts[:3] == [2, 4, 6] and counts[-1] < 1 + 2 * 9 + 1  # the oldest turns were left out
        chats = page.evaluate("JSON.parse(localStorage.getItem('tinyllama.chats'))")
        replies = [m for m in chats[0]["messages"] if m["role"] == "assistant"]
        prompts = [r["meta"]["usage"]["prompt_tokens"] for r in replies]
        assert all(p + 40 <= 512 for p in prompts)  # every request fit (the server would have refused it)
        assert max(prompts[5:]) > 512 - 40 - 2 * 70  # and the window stayed full: only the oldest turns went
        notices = page.locator("article.assistant .meta .dropped")
        assert notices.count() >= 1 and notices.first.is_visible()
        assert "turn" in notices.first.text_content()
        assert page.locator(".window-divider").count() == 1 and page.locator("article.outside").count() >= 2
        page.locator(".window-divider").scroll_into_view_if_needed()
        screenshot(page, "desktop-window.png")
        assert not w.problems and not w.dialogs
    finally:
        w.close()


def test_a_failed_reply_is_never_sent_back(browser, small_server):
    w = Watched(browser, small_server.url, DESKTOP)
    try:
        page = w.page
        set_options(page, max_tokens="16")
        send(page, "Hello")
        first = wait_reply(page, 1).locator(".body").text_content()
        too_long = "word " * 700  # alone more than the window
        send(page, too_long)
        page.wait_for_selector("#error:not([hidden])")
        assert "context window is 512 tokens" in page.text_content("#error")
        assert page.locator("article").count() == 2  # the failed turn is gone from the conversation...
        assert page.input_value("#input") == too_long  # ...and its text is back in the box
        page.fill("#input", "Short again")
        page.press("#input", "Enter")
        wait_reply(page, 3)
        assert w.bodies()[-1]["messages"] == [{"role": "user", "content": "Hello"},
                                              {"role": "assistant", "content": first},
                                              {"role": "user", "content": "Short again"}]
        refused = [p for p in w.problems if "400" in p]
        assert len(refused) >= 1 and [p for p in w.problems if "400" not in p] == []
    finally:
        w.close()


# ---- following the reply ----------------------------------------------------------------------------------------
IN_VIEW_PROBE = """() => { window.inView = [];
    const step = () => {
        const a = document.querySelector("article.assistant[data-state='streaming']");
        if (a && a.querySelector('.body').textContent) {
            const body = a.querySelector('.body').getBoundingClientRect();
            const visible = Math.min(innerHeight, document.getElementById('composer').getBoundingClientRect().top);
            window.inView.push(body.bottom <= visible + 1 && body.bottom > 0);
        }
        requestAnimationFrame(step);
    };
    requestAnimationFrame(step); }"""


def slow_connection(watched, bytes_per_s: int) -> None:
    """Chromium's network throttling (DevTools) on the page: a stream arrives at `bytes_per_s`."""
    cdp = watched.context.new_cdp_session(watched.page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": bytes_per_s,
                                                  "uploadThroughput": -1})


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280x800", "390x844"])
def test_the_streaming_reply_stays_in_view_until_the_user_scrolls_up(browser, server, viewport):
    w = Watched(browser, server.url, viewport)
    try:
        page = w.page
        set_options(page, max_tokens="10")
        for turn in range(3):
            send(page, f"Short {turn}")
            wait_reply(page, 2 * turn + 1)
        set_options(page, max_tokens="1900")
        slow_connection(w, 150_000)  # ~8 s for this reply (its tokens' probabilities come along), however fast the server
        page.evaluate(IN_VIEW_PROBE)
        send(page, "Tell me a long story.")
        length = "() => document.querySelector(`article.assistant[data-index='7'] .body`)?.textContent.length || 0"
        page.wait_for_function(f"() => ({length})() > 1500")
        seen = page.evaluate("window.inView")
        assert len(seen) >= 3 and all(seen), seen  # every frame so far showed the newest text
        # the user scrolls up to read: the page stays where they are, and offers the way back
        page.mouse.move(viewport["width"] // 2, viewport["height"] // 3)
        page.mouse.wheel(0, -1200)
        page.wait_for_function("() => !document.getElementById('jump').hidden")
        page.wait_for_timeout(200)
        where = page.evaluate("scrollY")
        grown = page.evaluate(length)
        page.wait_for_function(f"() => ({length})() > {grown + 800}")
        state = page.get_attribute("article.assistant[data-index='7']", "data-state")
        assert (page.evaluate("scrollY"), state) == (where, "streaming"), page.text_content("article.assistant[data-index='7'] .meta")
        page.click("#jump")
        streaming = "() => !!document.querySelector(`article.assistant[data-state='streaming']`)"
        page.wait_for_function(f"() => ({length})() > {page.evaluate(length) + 300} || !({streaming})()")
        latest = """() => { const b = document.querySelector(`article.assistant[data-index='7'] .body`)
            .getBoundingClientRect(), c = document.getElementById('composer').getBoundingClientRect();
            return b.bottom <= Math.min(innerHeight, c.top) + 1; }"""
        assert page.evaluate(latest) and page.is_hidden("#jump")  # following again
        if page.evaluate(streaming):
            page.click("#stop")
        page.wait_for_selector("article.assistant[data-index='7']:not([data-state='streaming'])")
        assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]
        screenshot(page, f"{'phone' if viewport is PHONE else 'desktop'}-following.png")
        assert not w.problems and not w.dialogs
    finally:
        w.close()


# ---- tokens per second ------------------------------------------------------------------------------------------
def test_tokens_per_second_is_the_servers_figure(browser, small_server):
    w = Watched(browser, small_server.url, DESKTOP)
    try:
        page = w.page
        set_options(page, max_tokens="37")  # a count no other test asks for: the log line is this reply's
        send(page, "How fast?")
        reply = wait_reply(page, 1)
        shown = float(reply.locator(".meta .tps").text_content().split()[0])
        deadline = time.monotonic() + 10
        while "completion 37 tokens" not in small_server.log and time.monotonic() < deadline:
            time.sleep(0.05)
        line = next(line for line in small_server.log.splitlines() if "completion 37 tokens" in line)
        server_rate = float(re.search(r"([0-9.]+) tok/s", line).group(1))
        assert abs(shown - server_rate) <= 0.2 * server_rate, (shown, line)
        assert not w.problems and not w.dialogs
    finally:
        w.close()


# ---- the pictures: a head summary of TinyLlama's 22 x 32 heads, the lens the same way up as its PNG --------------
TEXT_SPY = """() => {
    const fill = CanvasRenderingContext2D.prototype.fillText;
    CanvasRenderingContext2D.prototype.fillText = function (text, x, y) {
        const m = this.getTransform(), r = devicePixelRatio;
        (this.canvas.drawnTexts = this.canvas.drawnTexts || []).push(
            {text: String(text), x: (m.a * x + m.c * y + m.e) / r, y: (m.b * x + m.d * y + m.f) / r, font: this.font,
             rotated: m.b !== 0});
        return fill.apply(this, arguments);
    };
}"""


@pytest.fixture(scope="module")
def heads32(tmp_path_factory, tinyllama_tokenizer_dir):
    """A random model of TinyLlama's 22 layers x 32 heads (4 KV heads), narrow, with its tokenizer."""
    folder = make_random_checkpoint(tmp_path_factory.mktemp("web-heads32"), tokenizer_from=tinyllama_tokenizer_dir,
                                    vocab_size=32000, hidden_size=128, intermediate_size=64, num_hidden_layers=22,
                                    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=256, seed=3)
    s = ServerProcess("--model", str(folder), "--served-model-name", "heads32", env=ONE_THREAD)
    try:
        yield s.wait_ready(), engine.load_model(str(folder))
    finally:
        s.stop()


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280x800", "390x844"])
def test_the_head_summary_of_32_heads_is_readable(browser, heads32, viewport):
    server, model = heads32
    w = Watched(browser, server.url, viewport)
    try:
        page = w.page
        page.evaluate(TEXT_SPY)
        set_options(page, max_tokens="6")
        send(page, "Which head looks back?")
        wait_reply(page, 1).locator("button.inspect").click()
        page.wait_for_selector("#attention-canvas[data-ready='1']")
        messages = conversation(page)
        summary = head_summary(model, model.tokenizer.encode_chat(messages, add_generation_prompt=False))
        canvas = page.locator("#heads-canvas")
        for measure in ("to_first", "to_previous", "entropy"):
            canvas.evaluate("c => { c.drawnTexts = []; }")
            page.click(f"#heads-measure button[data-measure='{measure}']")
            assert canvas.get_attribute("data-measure") == measure
            cw, ch = float(canvas.get_attribute("data-cell-width")), float(canvas.get_attribute("data-cell-height"))
            left, top = float(canvas.get_attribute("data-left")), float(canvas.get_attribute("data-top"))
            assert cw >= 30 and ch >= 18  # cells big enough for their number
            drawn = canvas.evaluate("c => c.drawnTexts")
            assert all(int(re.search(r"(\d+)px", d["font"]).group(1)) >= 10 for d in drawn)
            at = {(round(d["x"]), round(d["y"])): d["text"] for d in drawn if not d["rotated"]}
            values = getattr(summary, measure)
            for layer in range(22):  # every cell carries its value; layers run upward, the last on top
                y = round(top + (21 - layer) * ch + ch / 2)
                assert at[(round(left - 6), y)] == f"layer {layer}"
                for head in range(32):
                    assert at[(round(left + head * cw + (cw - 1) / 2), y)] == f"{values[layer, head]:.2f}"
            top_value = 1 if measure != "entropy" else max(0.5, np.ceil(2 * values.max()) / 2)
            ticks = {d["text"] for d in drawn if d["y"] > top + 22 * ch}  # the legend under the map
            assert {str(round(t * top_value, 2)).rstrip("0").rstrip(".") if t else "0"
                    for t in (0, 0.25, 0.5, 0.75, 1)} <= ticks
            assert "head → (" in " ".join(d["text"] for d in drawn)
        assert [d["text"] for d in canvas.evaluate("c => c.drawnTexts") if d["rotated"]] == ["layer (output at the top)"]
        assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]  # it scrolls in its box
        screenshot(page.locator("#inspector"), f"{'phone' if viewport is PHONE else 'desktop'}-heads-32.png")
        assert not w.problems and not w.dialogs
    finally:
        w.close()


@pytest.fixture(scope="module")
def stories_server(stories260k):
    s = ServerProcess("--model", str(stories260k), "--served-model-name", "stories260K", env=ONE_THREAD)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def blues_rgb(p: float) -> np.ndarray:
    """matplotlib's Blues at p (0..1) as 0..255 RGB: the lens PNG's colour scale."""
    from matplotlib import colormaps

    return 255 * np.array(colormaps["Blues"](float(p))[:3])


def rows_by_colour(colours: np.ndarray, probs: np.ndarray) -> list[tuple[float, int]]:
    """colours: (cols, 3) RGB sampled along one drawn row; probs: (rows, cols) each lens row's top probabilities ->
    (mean colour distance, row) for every row, closest first."""
    expected = np.array([[blues_rgb(p) for p in row] for row in probs])
    return sorted((float(np.abs(expected[r] - colours).mean()), r) for r in range(len(probs)))


def test_the_lens_reads_the_same_way_up_as_its_png(browser, stories_server, stories260k, tmp_path):
    from matplotlib.image import imread

    from engine.cli.main import main
    from engine.inspect.plots import LENS_CELL_H, LENS_CELL_W, LENS_LEFT_PX, LENS_TOP_PX

    w = Watched(browser, stories_server.url, DESKTOP)
    try:
        page = w.page
        set_options(page, max_tokens="12")
        send(page, "Once upon a time")
        reply = wait_reply(page, 1)
        text = "Once upon a time" + reply.locator(".body").text_content()
        r = httpx.post(stories_server.url + "/v1/completions", timeout=60,  # the page continued the text, greedy
                       json={"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0})
        assert text == "Once upon a time" + r.json()["choices"][0]["text"]
        reply.locator("button.inspect").click()
        page.wait_for_selector("#attention-canvas[data-ready='1']")
        page.click("#tab-lens")
        page.wait_for_selector("#lens-canvas[data-ready='1']")
        model = engine.load_model(str(stories260k))
        lens = logit_lens(model, text)
        canvas = page.locator("#lens-canvas")
        assert canvas.evaluate("c => c.tokenIds") == lens.token_ids.tolist()
        png = tmp_path / "lens.png"
        assert main(["inspect", "lens", "--model", str(stories260k), "--out", str(png), text]) == 0
        pixels = 255 * imread(str(png))[..., :3]
        rows, t = lens.top_probs.shape
        page_pixels = """([left, top, cw, ch, rows, cols]) => {
            const c = document.getElementById('lens-canvas'), r = devicePixelRatio, ctx = c.getContext('2d');
            return Array.from({length: rows}, (_, i) => Array.from({length: cols}, (_, j) =>
                [...ctx.getImageData(Math.floor((left + j * cw + 5) * r), Math.floor((top + i * ch + 5) * r), 1, 1)
                    .data].slice(0, 3))); }"""
        geometry = [float(canvas.get_attribute(f"data-{k}")) for k in ("left", "top", "cell-width", "cell-height")]
        on_page = np.array(page.evaluate(page_pixels, geometry + [rows, t]), dtype=float)
        for drawn in range(rows):  # each drawn row, top to bottom, is the same lens row in both pictures
            in_png = np.array([pixels[LENS_TOP_PX + drawn * LENS_CELL_H + 5, LENS_LEFT_PX + j * LENS_CELL_W + 5]
                               for j in range(t)])
            png_match, page_match = rows_by_colour(in_png, lens.top_probs), rows_by_colour(on_page[drawn], lens.top_probs)
            assert png_match[0][0] < 3 and page_match[0][0] < 3, (drawn, png_match[:2], page_match[:2])
            assert png_match[0][1] == page_match[0][1] == rows - 1 - drawn  # the output on top, the embeddings below
        screenshot(page.locator("#inspector"), "desktop-lens.png")
        assert not w.problems and not w.dialogs
    finally:
        w.close()


def test_a_new_user_gets_a_streamed_reply_from_stories260k(browser, stories_server):
    """What the README's steps lead to: `tinyllama serve --model stories260K`, the page at /, default settings."""
    w = Watched(browser, stories_server.url, PHONE)
    try:
        page = w.page
        assert "completes text" in page.text_content("#model-name")  # no chat template: said, and handled
        assert "continues text" in page.text_content("#messages")
        page.evaluate("""() => { window.seen = [];
            new MutationObserver(() => { const b = document.querySelector('article.assistant .body');
                if (b) window.seen.push(b.textContent); })
              .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
        send(page, "Once upon a time")
        reply = wait_reply(page, 1)
        text = reply.locator(".body").text_content()
        assert len({s for s in page.evaluate("window.seen") if s and s != text}) >= 2  # it streamed
        assert w.bodies("v1/completions")[-1]["prompt"] == "Once upon a time" and "max_tokens" not in w.bodies(
            "v1/completions")[-1]
        assert len(text) > 100 and "tokens/s" in reply.locator(".meta").text_content()
        screenshot(page, "phone-stories260k.png")
        assert not w.problems and not w.dialogs
    finally:
        w.close()


SLOW_LOAD = """import time, engine.cli.common as common
_load = common.load
def _slow(args):
    time.sleep(8)
    return _load(args)
common.load = _slow"""


def test_a_message_sent_while_the_model_loads_waits_for_it(browser, stories260k):
    """A new user opens the page as soon as the server prints its address: the model may still be loading (the
    first start also builds the compiled kernels). The page says so, and a message waits for the model."""
    s = ServerProcess("--model", str(stories260k), env=ONE_THREAD, preamble=SLOW_LOAD)
    try:
        deadline = time.monotonic() + 120
        while not re.search(r"listening on (http://127\.0\.0\.1:\d+)", s.log) and time.monotonic() < deadline:
            time.sleep(0.05)
        s.url = re.search(r"listening on (http://127\.0\.0\.1:\d+)", s.log).group(1)
        w = Watched(browser, s.url, DESKTOP)
        page = w.page
        assert "loading the model" in page.text_content("#model-name")
        send(page, "Once upon a time")
        page.wait_for_selector("article.assistant .body:has-text('trying again in')")  # the server's 503, said
        reply = wait_reply(page, 1)
        assert len(reply.locator(".body").text_content()) > 100
        assert "completes text" in page.text_content("#model-name")  # learnt once loaded: no chat template
        assert w.bodies("v1/completions")[-1]["prompt"] == "Once upon a time"
        assert [p for p in w.problems if "503" not in p] == [] and not w.dialogs
        w.close()
    finally:
        s.stop()
