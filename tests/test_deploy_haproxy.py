"""docker/haproxy.cfg in front of two `vlbridge serve` processes with their agent checks on:
a real HAProxy, real instances of the echo engine (answers as long as the question).

Where a request went is counted by the instances themselves (their /metrics); the weights
HAProxy took from the agents are read from its runtime API.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import orjson

from tests.feishu_service import Service
from tests.haproxy import DEPLOY_CONFIG, HAProxy, free_port, needs_haproxy, render, run_haproxy, wait_up
from tests.openai_upstreams import answers_counted, echo_config, spawned_together
from tests.waiting import DEADLINE, until, until_blocking

pytestmark = needs_haproxy

NAMES = ("vlbridge1", "vlbridge2")
ROUNDS = 20  # new requests in each measurement
# One answer at a time and three waiting: an instance with four long answers is full (its
# agent says "up 0%"), a fifth question there would be refused as busy.
SMALL = "max_batch = 1\nqueue_size = 3"
LONG = "x" * 999_000  # an answer of a minute or more: ended by going away, never waited for


@contextmanager
def balanced(directory: Path, executor: str) -> Iterator[tuple[dict[str, Service], HAProxy]]:
    """Two echo instances (*executor*: their executor's settings), each with its agent, behind
    docker/haproxy.cfg, both up."""
    with ExitStack() as stack:
        agents = [free_port() for _ in NAMES]
        configs = [
            echo_config(directory / name, f"agent_check_port = {agent}\n", executor, grace=DEADLINE)
            for name, agent in zip(NAMES, agents, strict=True)
        ]
        instances = dict(zip(NAMES, stack.enter_context(spawned_together(configs)), strict=True))
        port, socket_path = free_port(), directory / "haproxy.sock"
        ports = [instance.port for instance in instances.values()]
        config = render(DEPLOY_CONFIG.read_text(), port, ports, socket_path, agents)
        proxy = stack.enter_context(run_haproxy(config, directory, port, socket_path))
        wait_up(proxy, NAMES)
        yield instances, proxy


def new_clients() -> httpx.AsyncClient:
    """An HTTP client whose every request comes on a new connection, as from a new client.
    (A kept-alive connection left idle past HAProxy's keep-alive timeout can be closed by
    HAProxy just as the client sends on it: a race of HTTP/1.1 itself, not of the drain.)"""
    return httpx.AsyncClient(timeout=DEADLINE, limits=httpx.Limits(max_keepalive_connections=0))


def ask_body(text: str) -> dict[str, object]:
    return {"model": "echo", "max_tokens": 64, "messages": [{"role": "user", "content": text}]}


async def served(instances: dict[str, Service]) -> Counter[str]:
    """Chat completions each instance has answered so far."""
    counts: Counter[str] = Counter()
    for name, instance in instances.items():
        counts[name] = answers_counted(await asyncio.to_thread(instance.metrics), "ok")
    return counts


async def ask_rounds(http: httpx.AsyncClient, proxy: HAProxy, rounds: int) -> None:
    """*rounds* new questions through HAProxy, one after the other; each must be answered."""
    for n in range(rounds):
        answer = await http.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions", json=ask_body(f"q{n}"))
        assert answer.status_code == 200, answer.text


async def test_new_requests_avoid_an_instance_busy_with_long_answers_and_balance_when_idle(
    tmp_path: Path,
) -> None:
    with balanced(tmp_path, SMALL) as (instances, proxy):
        busy, other = NAMES
        async with AsyncExitStack() as stack:
            http = await stack.enter_async_context(new_clients())
            for name in NAMES:
                await until_weight(proxy, name, lambda w: w == 100, "at full weight")

            # Both idle: new requests are shared.
            before = await served(instances)
            await ask_rounds(http, proxy, ROUNDS)
            idle = await served(instances) - before
            assert min(idle[name] for name in NAMES) >= ROUNDS * 0.3, idle

            # One instance busy with long answers that HAProxy does not see (asked of it
            # directly: Feishu messages, another balancer's traffic).
            async with AsyncExitStack() as long_answers:
                url = f"http://127.0.0.1:{instances[busy].port}/v1/analyze"
                for _ in range(4):
                    response = await long_answers.enter_async_context(
                        http.stream("POST", url, files={"prompt": (None, LONG)})
                    )
                    assert response.status_code == 200
                await until_weight(proxy, busy, lambda w: w == 0, "at a full instance's weight")
                before = await served(instances)
                await ask_rounds(http, proxy, ROUNDS)
                saturated = await served(instances) - before
            assert saturated[other] >= ROUNDS * 0.8, saturated


async def until_weight(proxy: HAProxy, name: str, wanted: Callable[[int], bool], what: str) -> None:
    """Until the weight HAProxy gives *name* (from its agent) is *wanted*."""
    await asyncio.to_thread(
        until_blocking, lambda: wanted(int(proxy.servers()[name]["weight"])), f"{name} {what}", poll=0.05
    )


async def test_an_instance_stopped_with_sigterm_is_drained_without_a_failed_request(tmp_path: Path) -> None:
    with balanced(tmp_path, "max_batch = 8") as (instances, proxy):  # room beside the long answer
        failures: list[str] = []
        answered = 0
        stop = asyncio.Event()

        async def traffic(http: httpx.AsyncClient) -> None:
            nonlocal answered
            while not stop.is_set():
                try:
                    answer = await http.post(
                        f"http://127.0.0.1:{proxy.port}/v1/chat/completions", json=ask_body("keep asking")
                    )
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code} {answer.text}")
                answered += 1

        async with new_clients() as http:
            # An answer in progress on the victim, asked directly so that HAProxy sees two
            # idle instances and keeps sending it half of the new requests until it learns of
            # the drain: the instance stops listening at once (a refused connection is retried
            # on the other), its agent says "drain" and its health check fails. The answer
            # must still finish, whole.
            victim = NAMES[0]
            question = "finish me. " * 4000
            url = f"http://127.0.0.1:{instances[victim].port}/v1/analyze"
            async with http.stream("POST", url, files={"prompt": (None, question)}) as running:
                lines = running.aiter_lines()
                async for line in lines:
                    if line == "event: delta":
                        break
                loops = [asyncio.create_task(traffic(http)) for _ in range(3)]
                await until(lambda: answered >= 2, "requests through HAProxy")
                instances[victim].process.send_signal(signal.SIGTERM)
                await until(lambda: instances[victim].logged("draining: "), "the victim's drain")
                rest = [line async for line in lines]
            done = rest.index("event: done")
            assert orjson.loads(rest[done + 1].removeprefix("data: "))["text"] == "echo: " + question
            exit_code = await asyncio.to_thread(instances[victim].process.wait, DEADLINE)
            at_exit = answered
            await until(lambda: answered >= at_exit + 4, "requests after the victim exited")
            stop.set()
            await asyncio.gather(*loops)

            # With no instance left, HAProxy's own refusal has the service's error shape.
            await asyncio.to_thread(instances[NAMES[1]].kill_group)
            nobody = await http.post(
                f"http://127.0.0.1:{proxy.port}/v1/chat/completions", json=ask_body("anyone?")
            )
            assert nobody.status_code == 503 and nobody.json()["error"]["code"] == "unavailable", nobody.text
        assert exit_code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert failures == []
        await until(lambda: instances[victim].logged("drained in"), "the victim's log to say it drained")
        assert not instances[victim].logged("draining: 0 running answers")  # it had one to finish


@contextmanager
def answering(status: int) -> Iterator[int]:
    """A stand-in instance on a free port: /health 200, every POST answered *status*."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b'{"error":{"code":"unavailable","message":"shutting down","type":"unavailable"}}'
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with suppress(OSError):  # HAProxy may have moved on
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_a_request_an_instance_refuses_as_unavailable_is_resent_to_another(tmp_path: Path) -> None:
    """The drain's one race: a connection accepted just before the listener closed gets the
    service's 503 "shutting down". HAProxy resends it elsewhere (retry-on 503), which needs the
    request kept whole in its buffer (option http-buffer-request): without that option about
    half of these requests came back 503."""
    with ExitStack() as stack:
        ports = [stack.enter_context(answering(status)) for status in (503, 200)]
        port, socket_path = free_port(), tmp_path / "haproxy.sock"
        config = render(DEPLOY_CONFIG.read_text(), port, ports, socket_path)
        proxy = stack.enter_context(run_haproxy(config, tmp_path, port, socket_path))
        wait_up(proxy, NAMES)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        codes = [httpx.post(url, json=ask_body(f"q{n}"), timeout=DEADLINE).status_code for n in range(10)]
        assert codes == [200] * 10
