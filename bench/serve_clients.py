"""The simulated clients of bench/serve.py: in the benchmark's own event loop, or spread over
worker processes so that the load generator's CPU (serialising 1.5 MB picture frames, masking
and writing them, parsing every delta) is not queued in one loop and measured as the server's.

A `Group` is the clients that share one event loop. `run_clients` runs a list of groups, either
all in the caller's loop or each in a spawned process of its own, and coordinates them the same
way: every group connects its clients (and makes its pictures, in a worker) and says it is
ready; the parent then stamps one start time and hands it to every group, so all go at once and
phases are decided by one clock; it sets the stop when asked to; each group sends back its
answers. Time stamps are `time.monotonic()`: CLOCK_MONOTONIC is system-wide on Linux, so stamps
taken in different processes compare directly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

import orjson

from bench.executor import distinct_jpegs, noise_jpeg

QUESTION = "Describe this picture in detail."
FOLLOW_UP = "What else can you tell me about it?"
TIMEOUT = 600.0  # seconds: an answer, the clients' start, a worker's end
ARRIVAL_TOKENS = 16  # an arriving picture's answer: its prefill is what the streamers feel


# ---- pictures ---------------------------------------------------------------------------------------


class Pictures:
    """Distinct noise JPEGs (base64) made up front; `take()` never repeats one.

    Seeds run from *first_seed*; `block()` hands a worker process a range of seeds that no other
    picture of the run uses (the parent's own, from 1000, stay far below `FIRST_BLOCK`)."""

    FIRST_BLOCK = 10_000_000
    BLOCK = 100_000  # seeds per worker process: far more pictures than one ever takes

    def __init__(self, size: int, count: int, first_seed: int = 1000, *, parallel: bool = True) -> None:
        seeds = range(first_seed, first_seed + count)
        # parallel: on all cores (forks; before torch is imported). A worker process makes its
        # own on its own core: the workers together already use the cores.
        made = distinct_jpegs(size, count, first_seed) if parallel else [noise_jpeg(size, s) for s in seeds]
        self._items = [base64.b64encode(data).decode() for data in made]
        self._next = 0
        self._blocks = 0
        self.size = size
        self.first_seed = first_seed

    def take(self) -> str:
        if self._next >= len(self._items):  # more than planned: make one more (slower, still distinct)
            data = noise_jpeg(self.size, self.first_seed + len(self._items))
            self._items.append(base64.b64encode(data).decode())
        item = self._items[self._next]
        self._next += 1
        return item

    def block(self) -> int:
        """The first seed of a range of `BLOCK` seeds for one worker process's pictures."""
        self._blocks += 1
        return self.FIRST_BLOCK + self._blocks * self.BLOCK


# ---- one answer, as a client sees it ----------------------------------------------------------------


@dataclass
class Answer:
    sent: float
    uploaded: float | None = None  # the ask's frame handed to the kernel (WebSocket: `send` returned)
    accepted: float | None = None  # the server's first frame about the ask (WebSocket: `queued`)
    started: float | None = None  # the server's `started` frame (WebSocket): admitted, prefill done
    first: float | None = None
    done: float | None = None
    deltas: list[float] = field(default_factory=list)  # arrival times
    tokens: int = 0
    server_queued: float | None = None  # the server's own time to joining the batch (prepared, queued)
    server_first: float | None = None  # the server's own time to first token (`done`'s timings)
    server_total: float | None = None  # and to the end of the answer, both from its submission
    error: str | None = None
    warmup: bool = False  # a closed-loop client's first ask: the first wave, not measured

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.deltas, self.deltas[1:], strict=False)]


class WsClient:
    """A minimal protocol v1 client: one connection, one ask at a time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Any = None
        self._asks = 0

    async def __aenter__(self) -> WsClient:
        from websockets.asyncio.client import connect

        self.conn = await connect(self.url, max_size=None, ping_interval=None, open_timeout=30)
        hello = json.loads(await self.conn.recv())
        assert hello["type"] == "hello", hello
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def reset(self) -> None:
        await self.conn.send('{"type":"reset"}')

    async def ask(self, text: str, picture: str | None, max_tokens: int) -> Answer:
        self._asks += 1
        ask_id = f"a{self._asks}"
        frame: dict[str, Any] = {"type": "ask", "id": ask_id, "text": text, "max_tokens": max_tokens}
        if picture is not None:
            frame["images"] = [picture]
        answer = Answer(time.monotonic())
        # orjson: its 1.3 MB frame serialised in ~0.5 ms (stdlib json: ~2 ms on the event loop
        # that the clients of a group share).
        await self.conn.send(orjson.dumps(frame).decode())
        answer.uploaded = time.monotonic()  # websockets' send returns once its buffer has drained
        while True:
            raw = await asyncio.wait_for(self.conn.recv(), TIMEOUT)
            now = time.monotonic()
            event = orjson.loads(raw)
            kind = event["type"]
            if kind == "ping":
                await self.conn.send(json.dumps({"type": "pong", "ts": event["ts"]}))
            if event.get("id") != ask_id:
                continue
            answer.accepted = answer.accepted or now
            if kind == "started":
                answer.started = now
            elif kind == "delta":
                answer.first = answer.first or now
                answer.deltas.append(now)
            elif kind == "done":
                answer.done = now
                answer.tokens = int(event["usage"]["completion_tokens"])
                timings = event.get("timings") or {}
                answer.server_first, answer.server_total = timings.get("first_token"), timings.get("total")
                answer.server_queued = timings.get("queued")
                return answer
            elif kind == "error":
                answer.error = f"{event.get('code')}: {event.get('message')}"
                return answer


async def openai_ask(http: Any, base: str, picture: str, max_tokens: int) -> Answer:
    body = {
        "model": "bench",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{picture}"}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
    }
    answer = Answer(time.monotonic())
    async with http.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=TIMEOUT) as response:
        if response.status_code != 200:
            answer.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return answer
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.monotonic()
            if line == "data: [DONE]":
                answer.done = now
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                answer.error = str(chunk["error"])
            if chunk.get("usage"):
                answer.tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    answer.first = answer.first or now
                    answer.deltas.append(now)
    return answer


# ---- groups of clients ------------------------------------------------------------------------------


class Role(StrEnum):
    WS = "ws"  # closed loop over WebSocket: reset, ask with a new picture, again
    OPENAI = "openai"  # closed loop over streaming POST /v1/chat/completions
    STREAMER = "streamer"  # a picture, then text follow-ups (long answers) until the stop
    ARRIVAL = "arrival"  # its share of every burst: a new connection asking about a new picture


@dataclass(frozen=True)
class Group:
    """Clients that share one event loop; plain values, so a worker process can be given one."""

    role: Role
    clients: int  # for ARRIVAL: its share of each burst
    tokens: int
    ws: str
    http: str
    asks: int = 0  # closed loop: per client, the first one the warm-up
    every: float = 0.0  # ARRIVAL: a burst every *every* seconds for *seconds*, after *seconds*
    seconds: float = 0.0

    def pictures(self) -> int:
        """How many pictures the group sends."""
        if self.role in (Role.WS, Role.OPENAI):
            return self.clients * self.asks
        if self.role is Role.STREAMER:
            return self.clients
        return self.clients * len(burst_offsets(self.every, self.seconds))


def burst_offsets(every: float, seconds: float) -> list[float]:
    """When the bursts go, from the start of the busy phase: every *every* s for *seconds*."""
    if every <= 0:
        raise ValueError(f"bursts need a period above 0 s, got {every}")
    offsets: list[float] = []
    while len(offsets) * every < seconds:
        offsets.append(len(offsets) * every)
    return offsets


def split(total: int, parts: int) -> list[int]:
    """*total* clients over *parts* groups, as evenly as can be (none empty: none for 0)."""
    parts = min(parts, total)
    return [total // parts + (index < total % parts) for index in range(parts)]


# ---- the parent's start and stop --------------------------------------------------------------------


class Channel(Protocol):  # queue.Queue, or a multiprocessing queue between processes
    def put(self, item: Any) -> None: ...
    def get(self, block: bool = True, timeout: float | None = None) -> Any: ...


class Flag(Protocol):  # threading.Event, or a multiprocessing one
    def set(self) -> None: ...
    def is_set(self) -> bool: ...


class Report(StrEnum):  # from a group to the parent: (Report, group index, payload)
    READY = "ready"
    DONE = "done"  # payload: the group's answers
    ERROR = "error"  # payload: what went wrong


@dataclass
class Gate:
    """What the parent and its groups share: reports up, the start time down (None: called
    off), and the stop."""

    up: Channel
    down: Channel
    stop: Flag

    async def ready(self, index: int) -> float:
        """Tells the parent that group *index* is ready; returns the start time it decides."""
        self.up.put((Report.READY, index, None))
        start = await asyncio.to_thread(self.down.get, True, TIMEOUT)
        if start is None:
            raise RuntimeError("the run was called off before the start")
        return float(start)


class Starter:
    """A group's clients each wait here once connected; the last one tells the parent, and all
    go at the parent's start."""

    def __init__(self, index: int, clients: int, gate: Gate) -> None:
        self.index, self._waiting, self.gate = index, clients, gate
        self._go = asyncio.Event()

    async def wait(self) -> None:
        self._waiting -= 1
        if self._waiting == 0:
            await self.gate.ready(self.index)
            self._go.set()
        await self._go.wait()


async def ws_client(group: Group, pictures: Pictures, starter: Starter, answers: list[Answer]) -> None:
    async with WsClient(group.ws) as client:
        await starter.wait()
        for number in range(group.asks):
            await client.reset()  # each ask on a fresh context
            answer = await client.ask(QUESTION, pictures.take(), group.tokens)
            answer.warmup = number == 0
            answers.append(answer)


async def openai_client(
    group: Group, pictures: Pictures, starter: Starter, answers: list[Answer], http: Any
) -> None:
    await starter.wait()
    for number in range(group.asks):
        answer = await openai_ask(http, group.http, pictures.take(), group.tokens)
        answer.warmup = number == 0
        answers.append(answer)


async def streamer(group: Group, pictures: Pictures, starter: Starter, answers: list[Answer]) -> None:
    async with WsClient(group.ws) as client:
        await client.ask(QUESTION, pictures.take(), 8)  # a picture in context: follow-ups are long prompts
        await starter.wait()
        while not starter.gate.stop.is_set():
            answers.append(await client.ask(FOLLOW_UP, None, group.tokens))


async def arrivals(group: Group, pictures: Pictures, start: float) -> list[Answer]:
    """The group's share of every burst, the first one *group.seconds* after *start*."""

    async def arrival() -> Answer:
        async with WsClient(group.ws) as client:
            return await client.ask(QUESTION, pictures.take(), group.tokens)

    tasks: list[asyncio.Task[Answer]] = []
    for offset in burst_offsets(group.every, group.seconds):
        await asyncio.sleep(max(0.0, start + group.seconds + offset - time.monotonic()))
        tasks.extend(asyncio.create_task(arrival()) for _ in range(group.clients))
    return list(await asyncio.gather(*tasks))


async def run_group(index: int, group: Group, pictures: Pictures, gate: Gate) -> list[Answer]:
    """Group *index*'s clients, started at the parent's start: every closed-loop answer (the
    warm-ups marked), every streamer's follow-up until the stop, or every arrival's answer."""
    if group.role is Role.ARRIVAL:
        return await arrivals(group, pictures, await gate.ready(index))
    answers: list[Answer] = []
    starter = Starter(index, group.clients, gate)
    if group.role is Role.OPENAI:
        import httpx

        room = group.clients + 4
        limits = httpx.Limits(max_connections=room, max_keepalive_connections=room)
        async with httpx.AsyncClient(limits=limits) as http:
            clients = [openai_client(group, pictures, starter, answers, http) for _ in range(group.clients)]
            await asyncio.gather(*clients)
    else:
        client = ws_client if group.role is Role.WS else streamer
        await asyncio.gather(*[client(group, pictures, starter, answers) for _ in range(group.clients)])
    return answers


async def report(index: int, group: Group, pictures: Pictures, gate: Gate) -> None:
    """Runs group *index*; its answers or its error go up to the parent (never raises)."""
    try:
        gate.up.put((Report.DONE, index, await run_group(index, group, pictures, gate)))
    except Exception as exc:
        gate.up.put((Report.ERROR, index, f"{group.role} clients: {exc!r}"))


def client_process(index: int, group: Group, size: int, first_seed: int, gate: Gate) -> None:
    """A worker process: its own pictures first (before it says it is ready: not measured), then
    its clients in its own event loop."""
    pictures = Pictures(size, group.pictures(), first_seed, parallel=False)
    asyncio.run(report(index, group, pictures, gate))


# ---- the parent -------------------------------------------------------------------------------------


async def receive(gate: Gate, workers: Sequence[BaseProcess], expected: Report) -> tuple[int, Any]:
    """The next report from a group, which must be *expected*; a group's error, a worker's death
    or no report within `TIMEOUT` raise."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            kind, index, payload = await asyncio.to_thread(gate.up.get, True, 1.0)
        except queue.Empty:
            # A worker's reports are in the pipe before it exits: one that failed, or all gone
            # quiet, will send no more.
            codes = [w.exitcode for w in workers]
            if any(code not in (None, 0) for code in codes) or (workers and None not in codes):
                raise RuntimeError(
                    f"client processes ended without a {expected} (exit codes {codes})"
                ) from None
            continue
        if kind is Report.ERROR:
            raise RuntimeError(payload)
        if kind is not expected:
            raise RuntimeError(f"expected {expected} from group {index}, got {kind}")
        return index, payload
    raise TimeoutError(f"no {expected} from the clients within {TIMEOUT:.0f} s")


async def coordinate(
    gate: Gate,
    groups: int,
    workers: Sequence[BaseProcess],
    stop_after: float | None,
    started: Callable[[], Any],
) -> tuple[float, list[list[Answer]]]:
    """Waits for every group to be ready, calls *started* and starts them all at one time stamp,
    sets the stop *stop_after* seconds later, and returns the start and each group's answers."""
    try:
        for _ in range(groups):
            await receive(gate, workers, Report.READY)
        started()
        start = time.monotonic()
        for _ in range(groups):
            gate.down.put(start)
        if stop_after is not None:
            asyncio.get_running_loop().call_at(start + stop_after, gate.stop.set)  # loop time: monotonic
        answers: list[list[Answer]] = [[] for _ in range(groups)]
        for _ in range(groups):
            index, found = await receive(gate, workers, Report.DONE)
            answers[index] = found
        return start, answers
    except BaseException:
        gate.stop.set()
        for _ in range(groups):  # a group still waiting for the start must not wait TIMEOUT
            gate.down.put(None)
        raise


async def run_clients(
    groups: list[Group],
    pictures: Pictures,
    *,
    spawn: bool,
    stop_after: float | None = None,
    started: Callable[[], Any] = lambda: None,
) -> tuple[float, list[list[Answer]]]:
    """Runs *groups* in this event loop (taking *pictures*), or with *spawn* each in a worker
    process of its own (making its own, from a block of seeds of *pictures*); all start at once.

    Returns the start time and each group's answers, in the order of *groups*. *started* is
    called just before the start; *stop_after* seconds after it the streamers stop. A group's
    error is raised here, as RuntimeError; workers still running after it are terminated."""
    if not spawn:
        gate = Gate(queue.Queue(), queue.Queue(), threading.Event())
        running = [asyncio.create_task(report(i, group, pictures, gate)) for i, group in enumerate(groups)]
        try:
            return await coordinate(gate, len(groups), [], stop_after, started)
        finally:
            for task in running:  # done, unless the run failed: then no answer of theirs counts
                task.cancel()
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    gate = Gate(context.Queue(), context.Queue(), context.Event())
    workers = [
        context.Process(
            target=client_process, args=(i, group, pictures.size, pictures.block(), gate), daemon=True
        )
        for i, group in enumerate(groups)
    ]
    for worker in workers:
        worker.start()
    grace = 10.0  # after an error: the others may be mid-run
    try:
        outcome = await coordinate(gate, len(groups), workers, stop_after, started)
        grace = TIMEOUT  # every group reported its answers: they are exiting
        return outcome
    finally:
        gate.stop.set()
        await asyncio.to_thread(end_workers, workers, grace)


def end_workers(workers: Sequence[BaseProcess], grace: float) -> None:
    """Joins *workers*, terminating those still running after *grace* seconds."""
    deadline = time.monotonic() + grace
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
            worker.join(10)
