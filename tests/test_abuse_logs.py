"""Abuse suite, logs and access: no secret in the log, no forged log line, no cross-site use.

- A: `vlbridge serve` (a real process, both log formats) with tokens configured: neither a
  token nor a whole session id appears anywhere on its stderr, while the access lines stay.
- B: an ask id with a newline is refused with an error frame; the text log keeps one record
  on one line whatever its arguments hold.
- C: a browser on another site (an `Origin` that is neither the server's own nor allowed)
  is refused at the WebSocket handshake and on the HTTP API unless it has a valid token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import orjson
import pytest
from playwright.sync_api import BrowserContext
from websockets.exceptions import InvalidStatus

from server.config import load_config
from server.errors import ConfigError
from server.logs import JsonFormatter, RedactingFilter, TextFormatter, redact
from tests.conftest import make_png
from tests.serving import Running, make_config, serve
from tests.test_testpage import browser  # noqa: F401 (the headless Chromium fixture)
from tests.wsclient import Client

SECRET = "s3cret-T0KEN-never-logged"
EVIL = "https://evil.example"

# ---- A: no token, no whole session id in a real server's log ---------------------------------


class ServeProcess:
    """`vlbridge serve` in a subprocess; every stderr line is kept (read on a thread)."""

    def __init__(self, config: Path, log_format: str) -> None:
        self.log_format = log_format
        self.lines: list[str] = []
        self.port: int | None = None
        self._started = threading.Event()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "--log-format",
                log_format,
                "serve",
                "--config",
                str(config),
            ],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            found = re.search(r"Uvicorn running on http://[\d.]+:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                self._started.set()
        self._started.set()  # ended without starting: the wait below reports it

    def wait_started(self) -> int:
        assert self._started.wait(60), "the server did not start in time"
        assert self.port, "the server did not start:\n" + "".join(self.lines)
        return self.port

    def stop(self) -> str:
        """SIGTERM, wait for the exit; the whole stderr."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        self._reader.join(10)
        return "".join(self.lines)


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServeProcess]:
    config = tmp_path / "vlbridge.toml"
    config.write_text(
        f'[server]\nport = 0\nshutdown_grace = 1.0\nauth_tokens = ["{SECRET}"]\n'
        '[model]\npath = "builtin:instant"\n'
    )
    process = ServeProcess(config, request.param)
    try:
        yield process
    finally:
        process.process.kill()
        process.process.wait()


async def _use_every_secret_bearing_path(port: int) -> str:
    """Open, ask, drop, resume (query and header tokens); return the session id."""
    ws = f"ws://127.0.0.1:{port}/ws"
    first = await Client.open(f"{ws}?token={SECRET}")
    session = first.session
    await first.ask("q1", "hello")
    assert (await first.until_end("q1"))[-1]["type"] == "done"
    first.conn.transport.abort()  # the pipe breaks: the session is parked for resume
    again = await Client.open(f"{ws}?token={SECRET}&resume={session}&last_seq=0")
    assert again.hello["resumed"] is True
    await again.close()
    header = await Client.open(ws, additional_headers={"Authorization": f"Bearer {SECRET}"})
    await header.close()
    with pytest.raises(InvalidStatus):  # a wrong token is refused; the attempt is logged
        await Client.open(f"{ws}?token=wrong-{SECRET}")
    # a resume id that tries to forge a log line (the refusal logs a prefix of it)
    forged = await Client.open(f"{ws}?token={SECRET}&resume=x%0AFAKE%20LINE&last_seq=0")
    assert forged.hello["resumed"] is False
    await forged.close()
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/v1/models?token={SECRET}")
        assert response.status_code == 200
    return session


@pytest.mark.slow
@pytest.mark.parametrize("served", ["text", "json"], indirect=True)
def test_the_log_holds_no_token_and_no_whole_session_id(served: ServeProcess) -> None:
    port = served.wait_started()
    session = asyncio.run(_use_every_secret_bearing_path(port))
    log = served.stop()
    assert SECRET not in log, "a bearer token was logged"
    assert session not in log, "a whole session id was logged"
    lines = log.splitlines()
    assert not [line for line in lines if line.startswith("FAKE")], "a client forged a log line"
    if served.log_format == "text":
        assert "resume of x\\nFAKE L refused" in log  # the newline shown escaped, on its line
    else:
        lines = [orjson.loads(line)["msg"] for line in lines]  # and each line is one JSON object
    messages = "\n".join(lines)
    # The access lines are still there, with method/path and the outcome, the secrets masked.
    assert '"WebSocket /ws?token=***" [accepted]' in messages
    assert f'"WebSocket /ws?token=***&resume={session[:8]}***&last_seq=0" [accepted]' in messages
    assert '"WebSocket /ws?token=***" 403' in messages
    assert f"session {session[:8]}: resumed" in messages  # the service's own lines: a short prefix


def test_redaction_covers_headers_and_every_token_parameter() -> None:
    assert redact("GET /v1/models?access_token=abc&x=1") == "GET /v1/models?access_token=***&x=1"
    assert redact("/ws?resume=T0JQhlj9X5yq3cS4i2lW_g&token=t") == "/ws?resume=T0JQhlj9***&token=***"
    assert redact("{'authorization': 'Bearer abc.def'}") == "{'authorization': 'Bearer ***'}"
    assert redact("Authorization: Basic Zm9vOmJhcg==") == "Authorization: Basic ***"
    assert redact("sent Bearer abc") == "sent Bearer ***"
    assert redact("3 tokens, max_tokens=5") == "3 tokens, max_tokens=5"
    record = logging.makeLogRecord({"msg": "%s - %s", "args": ("peer", f"GET /ws?token={SECRET}")})
    record.exc_info = None
    assert RedactingFilter().filter(record)
    assert SECRET not in TextFormatter().format(record) and SECRET not in JsonFormatter().format(record)


def test_a_traceback_is_redacted_too() -> None:
    try:
        raise ValueError(f"bad url /ws?token={SECRET}")
    except ValueError:
        record = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info()})
    RedactingFilter().filter(record)
    assert SECRET not in TextFormatter().format(record)
    assert SECRET not in JsonFormatter().format(record)
    assert "token=***" in JsonFormatter().format(record)


# ---- B: no forged log line ----------------------------------------------------------------------


async def test_an_ask_id_with_a_newline_is_refused_and_the_session_stays_usable() -> None:
    with serve(make_config()) as running:
        client = await Client.open(running.ws)
        for bad in ("x\nFAKE LOG LINE", "x\rY", "red\x1b[31m", "tab\tid", "line\u2028sep"):
            await client.ask(bad, "hello")
            error = await client.recv()
            assert error["type"] == "error" and error["code"] == "bad_request", error
            assert "control characters" in error["message"] and "id" not in error
        await client.ask("ok", "still here?")
        assert (await client.until_end("ok"))[-1]["type"] == "done"
        await client.close()


def test_the_text_log_keeps_one_record_on_one_line() -> None:
    record = logging.makeLogRecord(
        {"name": "vlbridge.ws", "msg": "session %s: ask %s", "args": ("abc", "x\nFAKE LOG LINE\r\x1b[2J")}
    )
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.endswith("ask x\\nFAKE LOG LINE\\r\\x1b[2J")


# ---- C: cross-site use --------------------------------------------------------------------------


async def _handshake(running: Running, origin: str | None, query: str = "") -> int:
    """The HTTP status of a /ws handshake: 101 when accepted."""
    headers = {"Origin": origin} if origin else {}
    try:
        client = await Client.open(running.ws + query, additional_headers=headers)
    except InvalidStatus as refused:
        return refused.response.status_code
    await client.close()
    return 101


async def test_a_cross_site_handshake_is_refused_unless_allowed(caplog: pytest.LogCaptureFixture) -> None:
    with serve(make_config(allowed_origins=("https://app.example",))) as running:
        own = f"http://127.0.0.1:{running.port}"
        assert await _handshake(running, None) == 101  # not a browser: as before
        assert await _handshake(running, own) == 101  # the test page's own origin
        assert await _handshake(running, "https://APP.example:443/") == 101  # allowed, normalized
        with caplog.at_level(logging.WARNING, "vlbridge.ws"):
            assert await _handshake(running, EVIL) == 403
        assert f"origin '{EVIL}' refused" in caplog.text
        for origin in ("null", f"https://127.0.0.1:{running.port}.evil.example", "http://127.0.0.1:1"):
            assert await _handshake(running, origin) == 403, origin


async def test_with_tokens_a_valid_token_is_enough_from_any_origin() -> None:
    with serve(make_config(auth_tokens=(SECRET,))) as running:
        assert await _handshake(running, EVIL, f"?token={SECRET}") == 101
        assert await _handshake(running, EVIL) == 403  # and without one: unauthorized


def test_the_refusal_body_names_the_origin_and_no_secret() -> None:
    with serve(make_config()) as running:
        response = httpx.get(
            running.http + "/ws",
            headers={
                "Origin": EVIL,
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"
        assert EVIL in response.json()["error"]["message"]


@contextlib.contextmanager
def other_site() -> Iterator[str]:
    """A web site on another port (another origin): its page tries the /ws given in its hash."""
    page = b"""<!doctype html><script>
      const ws = new WebSocket(location.hash.slice(1));
      ws.onopen = () => { document.title = "open"; ws.close(); };
      ws.onerror = () => { document.title = "refused"; };
    </script>"""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    site = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()


@pytest.mark.slow
def test_a_real_browser_on_another_site_is_refused_unless_allowed(browser: BrowserContext) -> None:  # noqa: F811
    with other_site() as site:
        for allowed, outcome in (((), "refused"), ((site,), "open")):
            with serve(make_config(allowed_origins=allowed)) as running:
                page = browser.new_page()
                page.goto(f"{site}/#{running.ws}")
                page.wait_for_function("() => document.title !== ''", timeout=15_000)
                assert page.title() == outcome, allowed
                page.close()


def _analyze(running: Running, headers: dict[str, str]) -> httpx.Response:
    """A form POST any page could send without a CORS preflight."""
    return httpx.post(
        running.http + "/v1/analyze?stream=false",
        headers=headers,
        files={"image": ("a.png", make_png(), "image/png")},
        data={"prompt": "what?"},
    )


def test_the_http_api_refuses_a_cross_site_post_unless_allowed() -> None:
    with serve(make_config(allowed_origins=("https://app.example",))) as running:
        own = f"http://127.0.0.1:{running.port}"
        for headers in ({}, {"Origin": own}, {"Origin": "https://app.example"}):
            assert _analyze(running, headers).status_code == 200, headers
        refused = _analyze(running, {"Origin": EVIL})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        chat = httpx.post(
            running.http + "/v1/chat/completions",
            headers={"Origin": EVIL, "Content-Type": "text/plain"},
            content=b'{"messages": [{"role": "user", "content": "hi"}]}',
        )
        assert chat.status_code == 403
        assert httpx.get(running.http + "/v1/models", headers={"Origin": EVIL}).status_code == 403
        assert httpx.get(running.http + "/health", headers={"Origin": EVIL}).status_code == 200


def test_with_tokens_the_http_api_takes_a_valid_token_from_any_origin() -> None:
    with serve(make_config(auth_tokens=(SECRET,))) as running:
        assert _analyze(running, {"Origin": EVIL, "Authorization": f"Bearer {SECRET}"}).status_code == 200
        assert _analyze(running, {"Origin": EVIL}).status_code == 401


def test_allowed_origins_must_be_origins(tmp_path: Path) -> None:
    config = tmp_path / "vlbridge.toml"
    config.write_text('[server]\nallowed_origins = ["https://Example.com/"]\n')
    assert load_config(config).server.allowed_origins == ("https://example.com",)
    config.write_text('[server]\nallowed_origins = ["example.com"]\n')
    with pytest.raises(ConfigError, match=r"server\.allowed_origins"):
        load_config(config)
