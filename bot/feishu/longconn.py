"""Receiving events over Feishu's long connection, supervised by a watchdog.

`LongConnection` runs the SDK's `ws.Client` in a worker process (`bot.feishu.wsworker`), reads
its JSON-line reports on the event loop and tells `on_event(message_id, new)` of each message
the worker put into the inbox (it acks only after that), and `on_action(...)` of each button
press the worker checked and recorded (`bot.feishu.actions`; it answered the press with a toast).
The watchdog (`bot.feishu.monitor.Watchdog`, checked every `watchdog_interval`) replaces the
worker with a fresh one when it died, hung, stayed without a connection, or its pings went
unanswered; consecutive failed restarts back off (first one immediate). Replacing a worker
is always possible: close its stdin, then kill it.

The event loop never blocks on the SDK and the SDK never waits for the event loop: the worker
acks as soon as the message is committed to the inbox file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bot.feishu import metrics
from bot.feishu.actions import ActionPolicy
from bot.feishu.monitor import LinkState, Watchdog, WatchdogLimits, WorkerReport, restart_delay
from bot.inbox_factory import StoreSpec

log = logging.getLogger("vlbridge.feishu.ws")

_ROOT = str(Path(__file__).resolve().parents[2])  # so the worker imports this very bot package

EventCallback = Callable[[str, bool], None]  # (message_id, new): the message is in the inbox
# (action, verdict, answer to stop, answer added): a button press the worker checked and recorded
ActionCallback = Callable[[str, str, str, str], None]

_LOG_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
}


def limits_for(interval: float) -> WatchdogLimits:
    """The watchdog's bounds from `feishu.watchdog_interval` (documented in README)."""
    return WatchdogLimits(
        startup=max(20.0, 3 * interval), silence=3 * interval, disconnected=3 * interval, pong=3 * interval
    )


class LongConnection:
    """Owns the worker process and the watchdog; `start()` returns at once, `stop()` is bounded."""

    def __init__(
        self,
        *,
        app_id: str,
        app_secret: str,
        domain: str,
        inbox: StoreSpec,
        on_event: EventCallback,
        watchdog_interval: float = 10.0,
        limits: WatchdogLimits | None = None,
        actions: ActionPolicy | None = None,
        on_action: ActionCallback | None = None,
    ) -> None:
        self._settings = {
            "app_id": app_id,
            "app_secret": app_secret,
            "domain": domain.rstrip("/"),
            "inbox": inbox.as_dict(),
            "actions": (actions or ActionPolicy()).as_dict(),
        }
        self.on_event = on_event
        self.on_action = on_action
        self.interval = watchdog_interval
        self.limits = limits or limits_for(watchdog_interval)
        self.state = LinkState.STOPPED
        self.restarts = 0
        self.last_restart_reason = ""
        self.last_error = ""  # the worker's last error line since it was last connected
        self.events = 0
        self.last_event_at = 0.0
        self._failures = 0  # consecutive workers that never connected
        self._proc: asyncio.subprocess.Process | None = None
        self._watchdog: Watchdog | None = None
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def connected(self) -> bool:
        return self.state is LinkState.CONNECTED

    @property
    def worker_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        self._stopping = False
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="feishu-ws-watchdog")

    async def stop(self, grace: float = 3.0) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._retire(grace)
        self._set_state(LinkState.STOPPED)

    # -- the worker -------------------------------------------------------------------------------

    async def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.feishu.wsworker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=64 * 1024 * 1024,
        )
        assert proc.stdin is not None
        settings = {**self._settings, "heartbeat": max(0.05, self.interval / 2)}
        proc.stdin.write(orjson.dumps(settings) + b"\n")  # the secret goes over the pipe, not argv/env
        await proc.stdin.drain()
        self._proc = proc
        self._watchdog = Watchdog(self.limits, time.time())
        self._set_state(LinkState.STARTING)
        self._reader = asyncio.create_task(
            self._read(proc, self._watchdog), name=f"feishu-ws-reader-{proc.pid}"
        )
        log.info("long-connection worker %d started", proc.pid)

    async def _retire(self, grace: float) -> None:
        """Stop the current worker: EOF on its stdin, then a kill if it lingers."""
        proc, reader = self._proc, self._reader
        self._proc, self._reader, self._watchdog = None, None, None
        if proc is None:
            return
        if proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, grace)
        log.info("long-connection worker %d ended (exit %s)", proc.pid, proc.returncode)

    async def _read(self, proc: asyncio.subprocess.Process, watchdog: Watchdog) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                record = orjson.loads(line)
                kind = record.get("t")
                if kind == "event":
                    self.events += 1
                    self.last_event_at = time.time()
                    metrics.EVENTS.labels("received").inc()
                    self.on_event(str(record["message_id"]), bool(record["new"]))
                elif kind == "action":
                    if self.on_action is not None:
                        self.on_action(
                            str(record["action"]),
                            str(record["verdict"]),
                            str(record.get("stop") or ""),
                            str(record.get("new_answer") or ""),
                        )
                elif kind == "malformed":
                    metrics.EVENTS.labels("malformed").inc()
                    log.warning("event %s ignored: %s", record.get("event_id"), record.get("why"))
                elif kind == "state":
                    report = WorkerReport(
                        at=float(record["at"]),
                        connected=bool(record["connected"]),
                        unanswered_since=float(record.get("unanswered_since") or 0.0),
                        starting=bool(record.get("starting")),
                    )
                    watchdog.observe(report)
                    if watchdog is self._watchdog:
                        if report.connected:
                            self._failures = 0
                        self._set_state(watchdog.state)
                elif kind == "log":
                    level = _LOG_LEVELS.get(str(record.get("level")), logging.INFO)
                    if level >= logging.ERROR and watchdog is self._watchdog:
                        self.last_error = str(record.get("msg"))[:500]  # /health's reason
                    log.log(level, "sdk[%d]: %s", proc.pid, record.get("msg"))
            except Exception:
                log.exception("bad line from long-connection worker %d", proc.pid)

    # -- the watchdog -----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.interval)
            proc, watchdog = self._proc, self._watchdog
            if proc is None or watchdog is None:
                continue
            if proc.returncode is not None:
                reason = f"worker exited with {proc.returncode}"
            else:
                reason = watchdog.verdict(time.time()) or ""
            if not reason:
                continue
            self._failures += 1
            self.restarts += 1
            self.last_restart_reason = reason
            metrics.WS_RESTARTS.inc()
            log.warning("long connection: %s; starting a fresh worker (restart %d)", reason, self.restarts)
            self._set_state(LinkState.RECONNECTING)
            await self._retire(grace=1.0)
            delay = restart_delay(self._failures, self.interval)
            if delay:
                await asyncio.sleep(delay)
            if not self._stopping:
                await self._spawn()

    def _set_state(self, state: LinkState) -> None:
        if state is not self.state:
            log.info("long connection: %s -> %s", self.state.value, state.value)
            self.state = state
        if state is LinkState.CONNECTED:
            self.last_error = ""
        metrics.CONNECTED.set(1 if state is LinkState.CONNECTED else 0)

    @property
    def reason(self) -> str:
        """Why there is no connection: the worker's last error, else the watchdog's last
        restart reason; empty while connected."""
        if self.state is LinkState.CONNECTED:
            return ""
        if self.state is LinkState.STOPPED:
            return "stopped"
        return self.last_error or self.last_restart_reason or "connecting"

    def health(self) -> dict[str, Any]:
        return {
            "mode": "longconn",
            "state": self.state.value,
            "reason": self.reason,
            "connected": self.connected,
            "worker_pid": self.worker_pid,
            "restarts": self.restarts,
            "last_restart_reason": self.last_restart_reason,
            "events": self.events,
            "last_event_age": round(time.time() - self.last_event_at, 1) if self.last_event_at else None,
        }
