"""The executor in a process of its own: the thread that feeds the GPU shares no GIL with the web server.

Why: in one process the executor's worker thread, which launches every prefill and decode step,
takes turns at the GIL with the event loop (WebSocket and HTTP frames, JSON, base64 pictures,
the relay of every answer's text). Each torch call gives the GIL up and must win it back, so
under load the worker waits and the GPU idles: on an H200 (2B, c=64) the GPU was busy 76-81% of
the time through the server against 93% with the same executor in process (run 23,
2026-12-02). Serving engines split the same way (vLLM's engine core, SGLang's scheduler).

How: `ModelProcess` is the `Executor` the routes and the IM adapters see. `start` spawns a
process (spawn, never fork: a CUDA context cannot be forked) that builds the configured
`InferenceExecutor` (model, worker thread, preparation threads and picture processes) and runs
it under an event loop of its own. One duplex pipe carries requests and cancellations there
and batches of events and stats snapshots back; on each side a thread reads the pipe (a read
gives the GIL back while it waits) and another writes it, so neither event loop ever waits on
the pipe. Each request keeps the `EventHandle` contract: events in order, one final event,
`cancel` at any time.

Stats: the model process sends a snapshot every `STATS_INTERVAL`; queue depth and active
rows are counted here, from the events themselves, so a caller that reads them right after
submitting sees its own request.

Failures: a model process that ends unexpectedly (killed, out of memory, a crash in a
kernel) fails every open request with "unavailable" and sets the state to FAILED with the
reason, like a model that cannot load: `vlbridge serve` then exits non-zero so that its
restart policy starts it again, and accepted Feishu questions wait in the inbox meanwhile.
Ctrl-C reaches the whole process group: the model process ignores it and stops when told (or
when the pipe closes because this process went away).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from server.config import Config
from server.errors import SHUTDOWN_RETRY_AFTER, SHUTTING_DOWN, Unavailable
from server.inference.api import (
    FINAL,
    Events,
    ExecutorState,
    ExecutorStats,
    Failed,
    InferenceRequest,
    RequestHandle,
    Started,
)
from server.inference.executor import InferenceExecutor
from server.inference.handle import EventHandle
from server.inference.picture_processes import plain_main
from server.logs import configure_logging, current_settings

log = logging.getLogger("vlbridge.executor")

STATS_INTERVAL = 0.25  # seconds between two stats snapshots from the model process
STOP_MARGIN = 30.0  # seconds a stop waits for the model process beyond its grace, then kills it
FLUSH_WAIT = 5.0  # seconds the model process waits for its last events after its executor stopped

Build = Callable[[Config], InferenceExecutor]  # a module-level function: it is pickled by name
Message = tuple[Any, ...]


class _Writer:
    """Sends messages on a pipe from a thread of its own: `put` never blocks the caller."""

    def __init__(self, conn: Connection, name: str) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, message: Message) -> None:
        self._queue.put(message)

    def close(self, wait: float) -> None:
        """Send what is queued (for up to *wait* seconds), then stop."""
        self._queue.put(None)
        self._thread.join(wait)

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the other side went away: its reader says so
                return


def _read(conn: Connection, loop: asyncio.AbstractEventLoop, deliver: Callable[[Message], None]) -> None:
    """Pass each message read from *conn* to *deliver* on *loop*; ("lost",) when the pipe closes."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = ("lost",)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(deliver, message)
        if message == ("lost",):
            return


class ModelProcess:
    """An `Executor` whose `InferenceExecutor` runs in a child process built by *build*."""

    def __init__(self, config: Config, build: Build, *, model_name: str) -> None:
        self._config = config
        self._build = build
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._writer: _Writer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keys = itertools.count()
        self._handles: dict[int, EventHandle] = {}
        self._started: set[int] = set()  # keys of open requests that joined the batch
        self._stopped = asyncio.Event()  # the pipe closed (set on the event loop)
        self._settled = asyncio.Event()  # the load ended, well or not, or the model process did
        self._stopping = False
        self._failure: str | None = None  # why the model process ended unexpectedly
        self._stats = ExecutorStats(
            state=ExecutorState.STOPPED,
            load_progress=0.0,
            model=model_name,
            device="",
            queue_depth=0,
            queue_capacity=config.executor.queue_size,
            active=0,
            max_batch=config.executor.max_batch,
            tokens_per_second=0.0,
            requests_total=0,
            tokens_total=0,
        )

    # ---- Executor ------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("the model process was started already")
        self._loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        here, there = context.Pipe()
        process = context.Process(
            target=serve_in_child,
            args=(self._build, self._config, there, current_settings()),
            name="vlbridge-model",
        )
        with plain_main():
            process.start()
        there.close()
        self._process, self._conn = process, here
        self._stats = _replace(self._stats, state=ExecutorState.LOADING)
        self._writer = _Writer(here, "vlbridge-model-send")
        threading.Thread(
            target=_read, args=(here, self._loop, self._on_message), name="vlbridge-model-read", daemon=True
        ).start()
        atexit.register(self._abandon)
        log.info("model process started (pid %d)", process.pid)

    async def wait_ready(self, within: float | None = None) -> None:
        """Wait up to *within* seconds for the model to load; raise Unavailable unless it is ready."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), within)
        stats = self.stats()
        if stats.state is not ExecutorState.READY:
            raise Unavailable(f"the model is {stats.state.value}: {self.load_failure or stats.detail}")

    def submit(self, request: InferenceRequest) -> RequestHandle:
        loop = self._loop or asyncio.get_running_loop()
        key = next(self._keys)
        handle = EventHandle(request.id, loop, lambda: self._send(("cancel", key)))
        if self._writer is None or self._stopping or self._stopped.is_set():
            if self._failure is not None:
                handle.push(Failed("unavailable", self._failure, SHUTDOWN_RETRY_AFTER))
            else:
                handle.push(Failed("unavailable", SHUTTING_DOWN, SHUTDOWN_RETRY_AFTER))
            return handle
        self._handles[key] = handle
        self._writer.put(("submit", key, request))
        return handle

    def stats(self) -> ExecutorStats:
        active = len(self._started)
        return _replace(self._stats, queue_depth=len(self._handles) - active, active=active)

    async def stop(self, grace: float = 0.0) -> None:
        process = self._process
        if process is None or self._stopping:
            return
        self._stopping = True
        self._send(("stop", grace))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), grace + STOP_MARGIN)
        await asyncio.to_thread(process.join, 5.0)
        if process.is_alive():
            log.warning("the model process did not stop in time: killing it")
            process.kill()
            await asyncio.to_thread(process.join, 5.0)
        self._close()
        self._fail_open("unavailable", SHUTTING_DOWN)
        self._stats = _replace(self._stats, state=ExecutorState.STOPPED)

    @property
    def load_failure(self) -> str | None:
        """Why the model cannot serve, once that is known for good (a failed load, or the model
        process ended unexpectedly); else None."""
        if self._failure is not None:
            return self._failure
        return self._stats.detail if self._stats.state is ExecutorState.FAILED else None

    @property
    def lost(self) -> bool:
        """True once the model process ended without being asked to."""
        return self._failure is not None

    @property
    def left_behind(self) -> bool:
        """Always False: a model process that does not stop in time is killed."""
        return False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # ---- the pipe ------------------------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        if self._writer is not None and not self._stopped.is_set():
            self._writer.put(message)

    def _on_message(self, message: Message) -> None:  # on the event loop
        kind = message[0]
        if kind == "events":
            for key, events in message[1]:
                handle = self._handles.get(key)
                if handle is None:
                    continue
                if any(isinstance(event, Started) for event in events):
                    self._started.add(key)
                if isinstance(events[-1], FINAL):
                    del self._handles[key]
                    self._started.discard(key)
                handle.push(*events)
        elif kind == "stats":
            self._stats = message[1]
            if self._stats.state is not ExecutorState.LOADING:
                self._settled.set()
        elif kind == "lost":
            self._lost()

    def _lost(self) -> None:
        """The pipe closed: the model process stopped, as asked or not."""
        self._stopped.set()
        self._settled.set()
        if self._stopping:
            return
        process = self._process
        if process is not None:
            process.join(0.5)  # it has closed its end: it is exiting
        code = process.exitcode if process is not None else None
        self._failure = "the model process ended unexpectedly" + (
            f" (exit code {code})" if code is not None else ""
        )
        log.error("%s; open requests fail and the service should be restarted", self._failure)
        self._fail_open("unavailable", self._failure)
        self._stats = _replace(self._stats, state=ExecutorState.FAILED, detail=self._failure)
        self._close()

    def _fail_open(self, code: str, message: str) -> None:
        handles, self._handles = self._handles, {}
        self._started.clear()
        for handle in handles.values():
            handle.push(Failed(code, message, SHUTDOWN_RETRY_AFTER))

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close(1.0)
            self._writer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        atexit.unregister(self._abandon)

    def _abandon(self) -> None:
        """At interpreter exit without `stop`: close the pipe (the model process stops when it
        sees that) and make sure it is gone before multiprocessing waits for its children."""
        process = self._process
        if self._conn is not None:
            self._conn.close()
        if process is not None and process.is_alive():
            process.join(STOP_MARGIN)
            if process.is_alive():
                process.kill()


def _replace(stats: ExecutorStats, **changes: Any) -> ExecutorStats:
    return dataclasses.replace(stats, **changes)


# ---- the model process ----------------------------------------------------------------------------------


def serve_in_child(build: Build, config: Config, conn: Connection, logging_settings: tuple[str, str]) -> None:
    """The model process's main: the executor *build* makes from *config*, served over *conn*."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the parent decides
    configure_logging(*logging_settings)
    executor = build(config)
    left_behind = asyncio.run(_serve(executor, conn))
    conn.close()
    if left_behind:  # a load that did not stop: its threads would hold the exit for minutes
        logging.shutdown()
        os._exit(0)


async def _serve(executor: InferenceExecutor, conn: Connection) -> bool:
    """Run *executor* for the requests arriving on *conn* until told to stop (or the pipe
    closes); True when a model load was left behind."""
    loop = asyncio.get_running_loop()
    writer = _Writer(conn, "vlbridge-model-send")
    handles: dict[int, RequestHandle] = {}
    ready: list[tuple[int, Events]] = []  # events for the parent, sent once per loop iteration
    stop: asyncio.Future[float] = loop.create_future()

    def flush() -> None:
        batch = ready[:]
        ready.clear()
        writer.put(("events", batch))

    def listener(key: int) -> Callable[[Events], None]:
        def on_events(events: Events) -> None:
            if not ready:
                loop.call_soon(flush)
            ready.append((key, tuple(events)))
            if isinstance(events[-1], FINAL):
                handles.pop(key, None)

        return on_events

    def on_message(message: Message) -> None:
        kind = message[0]
        if kind == "submit":
            _, key, request = message
            handle = executor.submit(request)
            handles[key] = handle
            handle.listen(listener(key))
        elif kind == "cancel":
            cancelled = handles.get(message[1])
            if cancelled is not None:
                cancelled.cancel()
        elif not stop.done():  # "stop", or "lost": the parent went away
            stop.set_result(message[1] if kind == "stop" else 0.0)

    async def report() -> None:
        while True:
            writer.put(("stats", executor.stats()))
            await asyncio.sleep(STATS_INTERVAL)

    await executor.start()
    threading.Thread(
        target=_read, args=(conn, loop, on_message), name="vlbridge-model-read", daemon=True
    ).start()
    reporter = asyncio.create_task(report())
    grace = await stop
    await executor.stop(grace)
    for _ in range(int(FLUSH_WAIT / 0.01)):  # the executor's last events reach the loop after it stopped
        if not handles:
            break
        await asyncio.sleep(0.01)
    reporter.cancel()
    writer.put(("stats", executor.stats()))
    await asyncio.sleep(0)
    writer.close(FLUSH_WAIT)
    return executor.left_behind
