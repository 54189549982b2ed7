"""Abuse of the HTTP side, over real sockets: bodies past the limits (chunked or declared),
pictures that decode to too much, clients that send too slowly, and webhook requests that
are stale, malformed or meant to make the server talk."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import psutil
import pytest
from starlette.applications import Starlette

from bot.feishu.webhook import Webhook
from server.http.platform import mount
from tests.abuse_server import ENCRYPT_KEY, Remote, subprocess_server
from tests.conftest import png_declaring
from tests.fakefeishu.events import EventFactory
from tests.fakefeishu.webhook import NONCE, SIGNATURE, TIMESTAMP, build_request, signature
from tests.serving import make_config, serve

MB = 1 << 20
OFFERED = 300 * MB


# -- helpers ----------------------------------------------------------------------------------


class PeakRss:
    """The highest resident memory of process *pid* while the block runs (sampled every 5 ms)."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.before = self.peak = self.process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.before


def raw_exchange(
    port: int, data: bytes, timeout: float = 20.0, until_close: bool = False
) -> tuple[bytes, bool]:
    """Send *data*, then read until the server closes or (unless *until_close*) a whole
    response is in. Returns (what was read, whether the server closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock, timeout, until_close)


def read_response(sock: socket.socket, timeout: float, until_close: bool = False) -> tuple[bytes, bool]:
    received = b""
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return received, True
        except TimeoutError:
            raise AssertionError(
                f"neither a response nor a close within {timeout} s; got {received!r}"
            ) from None
        if not data:
            return received, True
        received += data
        head, sep, body = received.partition(b"\r\n\r\n")
        length = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
        if not until_close and sep and length and len(body) >= int(length[0].split(b":")[1]):
            return received, False


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == code and error["message"]


# -- A: bodies are limited however they are sent ------------------------------------------------

# (path, content type, the start of a body of the right shape, how the refusal looks)
FLOODS = [
    ("/v1/chat/completions", "application/json", b'{"messages": [{"role": "user", "content": "', "too_large"),
    (
        "/v1/analyze",
        "multipart/form-data; boundary=zz",
        b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n",
        "too_large",
    ),
    ("/feishu/events", "application/json", b'{"encrypt": "', "msg"),
]


@pytest.fixture(scope="module")
def remote() -> Iterator[Remote]:
    with subprocess_server() as running:
        yield running


async def flood(url: str, content_type: str, start: bytes, total: int) -> httpx.Response:
    """POST *total* bytes as a chunked body (no Content-Length), made as they are sent."""
    block = b"x" * MB

    async def body() -> AsyncIterator[bytes]:
        yield start
        for _ in range(total // MB):
            yield block

    async with httpx.AsyncClient(timeout=120) as client:
        return await client.post(url, content=body(), headers={"Content-Type": content_type})


@pytest.mark.slow
@pytest.mark.parametrize(("path", "content_type", "start", "refusal"), FLOODS)
async def test_a_chunked_body_far_over_the_limit_is_refused_without_being_buffered(
    remote: Remote, path: str, content_type: str, start: bytes, refusal: str
) -> None:
    warm = await flood(remote.http + path, content_type, start, 0)  # lazy imports etc. before measuring
    assert warm.status_code < 500
    with PeakRss(remote.proc.pid) as rss:
        response = await flood(remote.http + path, content_type, start, OFFERED)
    assert rss.growth < 50 * MB, (
        f"the server grew by {rss.growth / MB:.0f} MB while {OFFERED // MB} MB were offered"
    )
    assert response.status_code == 413, response.text
    if refusal == "msg":  # the webhook answers in Feishu's shape
        assert response.json() == {"msg": "the body is too large"}
    else:
        assert_error(response, 413, refusal)
    assert httpx.get(remote.http + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize(("path", "content_type", "start", "refusal"), FLOODS)
def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    remote: Remote, path: str, content_type: str, start: bytes, refusal: str
) -> None:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {2 * 1024 * MB}\r\n\r\n"
    ).encode()
    response, _ = raw_exchange(remote.port, head + start)  # the body never comes
    status, body = status_and_json(response)
    assert status == 413
    if refusal == "msg":
        assert body == {"msg": "the body is too large"}
    else:
        assert body["error"]["code"] == refusal


def cancelled(running) -> float:
    """vlbridge_requests_total{route="/v1/chat/completions", code="cancelled"}, read from /metrics
    (a cancel is counted as a request, never as an error)."""
    text = httpx.get(running.http + "/metrics", timeout=10).text
    for line in text.splitlines():
        if (
            line.startswith("vlbridge_requests_total{")
            and 'code="cancelled"' in line
            and "/v1/chat/completions" in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_leaves_halfway_through_its_body_is_no_server_error(
    server, caplog: pytest.LogCaptureFixture
) -> None:
    before = cancelled(server)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + b"Content-Length: 1000\r\n\r\n" + b'{"messages": [')
    deadline = time.monotonic() + 15
    errors: list[logging.LogRecord] = []
    while cancelled(server) == before and not errors:
        assert time.monotonic() < deadline, "the server never noticed the client leaving"
        errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
        time.sleep(0.02)
    assert not errors, errors[0].getMessage()  # it was an 'Exception in ASGI application' traceback


# -- B and other bad input on the HTTP routes: JSON errors, never a 500 ------------------------


@pytest.fixture(scope="module")
def server():
    with serve(make_config(max_image_bytes=MB, max_images=2)) as running:
        yield running


def test_b_a_decompression_bomb_is_too_large_on_analyze(server) -> None:
    files = {"image": ("bomb.png", png_declaring(30000, 30000), "image/png")}
    response = httpx.post(server.http + "/v1/analyze", files=files, data={"prompt": "?"}, timeout=30)
    assert_error(response, 413, "too_large")
    assert "pixels" in response.json()["error"]["message"]


def test_b_a_decompression_bomb_is_too_large_on_chat_completions(server) -> None:
    url = "data:image/png;base64," + base64.b64encode(png_declaring(30000, 30000)).decode()
    content = [{"type": "text", "text": "?"}, {"type": "image_url", "image_url": {"url": url}}]
    response = httpx.post(
        server.http + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}]},
        timeout=30,
    )
    assert_error(response, 413, "too_large")


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({"Content-Type": "multipart/form-data"}, b"--zz\r\n", 400, "bad_request"),  # no boundary
        ({"Content-Type": "multipart/form-data; boundary=zz"}, b"garbage", 400, "bad_request"),
        (
            {"Content-Type": "multipart/form-data; boundary=zz"},
            b"--zz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--zz--\r\n",  # a part without a name
            400,
            "bad_request",
        ),
    ],
)
def test_malformed_multipart_is_a_json_400(
    server, headers: dict, body: bytes, status: int, code: str
) -> None:
    response = httpx.post(server.http + "/v1/analyze", content=body, headers=headers, timeout=30)
    assert_error(response, status, code)


# -- C: clients that send too slowly are cut off -------------------------------------------------

DEADLINES = {"header_timeout": 1.0, "body_timeout": 1.0, "body_min_rate": 500.0}


@pytest.fixture(scope="module")
def strict():
    with serve(make_config(**DEADLINES)) as running:
        yield running


def assert_timed_out(response: bytes, closed: bool, elapsed: float, what: str) -> None:
    assert closed, f"the connection was kept open: {response!r}"
    assert elapsed < 10, elapsed  # the deadline is 1 s; wide margin for a busy machine
    status, body = status_and_json(response)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert what in body["error"]["message"]


@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/comp"])
def test_c_a_request_line_that_stops_is_closed(strict, sent: bytes) -> None:
    started = time.monotonic()
    response, closed = raw_exchange(strict.port, sent, until_close=True)
    assert_timed_out(response, closed, time.monotonic() - started, "headers")


def test_c_the_header_deadline_applies_to_each_request_on_a_kept_alive_connection(strict) -> None:
    with socket.create_connection(("127.0.0.1", strict.port), timeout=20) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        response, closed = read_response(sock, 20)
        assert response.startswith(b"HTTP/1.1 200") and not closed
        sock.sendall(b"GET /hea")
        started = time.monotonic()
        response, closed = read_response(sock, 20, until_close=True)
    assert_timed_out(response, closed, time.monotonic() - started, "headers")


def test_c_a_body_that_stops_is_cut(strict, caplog: pytest.LogCaptureFixture) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        response, closed = raw_exchange(
            strict.port, head + b"Content-Length: 100000\r\n\r\n" + b'{"messages": [', until_close=True
        )
    assert_timed_out(response, closed, time.monotonic() - started, "body")
    assert any("did not arrive in time" in record.getMessage() for record in caplog.records)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]  # no traceback
    assert httpx.get(strict.http + "/health", timeout=10).status_code == 200


async def test_c_a_slow_but_steady_client_is_not_cut(strict) -> None:
    """3,000 bytes at ~2,000 B/s take 1.5 s, past body_timeout (1 s), but the pace (500 B/s
    needed) earns 1 + 6 s: the request completes and is answered."""
    payload = json.dumps({"messages": [{"role": "user", "content": "steady " + "x" * 2950}]}).encode()

    async def trickle() -> AsyncIterator[bytes]:
        for offset in range(0, len(payload), 200):
            yield payload[offset : offset + 200]
            await asyncio.sleep(0.1)

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            strict.http + "/v1/chat/completions",
            content=trickle(),
            headers={"Content-Type": "application/json", "Content-Length": str(len(payload))},
        )
    assert response.status_code == 200, response.text
    assert time.monotonic() - started > 1.0  # it really was slower than body_timeout
    assert response.json()["choices"][0]["message"]["content"].startswith("echo: steady")


# -- D: the Feishu webhook -------------------------------------------------------------------------

EVENTS = EventFactory(token="token")
WINDOW = 300  # seconds either way a signed request may be from now


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[httpx.AsyncClient, list[dict]]]:
    received: list[dict] = []

    async def persist(bodies: list[dict]) -> None:
        received.extend(bodies)

    hook = Webhook(encrypt_key=ENCRYPT_KEY, verification_token="token", persist=persist)
    app = Starlette(routes=[mount(route) for route in hook.routes()])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bot") as client:
        yield client, received
    hook.close()


async def post_event(client: httpx.AsyncClient, timestamp: float | None = None) -> httpx.Response:
    event = EVENTS.text("hello")
    stamp = None if timestamp is None else str(int(timestamp))
    request = build_request(event, encrypt_key=ENCRYPT_KEY, timestamp=stamp)
    return await client.post("/feishu/events", content=request.body, headers=request.headers)


async def test_d_a_fresh_signed_event_is_accepted(webhook) -> None:
    client, received = webhook
    response = await post_event(client)
    assert response.status_code == 200, response.text
    for _ in range(500):  # handed over through the loop
        if received:
            break
        await asyncio.sleep(0.01)
    assert received and received[0]["event"]["message"]["content"]


@pytest.mark.parametrize("age", [2 * 86400, WINDOW + 60, -(WINDOW + 60)])
async def test_d_a_signed_event_outside_the_time_window_is_refused(
    webhook, age: float, caplog: pytest.LogCaptureFixture
) -> None:
    client, received = webhook
    response = await post_event(client, timestamp=time.time() - age)
    assert response.status_code == 401
    assert "timestamp" in response.json()["msg"]
    assert any("timestamp" in record.getMessage() for record in caplog.records)
    await asyncio.sleep(0.05)  # nothing may have been handed over
    assert received == []


async def test_d_sdk_errors_are_not_echoed_to_the_caller(webhook, caplog: pytest.LogCaptureFixture) -> None:
    client, received = webhook
    # Signed correctly, but the encrypted payload is not AES output: the SDK raises inside.
    body = json.dumps({"encrypt": base64.b64encode(b"not aes at all!").decode()}).encode()
    ts, nonce = str(int(time.time())), "n1"
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP: ts,
        NONCE: nonce,
        SIGNATURE: signature(ts, nonce, ENCRYPT_KEY, body),
    }
    response = await client.post("/feishu/events", content=body, headers=headers)
    assert 400 <= response.status_code < 500
    message = response.json()["msg"]
    assert message in ("the request could not be verified", "the event could not be read")
    assert any("SDK:" in record.getMessage() for record in caplog.records)  # the detail is logged
    assert received == []


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[1, 2]", b""])
async def test_d_a_body_that_is_not_a_json_object_is_a_400(webhook, body: bytes) -> None:
    client, _ = webhook
    response = await client.post("/feishu/events", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"msg": "the body must be a JSON object"}
