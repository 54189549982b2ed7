"""The browser test page: its routes, and the page itself in headless Chromium.

The browser is Debian's `chromium` driven by Playwright through `executable_path`; nothing
downloads a browser. Without /usr/bin/chromium the browser tests are skipped (CI installs it
from .ci/system-packages). Screenshots land in test-artifacts/ (testpage.png, and
testpage-resumed.png after a reconnect in the middle of an answer, testpage-loading.png while
the model loads).
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import BrowserContext, Page, sync_playwright
from starlette.applications import Starlette
from starlette.testclient import TestClient

from server.config import Config, ServerConfig
from server.inference.echo import EchoEngine
from server.inference.executor import ExecutorLimits, InferenceExecutor
from server.testpage import routes
from tests.chattools import ROOT, TcpProxy
from tests.serving import Running, make_config, serve, slow_echo

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"


def page_app(**server: object) -> TestClient:
    return TestClient(Starlette(routes=routes(Config(server=ServerConfig(**server)))))  # type: ignore[arg-type]


def test_the_page_and_its_files_are_served() -> None:
    client = page_app()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'data-auth="off"' in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
    # no build step and nothing from elsewhere: no absolute URLs in the three files
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert re.search(r"https?://|(src|href)=\"//", text) is None


def test_the_page_asks_for_a_token_when_auth_is_on() -> None:
    assert 'data-auth="on"' in page_app(auth_tokens=("t",)).get("/").text


def test_the_page_can_be_turned_off() -> None:
    assert page_app(test_page=False).get("/").status_code == 404


def scene(width: int = 480, height: int = 320) -> bytes:
    """A picture worth looking at in the screenshot: sky, sun, hills."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        shade = int(120 + 100 * y / height)
        draw.line([(0, y), (width, y)], fill=(90, shade, 235))
    draw.ellipse((330, 40, 410, 120), fill=(255, 210, 60))
    points = [(x, int(230 + 35 * math.sin(x / 45))) for x in range(0, width + 1, 8)]
    draw.polygon([(0, height), *points, (width, height)], fill=(60, 150, 70))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserContext]:
    if (not Path(CHROMIUM).exists() or shutil.which("chromium") is None) and not os.environ.get("CI"):
        pytest.skip("Debian's chromium is not installed (see .ci/system-packages; in CI this fails)")
    profile = ROOT / "test-artifacts" / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)  # a fresh user-data-dir every run
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1200, "height": 760},
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def slow() -> Iterator[Running]:
    with serve(make_config(), slow_echo(step_delay=0.01)) as running:
        yield running


# Records every text a turn's status line (.meta) shows, in order, into window.metaSeen.
RECORD_META = """() => {
  window.metaSeen = [];
  new MutationObserver((records) => {
    for (const record of records) {
      const meta = record.target.closest && record.target.closest(".meta");
      if (meta) for (const node of record.addedNodes) window.metaSeen.push(node.textContent);
      for (const node of record.addedNodes) {
        const m = node.querySelector && node.querySelector(".meta");
        if (m) window.metaSeen.push(m.textContent);
      }
    }
  }).observe(document.getElementById("turns"), { childList: true, subtree: true });
}"""


def answer_text(page: Page) -> str:
    return "".join(page.locator(".turn").last.locator(".answer-text").all_inner_texts())


def test_upload_a_picture_ask_and_read_the_streamed_answer(
    browser: BrowserContext, slow: Running, tmp_path: Path
) -> None:
    picture = tmp_path / "hills.png"
    picture.write_bytes(scene())
    page = browser.new_page()
    page.set_default_timeout(15_000)
    page.goto(slow.http + "/")
    page.locator("#status.online").wait_for()
    page.set_input_files("#file", str(picture))
    page.locator("#preview:not([hidden])").wait_for()
    assert "hills.png (480×320)" in page.inner_text("#picture-name")
    page.fill("#question", "What is in this picture? Describe the sky, the sun and the hills.")
    page.evaluate(RECORD_META)
    page.click("#send")
    # streamed: part of the answer is on the page while the question is still running
    streaming = """() => { const t = document.querySelector('.turn:last-child');
        return t && !t.classList.contains('done')
          && t.querySelector('.answer-text').textContent.length > 5 }"""
    page.wait_for_function(streaming)
    page.locator(".turn.done").wait_for()
    expected = "echo: What is in this picture? Describe the sky, the sun and the hills. [480x320]"
    assert answer_text(page) == expected
    assert "TTFT" in page.inner_text(".turn .meta") and "tokens/s" in page.inner_text(".turn .meta")
    # while the picture was read the turn said so, after its queue place and before the answer
    seen = page.evaluate("() => window.metaSeen")
    assert "reading the picture…" in seen, seen
    assert seen.index("queued, position 1") < seen.index("reading the picture…") < seen.index("answering…")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "testpage.png"), full_page=True)
    page.close()


def test_the_page_reconnects_and_resumes_an_answer(browser: BrowserContext, slow: Running) -> None:
    with TcpProxy(slow.port) as proxy:
        page = browser.new_page()
        page.set_default_timeout(15_000)
        page.goto(f"http://127.0.0.1:{proxy.port}/")
        page.locator("#status.online").wait_for()
        question = "tell me a long story about a lighthouse keeper and the sea, please"
        page.fill("#question", question)
        page.press("#question", "Enter")
        page.wait_for_function("() => document.querySelector('.turn .answer-text').textContent.length > 20")
        proxy.drop(refuse_for=0.3)
        page.locator(".turn.done").wait_for()
        assert answer_text(page) == f"echo: {question}"  # nothing lost, nothing repeated
        assert "resumed: the answer continues" in page.inner_text(".turn")
        assert "resumed after 1 reconnect" in page.inner_text(".turn .meta")
        assert "reconnected" in page.inner_text("#status")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "testpage-resumed.png"))
        page.close()


def test_the_token_field_when_auth_is_on(browser: BrowserContext) -> None:
    with serve(make_config(auth_tokens=("sesame",))) as running:
        page = browser.new_page()
        page.set_default_timeout(15_000)
        page.goto(running.http + "/")
        page.locator("#auth:not([hidden])").wait_for()
        page.fill("#token", "wrong")
        page.click("#auth button")
        page.locator("#status-text:has-text('refused')").wait_for()
        page.fill("#token", "sesame")
        page.click("#auth button")
        page.locator("#status.online").wait_for()
        page.fill("#question", "hi")
        page.click("#send")
        page.locator(".turn.done").wait_for()
        assert answer_text(page) == "echo: hi"
        page.close()


def held_loading(release: threading.Event, fail: str = "") -> InferenceExecutor:
    """The real executor over an engine that loads until *release* is set (40% done
    meanwhile), then fails with *fail* when it is given."""

    def factory(progress: Callable[[float], None]) -> EchoEngine:
        progress(0.4)
        release.wait(60)
        if fail:
            raise RuntimeError(fail)
        return EchoEngine()

    return InferenceExecutor(factory, ExecutorLimits(max_new_tokens=64), model_name="held")


def test_the_page_shows_the_model_loading_and_asks_only_once_it_is_ready(browser: BrowserContext) -> None:
    release = threading.Event()
    try:
        with serve(make_config(), held_loading(release), ready=False) as running:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(running.http + "/")
            page.locator("#status.loading").wait_for()  # connected, but not a green "connected"
            assert "loading the model, 40%" in page.inner_text("#status-text")
            assert page.is_disabled("#send")
            page.fill("#question", "hello?")
            page.press("#question", "Enter")
            assert page.locator(".turn").count() == 0  # nothing was asked
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "testpage-loading.png"))
            release.set()
            page.locator("#status.online").wait_for()
            page.locator("#send:enabled").wait_for()
            page.click("#send")
            page.locator(".turn.done").wait_for()
            assert answer_text(page) == "echo: hello?"
            page.close()
    finally:
        release.set()


def test_the_page_shows_why_the_model_failed(browser: BrowserContext) -> None:
    release = threading.Event()
    release.set()
    with serve(make_config(), held_loading(release, "no checkpoint in /models/x"), ready=False) as running:
        page = browser.new_page()
        page.set_default_timeout(15_000)
        page.goto(running.http + "/")
        page.locator("#status.failed").wait_for()
        assert "the model failed to load: no checkpoint in /models/x" in page.inner_text("#status-text")
        assert page.is_disabled("#send")
        page.close()


def test_ask_is_disabled_while_disconnected(browser: BrowserContext, slow: Running) -> None:
    with TcpProxy(slow.port) as proxy:
        page = browser.new_page()
        page.set_default_timeout(15_000)
        page.goto(f"http://127.0.0.1:{proxy.port}/")
        page.locator("#status.online").wait_for()
        page.locator("#send:enabled").wait_for()
        proxy.drop(refuse_for=3600)  # down until we say so
        page.locator("#status.reconnecting").wait_for()
        assert page.is_disabled("#send")
        page.fill("#question", "anyone there?")
        page.press("#question", "Enter")
        assert page.locator(".turn").count() == 0  # not queued behind a dead link
        proxy.drop(refuse_for=0)  # back
        page.locator("#status.online").wait_for(timeout=30_000)
        page.locator("#send:enabled").wait_for()
        page.close()


def test_a_cancelled_turn_reads_cancelled(browser: BrowserContext) -> None:
    # 0.05 s a character: the 300-character answer takes 15 s, plenty of time to cancel it
    with serve(make_config(), slow_echo(step_delay=0.05)) as running:
        page = browser.new_page()
        page.set_default_timeout(15_000)
        page.goto(running.http + "/")
        page.locator("#status.online").wait_for()
        page.fill("#question", "tell me a long story about a lighthouse keeper and the sea " * 5)
        page.click("#send")
        page.wait_for_function("() => document.querySelector('.turn .answer-text').textContent.length > 5")
        page.click("#cancel")
        page.locator(".turn.cancelled").wait_for()
        assert page.inner_text(".turn .meta") == "cancelled"  # not "cancelled: cancelled" in red
        assert page.locator(".turn.failed").count() == 0
        page.locator("#send:enabled").wait_for()  # ready for the next question
        page.close()
