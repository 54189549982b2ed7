"""docker/nginx.conf in front of a `vlbridge serve` process: a real nginx, a real instance of
the echo engine (answers as long as the question, no model).

nginx's WebSocket idle timeout is shrunk to 3 s and the instance pings every second, so that
the relation docs/deploy.md states (a proxy's idle timeout above the ping interval) is seen
both ways in seconds instead of minutes.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed

from server.config import ServerConfig
from tests.feishu_service import Service
from tests.haproxy import free_port
from tests.nginx import DEPLOY_CONFIG, Nginx, body_limit, needs_nginx, render, run_nginx
from tests.openai_upstreams import echo_config, spawned
from tests.waiting import DEADLINE
from tests.wsclient import Client

pytestmark = needs_nginx

WS_IDLE_TIMEOUT = 3.0  # nginx's proxy_read_timeout for /ws in these tests, seconds
IDLE = 10.0  # how long a session stays idle through it
LIMITS = ServerConfig(max_image_bytes=8192, max_images=2)  # small, so that uploads stay small


@dataclass
class Front:
    instance: Service
    nginx: Nginx


@contextmanager
def fronted(directory: Path, ping_interval: float) -> Iterator[Front]:
    """An echo instance pinging every *ping_interval* seconds (one answer at a time: the
    executor's batch is 1) behind docker/nginx.conf."""
    server = (
        f"ping_interval = {ping_interval}\nping_timeout = 5.0\n"  # room for a busy machine's pong
        f"max_image_bytes = {LIMITS.max_image_bytes}\nmax_images = {LIMITS.max_images}\n"
    )
    with spawned(echo_config(directory / "instance", server, "max_batch = 1")) as instance:
        port = free_port()
        config = render(
            DEPLOY_CONFIG.read_text(),
            directory / "nginx",
            port,
            instance.port,
            f"{WS_IDLE_TIMEOUT:g}s",
            body_limit(LIMITS),
        )
        with run_nginx(config, directory / "nginx", port) as nginx:
            yield Front(instance, nginx)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    with fronted(tmp_path_factory.mktemp("front"), ping_interval=1.0) as made:
        yield made


async def stay_idle(client: Client, seconds: float) -> int:
    """Read *client* for *seconds* (answering pings, nothing else sent); the pings seen. Fails
    if the connection ends meanwhile."""
    end = time.monotonic() + seconds
    pings = 0
    while (left := end - time.monotonic()) > 0:
        try:
            frame = await client.recv_any(timeout=left)
        except TimeoutError:
            break
        assert frame["type"] == "ping", frame
        pings += 1
    return pings


async def until_cut(client: Client) -> ConnectionClosed:
    """Read *client* (answering pings) until its connection ends; that ending."""
    try:
        while True:
            await client.recv_any()
    except ConnectionClosed as closed:
        return closed


async def test_pings_keep_an_idle_session_open_through_nginx_and_without_them_it_is_cut(
    front: Front, tmp_path: Path
) -> None:
    with fronted(tmp_path, ping_interval=10.0) as sparse:  # pings further apart than nginx waits
        async with AsyncExitStack() as stack:
            kept = await Client.open(front.nginx.ws)
            stack.push_async_callback(kept.close)
            cut = await Client.open(sparse.nginx.ws)
            pings, closed = await asyncio.gather(stay_idle(kept, IDLE), until_cut(cut))

            # nginx ended the sparse session after its idle timeout, before the first ping and
            # long before the server would (ping_interval + ping_timeout = 15 s; then with
            # close code 1011): no close frame at all, the TCP connection just closed.
            assert closed.rcvd is None, closed
            assert [frame for frame in cut.frames if frame["type"] == "ping"] == []

            # The session that was pinged every second is still there and still answers.
            assert pings >= 2, pings  # ~10; a busy machine may delay a few
            await kept.ask("q", "still there?", max_tokens=32)
            done = (await kept.until_end("q"))[-1]
            assert done["type"] == "done" and done["text"] == "echo: still there?", done


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """(event name, data) of each Server-Sent Event of *response*, as they arrive."""
    name = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, orjson.loads(line.removeprefix("data: "))


async def test_events_pass_through_nginx_as_they_come(front: Front) -> None:
    """A question that waits in the queue gets its "queued" event through nginx while it waits:
    a buffering proxy would hold those few bytes until the answer's text pushed them out."""
    direct = f"http://127.0.0.1:{front.instance.port}/v1/analyze"
    question = "a long streamed answer, please. " * 600
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=DEADLINE))
        # The executor's one place taken by an answer of 300,000 characters (seconds of work),
        # asked directly; it is cancelled below by going away.
        blocker = await stack.enter_async_context(
            http.stream("POST", direct, files={"prompt": (None, "x" * 299_000)})
        )
        blocker_events = sse_events(blocker)
        async for name, _ in blocker_events:
            if name == "delta":
                break
        async with http.stream(
            "POST", f"{front.nginx.http}/v1/analyze", files={"prompt": (None, question)}
        ) as waiting:
            assert waiting.headers["content-type"].startswith("text/event-stream")
            events = sse_events(waiting)
            first = await anext(events)
            assert first[0] == "queued", first
            health = (await http.get(f"http://127.0.0.1:{front.instance.port}/health")).json()
            assert (health["active"], health["queue_depth"]) == (1, 1), health  # still waiting
            await blocker_events.aclose()
            await blocker.aclose()  # the blocker goes: this question starts
            rest = [event async for event in events]
    names = [name for name, _ in rest]
    started = names.index("started")  # after any queue-position updates
    assert set(names[:started]) <= {"queued"} and names[-1] == "done", names
    deltas = [data["text"] for name, data in rest if name == "delta"]
    assert len(deltas) > 1 and "".join(deltas) == "echo: " + question


def noise_png(size: int) -> bytes:
    """A PNG of at least *size* bytes (noise does not compress)."""
    side = 16
    while True:
        buffer = io.BytesIO()
        Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, "PNG")
        if len(buffer.getvalue()) >= size:
            return buffer.getvalue()
        side *= 2


async def test_uploads_over_a_limit_get_the_json_error_shape_not_an_html_page(front: Front) -> None:
    url = f"{front.nginx.http}/v1/analyze"
    async with httpx.AsyncClient(timeout=DEADLINE) as http:
        # Over server.max_image_bytes, under nginx's limit: the service's own answer, naming
        # the picture and the limit.
        picture = noise_png(LIMITS.max_image_bytes + 1)
        assert len(picture) < body_limit(LIMITS)
        refused = await http.post(url, files={"image": ("a.png", picture, "image/png")})
        assert refused.status_code == 413
        assert refused.headers["content-type"] == "application/json"
        error = refused.json()["error"]
        assert error["code"] == "too_large" and error["message"].startswith("picture 1 is"), error

        # Over nginx's own limit (beyond anything the service reads): nginx answers, in the
        # same shape.
        huge = noise_png(body_limit(LIMITS) + 1)
        refused = await http.post(url, files={"image": ("b.png", huge, "image/png")})
        assert refused.status_code == 413
        assert refused.headers["content-type"] == "application/json"
        assert refused.json()["error"]["code"] == "too_large"
        assert "front end" in refused.json()["error"]["message"]
