"""The chat page in headless Chromium (Playwright) against the server on the real default model:
type a message and watch the answer stream in, keep the conversation, stop a generation."""
from __future__ import annotations

import json
import os
import time

import httpx
import pytest

CHROMIUM = os.environ.get("PLAINLM_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no chromium at {CHROMIUM}")]
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server():
    from plainlm.model import load_model
    from plainlm.pull import pull
    from plainlm.server.app import create_app
    from plainlm.server.cli import make_tokenizer
    from plainlm.server.engine import Engine
    from plainlm.server.testing import ServerThread
    m = load_model(str(pull(quiet=True)))
    eng = Engine(m, make_tokenizer(m), n_slots=2, max_queue=4, n_ctx=1024).start()
    try:
        with ServerThread(create_app(eng, "smollm2")) as url:
            yield url, eng
    finally:
        eng.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(browser, url, max_tokens):
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    page.goto(url + "/")
    page.click("#toggle-settings")
    page.eval_on_selector("#temperature", "e => { e.value = '0'; e.dispatchEvent(new Event('change')); }")
    page.fill("#max_tokens", str(max_tokens))
    # record every text the answer bubble shows while streaming
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            const b = document.querySelectorAll('.msg.assistant .bubble');
            if (b.length) window.__seen.push(b[b.length - 1].firstChild ? b[b.length - 1].firstChild.textContent || '' : '');
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    return page


def test_chat_streams_and_keeps_conversation(server, browser, tmp_path):
    url, eng = server
    page = open_page(browser, url, 8)
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    page.fill("#input", "What is the capital of France?")
    page.press("#input", "Enter")
    assert page.locator(".msg.user .bubble").first.inner_text() == "What is the capital of France?"
    page.wait_for_selector(".msg.assistant .meta", timeout=120_000)
    answer = page.locator(".msg.assistant .bubble").first.evaluate("b => b.firstChild.textContent")
    assert answer.strip()
    seen = [s for s in page.evaluate("window.__seen") if s]
    assert len(set(seen)) >= 2, seen               # the text grew piece by piece: it streamed
    assert answer.startswith(seen[0])
    meta = page.locator(".msg.assistant .meta").first.inner_text()
    assert "tokens" in meta
    assert bodies[0]["stream"] is True and bodies[0]["max_tokens"] == 8 and bodies[0]["temperature"] == 0

    # a second turn sends the whole conversation
    page.fill("#input", "And of Italy?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .meta').length == 2", timeout=120_000)
    roles = [m["role"] for m in bodies[1]["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert bodies[1]["messages"][1]["content"] == answer
    page.screenshot(path=str(tmp_path / "chat.png"))
    if os.environ.get("PLAINLM_SCREENSHOT"):
        page.screenshot(path=os.environ["PLAINLM_SCREENSHOT"])

    # the conversation survives a reload (kept in the browser)
    page.reload()
    assert page.locator(".msg").count() == 4
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.close()


def test_stop_button(server, browser):
    url, eng = server
    page = open_page(browser, url, 400)
    page.fill("#input", "Write a long story about a dragon.")
    page.press("#input", "Enter")
    assert page.locator("#stop").is_visible()
    page.wait_for_function("(document.querySelector('.msg.assistant .bubble').textContent || '').length > 5",
                           timeout=120_000)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant .meta", timeout=10_000)
    assert page.locator(".msg.assistant .meta").inner_text() == "stopped"
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    # the server noticed and freed the slot well before 400 tokens
    t0 = time.time()
    while time.time() - t0 < 10:
        if httpx.get(url + "/health").json()["slots_busy"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(url + "/health").json()["slots_busy"] == 0
    assert eng.metrics.get("plainlm_requests_total", {"finish_reason": "cancelled"}) >= 1
    page.close()
