"""The browser test page: its routes, and the page itself in headless Chromium.

The browser is Debian's `chromium` driven by Playwright through `executable_path`; nothing
downloads a browser. Without /usr/bin/chromium the browser tests are skipped (CI installs it
from .ci/system-packages). Screenshots land in test-artifacts/ (testpage.png, and
testpage-resumed.png after a reconnect in the middle of an answer).
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import BrowserContext, Page, sync_playwright
from starlette.applications import Starlette
from starlette.testclient import TestClient

from server.config import Config, ServerConfig
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
