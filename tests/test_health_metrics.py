"""/health, /metrics, the HAProxy agent check (also with a real HAProxy) and platform adapters."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.agentcheck import AgentCheck
from server.health import Status, agent_line, assess
from server.inference.api import ExecutorState, ExecutorStats
from server.platform import HttpRequest, HttpResponse, HttpRoute
from tests.haproxy import DEPLOY_CONFIG, HAProxy, free_port, needs_haproxy, render, run_haproxy
from tests.serving import make_config, serve, slow_echo
from tests.waiting import until_blocking
from tests.wsclient import Client


def stats(state: ExecutorState = ExecutorState.READY, active: int = 0, queued: int = 0) -> ExecutorStats:
    return ExecutorStats(state, 1.0, "m", "cpu", queued, 8, active, 2, 0.0, 0, 0)


def test_weight_falls_as_the_executor_fills_and_agent_words_follow() -> None:
    idle, half, full = stats(), stats(active=2, queued=3), stats(active=2, queued=8)
    assert [assess(s, True, False).weight for s in (idle, half, full)] == [100, 50, 1]
    assert agent_line(half, assess(half, True, False)) == "up 50%"
    assert agent_line(full, assess(full, True, False)) == "up 0%"  # only busy answers there
    assert assess(idle, False, False).status is Status.DEGRADED
    assert agent_line(idle, assess(idle, True, True)) == "drain"  # shutting down
    loading = stats(ExecutorState.LOADING)
    assert (assess(loading, True, False).status, agent_line(loading, assess(loading, True, False))) == (
        Status.LOADING,
        "drain",
    )
    failed = stats(ExecutorState.FAILED)
    assert (
        assess(failed, True, False).http_status == 503
        and agent_line(failed, assess(failed, True, False)) == "down"
    )


class FakePlatform:
    """A PlatformAdapter as the Feishu one is: routes, start/drain/stop, health."""

    name = "fake"

    def __init__(self) -> None:
        self.events: list[str] = []
        self.up = True

    def routes(self) -> list[HttpRoute]:
        async def hook(request: HttpRequest) -> HttpResponse:
            return HttpResponse(200, b"hooked: " + await request.read_body(100), "text/plain")

        return [HttpRoute("POST", "/fake/events", hook)]

    async def start(self) -> None:
        self.events.append("start")

    async def drain(self, deadline: float) -> None:
        self.events.append("drain")

    async def stop(self) -> None:
        self.events.append("stop")

    def health(self) -> dict[str, Any]:
        return {"connected": self.up}

    def healthy(self) -> bool:
        return self.up


def test_health_reports_load_sessions_and_platforms() -> None:
    platform = FakePlatform()
    with serve(make_config(), platforms=[platform]) as running:
        assert platform.events == ["start"]
        assert httpx.post(running.http + "/fake/events", content=b"hi").text == "hooked: hi"
        too_big = httpx.post(running.http + "/fake/events", content=b"x" * 101)
        assert too_big.status_code == 413, too_big.text  # the shared body limit holds for platforms too
        response = httpx.get(running.http + "/health")
        body = response.json()
        assert response.status_code == 200 and body["status"] == "healthy" and body["weight"] == 100
        for key in (
            "queue_depth",
            "active",
            "max_batch",
            "gpu_memory",
            "sessions",
            "model",
            "tokens_per_second",
        ):
            assert key in body
        assert body["platforms"] == {"fake": {"connected": True}}
        platform.up = False
        response = httpx.get(running.http + "/health")
        assert response.status_code == 200 and response.json()["status"] == "degraded"
    assert platform.events == ["start", "drain", "stop"]


def test_health_is_503_while_the_model_loads(demo_model_dir) -> None:
    with serve(make_config(str(demo_model_dir)), ready=False) as running:
        first = httpx.get(running.http + "/health")
        if first.json()["state"] == "loading":  # the tiny model may already be there
            assert first.status_code == 503 and first.json()["status"] == "loading"
            assert first.json()["weight"] == 0


def sample(text: str, name: str) -> float:
    """The value of the sample *name* (with its labels) in a /metrics page; 0 when absent."""
    line = next((line for line in text.splitlines() if line.startswith(name + " ")), f"{name} 0")
    return float(line.rsplit(" ", 1)[1])


async def test_metrics_expose_requests_latency_sessions_pings_and_fds() -> None:
    # docker/prometheus/alerts.yml divides the queue by its capacity and the fds by their limit
    with serve(make_config(ping_interval=0.1, ping_timeout=0.5, executor={"queue_size": 37})) as running:
        counted = (
            'vlbridge_requests_total{code="ok",route="ws"}',
            'vlbridge_errors_total{code="bad_request",route="ws"}',
            "vlbridge_ws_pings_sent_total",
            "vlbridge_ws_ping_rtt_seconds_count",
        )
        before = (await asyncio.to_thread(httpx.get, running.http + "/metrics")).text
        client = await Client.open(running.ws)
        await client.ask("m", "count me")
        await client.until_end("m")
        await client.send("{broken")
        await client.recv()
        while (await client.recv_any())["type"] != "ping":  # a server ping, answered
            pass
        await client.send({"type": "ping"})  # the server reads our pong before this ping
        assert (await client.recv())["type"] == "pong"
        text = (await asyncio.to_thread(httpx.get, running.http + "/metrics")).text
        await client.close()
    for name in counted:  # the registry is the process's: earlier tests counted too
        assert sample(text, name) > sample(before, name), name
    assert sample(text, "vlbridge_queue_capacity") == 37
    assert sample(text, "process_max_fds") > 0
    for name in (
        'vlbridge_requests_total{code="ok",route="ws"}',
        'vlbridge_errors_total{code="bad_request",route="ws"}',
        "vlbridge_request_duration_seconds_bucket",
        "vlbridge_time_to_first_token_seconds_bucket",
        "vlbridge_queue_depth",
        "vlbridge_batch_size",
        "vlbridge_tokens_per_second",
        'vlbridge_ws_sessions{state="connected"} 1.0',
        "vlbridge_ws_pings_sent_total",
        "vlbridge_ws_pings_missed_total",
        "vlbridge_ws_ping_rtt_seconds_bucket",
        "vlbridge_gpu_memory_used_bytes",
        "process_open_fds",
    ):
        assert name in text, name


def read_agent(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.makefile().readline().strip()


def test_the_agent_says_ready_only_where_it_is_owed() -> None:
    """ "ready" ends any DRAIN in HAProxy, an operator's too: said in the first serving reply to
    a load balancer and in the first after this agent told it "drain", not in every one."""
    line = ["up 100%"]
    agent = AgentCheck("127.0.0.1", 0, lambda: line[0])
    assert agent.reply("10.0.0.1") == "ready up 100%"  # may hold a drain of a previous process
    assert agent.reply("10.0.0.1") == "up 100%"  # an operator's drain stays
    assert agent.reply("10.0.0.2") == "ready up 100%"  # each load balancer on its own
    line[0] = "down"
    assert agent.reply("10.0.0.1") == "down"
    line[0] = "up 40%"
    assert agent.reply("10.0.0.1") == "up 40%"  # "down" is no administrative state
    line[0] = "drain"
    assert agent.reply("10.0.0.1") == "drain"
    assert agent.reply("10.0.0.1") == "drain"
    line[0] = "up 70%"
    assert agent.reply("10.0.0.1") == "ready up 70%"  # ends its own drain
    assert agent.reply("10.0.0.1") == "up 70%"
    assert agent.reply("10.0.0.2") == "up 70%"  # never drained by this agent
    for n in range(100):  # many peers: the oldest are forgotten and owed "ready" again
        agent.reply(f"10.1.0.{n}")
    assert agent.reply("10.0.0.2") == "ready up 70%"


def test_agent_check_answers_one_line_from_the_load() -> None:
    port = free_port()
    with serve(make_config(agent_check_port=port)) as running:
        assert read_agent(port) == "ready up 100%"
        running.stop()
    with pytest.raises(OSError):
        read_agent(port)


@needs_haproxy
async def test_a_real_haproxy_takes_the_weight_from_the_agent(tmp_path) -> None:
    agent_port, front_port = free_port(), free_port()
    executor = slow_echo(0.05, max_batch=2)
    with serve(make_config(agent_check_port=agent_port), executor=executor) as running:
        stats_socket = tmp_path / "haproxy.sock"
        config = f"""
global
    stats socket {stats_socket} level admin
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend front
    bind 127.0.0.1:{front_port}
    default_backend vlbridge
backend vlbridge
    server one 127.0.0.1:{running.port} weight 100 agent-check agent-port {agent_port} agent-inter 100ms
"""
        with run_haproxy(config, tmp_path, front_port, stats_socket) as proxy:

            def weight() -> int:
                return int(proxy.servers()["one"]["weight"])

            await asyncio.to_thread(until_blocking, lambda: weight() == 100, "the agent's full weight")
            client = await Client.open(running.ws)
            for n in range(3):  # 3 of 2 + 64 places taken: weight 95
                await client.ask(f"q{n}", "keep the executor busy for a while " * 3)
            await asyncio.to_thread(until_blocking, lambda: weight() < 100, "a lower weight")
            via_proxy = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{front_port}/health")
            assert via_proxy.status_code == 200
            await client.close()


@contextlib.asynccontextmanager
async def behind_haproxy(
    tmp_path: Path, executor: list[ExecutorStats]
) -> AsyncIterator[tuple[HAProxy, AgentCheck]]:
    """A service behind HAProxy on the deployment's configuration, its agent answering from
    `executor[0]` (swap it to change what the agent says)."""
    agent = AgentCheck("127.0.0.1", 0, lambda: agent_line(executor[0], assess(executor[0], True, False)))
    await agent.start()
    try:
        with serve(make_config()) as running:
            front_port, stats_socket = free_port(), tmp_path / "haproxy.sock"
            config = render(DEPLOY_CONFIG.read_text(), front_port, [running.port], stats_socket, [agent.port])
            with run_haproxy(config, tmp_path, front_port, stats_socket) as proxy:
                yield proxy, agent
    finally:
        await agent.stop()


@needs_haproxy
async def test_an_instance_the_agent_drained_while_loading_gets_traffic_once_ready(tmp_path: Path) -> None:
    """HAProxy keeps a server that its agent put in DRAIN (an administrative state) there until
    the agent says "ready": "up 100%" alone after the "drain" of a model load would leave a
    restarted instance without new traffic for good. Run on the deployment's configuration."""
    executor = [stats(ExecutorState.LOADING)]
    async with behind_haproxy(tmp_path, executor) as (proxy, _):

        def state() -> tuple[str, str]:
            row = proxy.servers()["vlbridge1"]
            return row["status"], row["weight"]

        await asyncio.to_thread(
            until_blocking, lambda: state()[0].startswith("DRAIN"), "the agent's drain", poll=0.05
        )
        executor[0] = stats()  # the model has loaded
        await asyncio.to_thread(
            until_blocking, lambda: state() == ("UP", "100"), "the server back in service", poll=0.05
        )


@needs_haproxy
async def test_an_operators_drain_outlasts_the_agents_replies(tmp_path: Path) -> None:
    """`set server ... state drain` on HAProxy's runtime API takes an instance out by hand; the
    agent's serving replies ("up 100%") leave it drained, and "set ... state ready" ends it.
    Run on the deployment's configuration."""
    async with behind_haproxy(tmp_path, [stats()]) as (proxy, agent):

        def status() -> str:
            return proxy.servers()["vlbridge1"]["status"]

        def after_replies(count: int) -> None:
            seen = agent.answered
            until_blocking(lambda: agent.answered >= seen + count, f"{count} agent replies", poll=0.05)

        await asyncio.to_thread(after_replies, 1)  # its "ready" (a first reply) came
        await asyncio.to_thread(until_blocking, lambda: status() == "UP", "the server up", poll=0.05)
        proxy.command("set server vlbridge/vlbridge1 state drain")
        # three: HAProxy asks again only once it has acted on the reply before, so the second,
        # sent after the command, has been applied
        await asyncio.to_thread(after_replies, 3)
        assert status().startswith("DRAIN")
        proxy.command("set server vlbridge/vlbridge1 state ready")
        await asyncio.to_thread(until_blocking, lambda: status() == "UP", "the drain ended", poll=0.05)


def test_loop_metrics_expose_cumulative_buckets_and_counts() -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.parser import text_string_to_metric_families

    from server import metrics

    registry = CollectorRegistry()
    histogram = metrics.LoopHistogram("test_seconds", "test", ["route"], (0.1, 1.0), registry)
    counter = metrics.LoopCounter("test_total", "test", ["route", "code"], registry)
    for value in (0.1, 0.5, 1.0, 7.0):  # on a bound counts in that bound's bucket
        histogram.observe(value, "ws")
    counter.inc("ws", "ok")
    counter.inc("ws", "ok")
    samples = {
        (s.name, s.labels.get("le", ""), s.labels.get("code", "")): s.value
        for family in text_string_to_metric_families(metrics.generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("test_seconds_bucket", "0.1", "")] == 1
    assert samples[("test_seconds_bucket", "1.0", "")] == 3
    assert samples[("test_seconds_bucket", "+Inf", "")] == 4
    assert samples[("test_seconds_count", "", "")] == 4
    assert samples[("test_seconds_sum", "", "")] == 8.6
    assert samples[("test_total", "", "ok")] == 2
