"""The ping manager: ONE task keeps every WebSocket connection alive or declares it dead.

Idle sessions must cost little (10,000+ per process), so there is no task or timer per
connection. Each watched connection has a deadline (its next ping, or the moment it
would be dead) in a heap; a single sweeper wakes every `tick` seconds, pops what is due,
asks the connection's sans-I/O `Keepalive` what to do, acts, and pushes it back with its
new deadline. Frames received in between only move `last_received` forward, so the heap
is touched at most twice per ping interval per connection.

A heap entry holds the connection object itself, never a session's "current
connection": a connection that was replaced or closed is skipped when its entry comes up.
The same sweep also expires parked sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import Protocol

from protocol.v1 import CloseCode
from server import metrics
from server.ws.sessions import SessionRegistry
from server.ws.state import Beat, Keepalive

log = logging.getLogger("vlbridge.ws.keepalive")


class Watched(Protocol):
    """What the manager needs from a connection."""

    keepalive: Keepalive
    label: str

    @property
    def open(self) -> bool: ...

    def ping(self, now: float) -> bool:
        """Send a ping frame; True when the previous ping went unanswered."""

    def close(self, code: int, reason: str) -> None: ...


class PingManager:
    def __init__(
        self,
        registry: SessionRegistry,
        interval: float,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self.tick = max(0.005, min(0.5, interval / 10, timeout / 5))
        self._heap: list[tuple[float, int, Watched]] = []
        self._order = itertools.count()
        self._task: asyncio.Task[None] | None = None

    def keepalive(self, now: float) -> Keepalive:
        return Keepalive(self.interval, self.timeout, now)

    def watch(self, connection: Watched) -> None:
        heapq.heappush(self._heap, (connection.keepalive.deadline(), next(self._order), connection))

    def sweep(self, now: float) -> None:
        """Act on every connection that is due at *now* (sans-I/O apart from the calls it makes)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, connection = heapq.heappop(heap)
            if not connection.open:
                continue
            beat = connection.keepalive.poll(now)
            if beat is Beat.DEAD:
                silent = now - connection.keepalive.last_received
                log.info("%s: silent for %.1f s; closing it as dead", connection.label, silent)
                metrics.PINGS_MISSED.inc()
                connection.close(CloseCode.PING_TIMEOUT, f"no frame for {silent:.0f} s (ping timeout)")
                continue
            if beat is Beat.PING:
                metrics.PINGS_SENT.inc()
                if connection.ping(now):
                    metrics.PINGS_MISSED.inc()
            self.watch(connection)
        self.registry.expire(now)

    @property
    def watched(self) -> int:
        return len(self._heap)

    async def _run(self) -> None:
        while True:
            try:
                self.sweep(self.clock())
            except Exception:  # a bug in one connection's handling must not stop keepalive for all
                log.exception("keepalive sweep failed")
            await asyncio.sleep(self.tick)

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("expected a stopped ping manager, got a running one")
        self._task = asyncio.create_task(self._run(), name="vlbridge-keepalive")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._heap.clear()
