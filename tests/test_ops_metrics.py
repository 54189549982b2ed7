"""What operators read, over real sockets: /metrics' request families and /health's identity.

- URLs no route serves (scanners) share one route label, so they add no series;
- a client that cancels or goes away is counted as cancelled, not as an error, on every route;
- the request and error counters count the same events (an error is a request with its labels);
- ``vlbridge_build_info`` and /health's ``version`` and ``uptime_seconds``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bot.conversation import Conversation, Settings
from bot.inbox import Inbox
from bot.memory import Memory
from bot.types import ChatType, InboundMessage, MessageKind
from protocol.v1 import ErrorCode
from server import metrics
from server.answers import AnswerGateway
from server.http.errors import STATUS
from server.inference.echo import EchoEngine
from server.inference.executor import ExecutorLimits, InferenceExecutor
from tests.serving import Running, make_config, serve, slow_echo
from tests.test_conversation_queue import Channel
from tests.waiting import DEADLINE, until, until_blocking
from tests.wsclient import Client

Counts = dict[tuple[str, str], float]  # (route, code) -> value

LONG = "a question whose echo takes seconds to stream " * 8  # ~400 characters, 20 ms each


def page(running: Running) -> str:
    return httpx.get(running.http + "/metrics", timeout=30).text


def counts(text: str, name: str) -> Counts:
    return {
        (sample.labels["route"], sample.labels["code"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def requests_and_errors(running: Running) -> tuple[Counts, Counts]:
    text = page(running)
    return counts(text, "vlbridge_requests_total"), counts(text, "vlbridge_errors_total")


def grown(after: Counts, before: Counts) -> Counts:
    """The series that grew, by how much."""
    return {key: value - before.get(key, 0) for key, value in after.items() if value != before.get(key, 0)}


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    with serve(make_config(), slow_echo(step_delay=0.02)) as server:
        yield server


def test_urls_no_route_serves_share_one_label(running: Running) -> None:
    requests, errors = requests_and_errors(running)
    scanned = [f"/scan-{n}/{name}" for n, name in enumerate(["wp-admin", ".env", "x.php", "cgi-bin"] * 25)]
    with httpx.Client(base_url=running.http, timeout=30) as client:
        for path in scanned:
            assert client.get(path).status_code == 404
        assert client.post("/health").status_code == 405  # a route that exists, asked the wrong way
    requests_after, errors_after = requests_and_errors(running)
    assert grown(requests_after, requests) == {
        ("unmatched", "not_found"): 100,
        ("/health", "method_not_allowed"): 1,
    }
    assert grown(errors_after, errors) == grown(requests_after, requests)
    routes = {route for route, _ in requests_after} | {route for route, _ in errors_after}
    assert not any(route.startswith("/scan-") for route in routes), routes


async def test_a_cancelled_websocket_answer_is_cancelled_not_an_error(running: Running) -> None:
    requests, errors = await asyncio.to_thread(requests_and_errors, running)
    client = await Client.open(running.ws)
    try:
        await client.ask("c1", LONG)
        while (await client.recv())["type"] != "delta":  # the answer runs
            pass
        await client.send({"type": "cancel", "id": "c1"})
        end = (await client.until_end("c1"))[-1]
        assert (end["type"], end.get("code")) == ("error", "cancelled"), end
    finally:
        await client.close()
    requests_after, errors_after = await asyncio.to_thread(requests_and_errors, running)
    assert grown(requests_after, requests) == {("ws", "cancelled"): 1}
    assert grown(errors_after, errors) == {}


def _left_early(running: Running, route: str, requests: Counts) -> Counts:
    """Wait until *route*'s answer is counted (its stream is closed by then); what grew."""

    def counted() -> Counts:
        grew = grown(requests_and_errors(running)[0], requests)
        return grew if any(key[0] == route for key in grew) else {}

    grew = until_blocking(counted, f"the answer on {route} counted", poll=0.05)
    assert running.service.answers.running == 0
    return grew


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        # multipart: a file of another field than "image" makes it so; a prompt alone is accepted
        ("/v1/analyze", {"data": {"prompt": LONG}, "files": {"unused": ("u", b"", "text/plain")}}),
        ("/v1/chat/completions", {"json": {"stream": True, "messages": [{"role": "user", "content": LONG}]}}),
    ],
)
def test_a_stream_the_client_leaves_is_cancelled_not_an_error(
    running: Running, path: str, kwargs: dict[str, object]
) -> None:
    requests, errors = requests_and_errors(running)
    with httpx.stream("POST", running.http + path, timeout=30, **kwargs) as response:  # type: ignore[arg-type]
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        while "delta" not in next(lines):  # the answer has begun
            pass
        assert running.service.answers.running == 1
    # leaving the block closed the connection mid-answer
    grew = _left_early(running, path, requests)
    assert grew == {(path, "cancelled"): 1}
    assert grown(requests_and_errors(running)[1], errors) == {}


def test_a_client_gone_before_a_whole_answer_is_cancelled_not_an_error(running: Running) -> None:
    """/v1/chat/completions without streaming: the client closes its socket while it waits."""
    requests, errors = requests_and_errors(running)
    body = orjson.dumps({"messages": [{"role": "user", "content": LONG}]})
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", running.port), timeout=30) as sock:
        sock.sendall(head + body)
        until_blocking(lambda: running.service.answers.running, "the answer to run")
    grew = _left_early(running, "/v1/chat/completions", requests)
    assert grew == {("/v1/chat/completions", "cancelled"): 1}
    assert grown(requests_and_errors(running)[1], errors) == {}


def test_errors_and_requests_count_the_same_events() -> None:
    def broken(progress: object) -> EchoEngine:
        raise RuntimeError("no such model")

    failed = InferenceExecutor(broken, ExecutorLimits(max_batch=2, queue_size=4, max_new_tokens=16))
    with serve(make_config(), failed) as server:
        requests, errors = requests_and_errors(server)
        route = "/v1/chat/completions"
        bad = httpx.post(
            server.http + route, content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400, bad.text
        body = {"messages": [{"role": "user", "content": "hello"}]}
        unavailable = httpx.post(server.http + route, json=body)
        assert unavailable.status_code == 503, unavailable.text
        requests_after, errors_after = requests_and_errors(server)
    expected = {(route, "bad_request"): 1, (route, "unavailable"): 1}
    assert grown(requests_after, requests) == expected
    assert grown(errors_after, errors) == expected
    # and over everything this process counted so far: every error is a request with its labels
    for key, value in errors_after.items():
        assert requests_after.get(key) == value, (key, value, requests_after.get(key))
    assert not any(code in ("ok", "cancelled") for _, code in errors_after)


def test_build_info_and_health_name_the_version_and_uptime(running: Running) -> None:
    version = metadata.version("vlbridge")
    [info] = [
        sample
        for family in text_string_to_metric_families(page(running))
        for sample in family.samples
        if sample.name == "vlbridge_build_info"
    ]
    assert info.value == 1 and info.labels["version"] == version, info
    assert info.labels["python"].count(".") == 2 and info.labels["torch"], info
    first = httpx.get(running.http + "/health").json()
    assert first["version"] == version
    assert isinstance(first["uptime_seconds"], float) and first["uptime_seconds"] >= 0
    later = until_blocking(
        lambda: (
            (body := httpx.get(running.http + "/health").json())["uptime_seconds"] > first["uptime_seconds"]
            and body
        ),
        "uptime to grow",
        poll=0.05,
    )
    assert later["version"] == version


def test_every_error_code_a_route_can_answer_is_one_outcome() -> None:
    """The code label comes from one enum: the wire codes, the HTTP error codes, ok, cancelled."""
    outcomes = {outcome.value for outcome in metrics.Outcome}
    assert {code.value for code in ErrorCode} <= outcomes
    assert set(STATUS) <= outcomes
    assert {code for code in outcomes if not metrics.Outcome(code).error} == {"ok", "cancelled"}


async def test_a_feishu_answer_the_user_cancels_is_cancelled_not_an_error(tmp_path: Path) -> None:
    """The Feishu conversation through the gateway's "feishu" route, as the adapter has it."""
    gateway = AnswerGateway(slow_echo())
    await gateway.start()
    inbox = Inbox.sqlite(tmp_path / "inbox.sqlite3", platform="feishu", retention_hours=1)
    await inbox.open()
    conversation = Conversation(
        gateway.route("feishu"), Settings(language="en"), Memory(inbox, context_hours=1, rate_per_minute=10)
    )
    conversation.cancels.start(conversation.cancel_local)
    channel = Channel()

    def said(message_id: str, text: str) -> InboundMessage:
        return InboundMessage(message_id, "oc_1", ChatType.PRIVATE, "ou_1", MessageKind.TEXT, text=text)

    def scraped() -> tuple[Counts, Counts]:
        text = generate_latest(metrics.REGISTRY).decode()
        return counts(text, "vlbridge_requests_total"), counts(text, "vlbridge_errors_total")

    requests, errors = scraped()
    try:
        asked = asyncio.create_task(
            conversation.handle(said("om_1", LONG), channel, bot_id="", arrived_at=0.0)
        )
        await until(
            lambda: any(line.startswith("echo") for line in channel.answer_sink(said("om_1", "")).shown),
            "the answer streaming",
        )
        await conversation.handle(said("om_2", "/cancel"), channel, bot_id="", arrived_at=0.0)
        await asyncio.wait_for(asked, DEADLINE)
        await until(lambda: gateway.running == 0, "the answer to end")
    finally:
        await conversation.cancels.stop()
        await gateway.stop()
        await inbox.close()
    requests_after, errors_after = scraped()
    assert grown(requests_after, requests) == {("feishu", "cancelled"): 1}
    assert grown(errors_after, errors) == {}
