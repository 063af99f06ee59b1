"""The web page at / in a real browser: headless Chromium (Debian's package) driven by Playwright, against the real
`tinyllama serve` in a subprocess, with a small model that has TinyLlama's tokenizer and chat template and whose
greedy reply contains HTML (tests/web_support.py). Every number the page shows is checked against the API or
against engine.inspect / Model.trace in this process.

Skips (with the reason) without Playwright for Python or a Chromium binary (`apt-get install chromium`).
TINYLLAMA_WEB_SCREENSHOTS=FOLDER makes the tests also write the README's screenshots there.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.inspect.attention import head_summary
from engine.inspect.lens import logit_lens
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
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 360, "height": 740}
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
        self.response = p.goto(url + "/")
        p.wait_for_selector("body[data-ready='1']")

    @staticmethod
    def stopping(request) -> bool:  # the Stop button aborts its fetch on purpose
        return request.url.endswith("/v1/chat/completions") and "ABORTED" in (request.failure or "")

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


def api_greedy(server, messages, max_tokens: int, key: str | None = None) -> dict:
    """The API's greedy reply with 5 top log-probabilities: the first choice."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60,
                   json={"messages": messages, "temperature": 0, "max_tokens": max_tokens, "logprobs": True,
                         "top_logprobs": 5})
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
    send(page, "Tell me a long story.")
    page.wait_for_function("() => (document.querySelector('article.assistant .body')?.textContent.length || 0) > 20")
    page.click("#stop")
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


def test_usable_at_360_pixels(browser, server):
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
