"""The web page at `/`, in a real headless browser: Debian's chromium driven by Playwright (no
browser download; the test installs the apt package where it is missing and it can)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import httpx
import pytest
from playwright.sync_api import sync_playwright
from server_fixtures import start_server, tiny_model_path, wait_until

CHROMIUM = "/usr/bin/chromium"
API_KEY = "page-key"


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt-get when missing and we are root; else a skip that says why."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (needs apt-get and root)")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot install chromium: {' '.join(cmd)} exited {done.returncode}: {done.stderr[-400:]}")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"apt-get installed chromium but {CHROMIUM} is missing")
    return CHROMIUM


@pytest.fixture(scope="module")
def server():
    srv = start_server(tiny_model_path(), api_key=API_KEY, num_kv_blocks=256)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    executable = ensure_chromium()
    with sync_playwright() as p:
        # --no-sandbox: chromium refuses its sandbox as root (tests here run as root).
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    # Playwright's waits evaluate their conditions as strings, which the page's CSP forbids.
    context = browser.new_context(bypass_csp=True)
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.elsewhere = []  # requests to anywhere but this server (a CDN, say): there must be none
    pg.errors = []
    pg.chat_bodies = []
    pg.on("request", lambda r: None if r.url.startswith(server.base_url) or r.url.startswith("data:")
          else pg.elsewhere.append(r.url))
    pg.on("request", lambda r: pg.chat_bodies.append(json.loads(r.post_data))
          if r.url.endswith("/v1/chat/completions") else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()


def test_the_page_and_its_files_are_served_locally(server):
    r = httpx.get(server.base_url + "/")  # no key needed for the page itself
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for name in ("main.js", "chat.js", "panel.js", "prometheus.js", "plots.js", "style.css"):
        f = httpx.get(f"{server.base_url}/static/{name}")
        assert f.status_code == 200 and f.text, name
        assert "http://" not in f.text and "https://" not in f.text  # nothing fetched from elsewhere
    assert "javascript" in httpx.get(server.base_url + "/static/main.js").headers["content-type"]


def test_chat_streams_and_the_server_panel_moves(page, server):
    page.goto(server.base_url + "/")
    assert page.title() == "llmserve"
    page.wait_for_function("document.querySelector('#m-generated').textContent.endsWith('tokens')")
    generated_before = int(page.text_content("#m-generated").split()[0])
    assert "API key" in page.text_content("#status")  # /v1/models said 401: the page asks for the key

    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")  # commits the field (change event)
    page.wait_for_function("document.querySelector('#model-name').textContent.includes('tiny')")

    page.fill("#system-prompt", "Be brief.")
    page.fill("#temperature", "0")
    # Long enough that the reply spans many reads of the stream, even on a busy machine.
    page.fill("#max-tokens", "200")
    # Count every change of the reply's text while it streams.
    page.evaluate("""() => {
        window.replyUpdates = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('.message.assistant');
            if (replies.length) window.replyUpdates.push(replies[replies.length - 1].textContent.length);
        }).observe(document.querySelector('#messages'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#prompt", "What is the capital of France?")
    page.click("#send")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Done')", timeout=60_000)

    reply = page.text_content(".message.assistant")
    updates = page.evaluate("window.replyUpdates")
    assert reply and len([n for n in updates if n > 0]) >= 2  # the text grew piece by piece: it streamed
    assert updates[-1] == len(reply)
    assert page.text_content(".message.user") == "What is the capital of France?"

    body = page.chat_bodies[-1]
    assert body["stream"] is True and body["model"] == "tiny"
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "What is the capital of France?"}]
    assert (body["temperature"], body["max_tokens"]) == (0, 200) and "response_format" not in body

    # The panel polls /metrics each second: the generated-token count and the TTFT histogram move.
    page.wait_for_function(f"parseInt(document.querySelector('#m-generated').textContent) > {generated_before}")
    page.wait_for_function("/n=[1-9]/.test(document.querySelector('#ttft-summary').textContent)")
    assert page.text_content("#m-tps") != "–"

    # Nothing of the chat (or the key) is kept anywhere but the page's memory.
    stored = page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""]
    assert page.elsewhere == [] and page.errors == []
    assert wait_until(lambda: server.engine.stats().kv_usage == 0.0)


def test_structured_output_switch_and_a_wrong_key(page, server):
    page.goto(server.base_url + "/")
    page.fill("#api-key", API_KEY)
    page.check("#json-mode")
    page.fill("#max-tokens", "4")
    page.fill("#prompt", "Give me a JSON object.")
    page.press("#prompt", "Enter")  # Enter sends
    page.wait_for_function("!document.querySelector('#send').disabled && document.querySelector('#status')"
                           ".textContent !== 'Generating…'", timeout=60_000)
    assert page.chat_bodies[-1]["response_format"] == {"type": "json_object"}

    page.fill("#api-key", "wrong")
    page.fill("#prompt", "hello")
    page.click("#send")
    page.wait_for_selector(".message.error")
    assert "API key" in page.text_content(".message.error")
    assert page.text_content("#status") == "Wrong or missing API key."
    assert page.elsewhere == [] and page.errors == []
