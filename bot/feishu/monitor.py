"""Sans-I/O watchdog logic for the long connection: reports in, a verdict out. No clock, no I/O.

The worker process hosting `lark.ws.Client` sends a `WorkerReport` every heartbeat. The SDK's
own failure modes this catches (see ../shared/FEISHU.md):

- the worker hangs (e.g. discovery's ``requests.post`` has no timeout): reports stop;
- the SDK gave up reconnecting (one non-retryable discovery answer ends its retries): it
  stays disconnected;
- a half-dead socket: the SDK pings but never checks for a pong; we do.

`Watchdog.verdict(now)` returns None while all is well, else the reason to restart. Times are
seconds on one clock shared by reports and `now` (the caller's choice, e.g. ``time.time``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class LinkState(StrEnum):
    STARTING = "starting"  # worker spawned, not connected yet
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # connection lost; the SDK (or we) are getting a new one
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class WorkerReport:
    at: float
    connected: bool
    unanswered_since: float = 0.0  # the oldest ping with no pong after it (0: none pending)
    starting: bool = False  # still importing the SDK: alive, not yet trying to connect


@dataclass(frozen=True, slots=True)
class WatchdogLimits:
    startup: float = 20.0  # spawn -> first report (the worker reports before it imports the SDK)
    loading: float = 180.0  # spawn -> the SDK imported (~4 s of CPU; much longer on a busy machine)
    silence: float = 30.0  # max time between two reports
    disconnected: float = 30.0  # max time without a connection before a fresh worker is tried
    pong: float = 30.0  # max time a ping may stay unanswered


class Watchdog:
    """Judges one worker's health from its reports; make a new one per worker."""

    def __init__(self, limits: WatchdogLimits, spawned_at: float) -> None:
        self.limits = limits
        self.spawned_at = spawned_at
        self.report: WorkerReport | None = None
        self.down_since: float | None = None  # set by the first report without a connection
        self.ever_connected = False

    def observe(self, report: WorkerReport) -> None:
        self.report = report
        if report.starting:
            return  # not trying to connect yet: not "down"
        if report.connected:
            self.down_since = None
            self.ever_connected = True
        elif self.down_since is None:
            self.down_since = report.at

    @property
    def state(self) -> LinkState:
        if self.report is not None and self.report.connected:
            return LinkState.CONNECTED
        return LinkState.RECONNECTING if self.ever_connected else LinkState.STARTING

    def verdict(self, now: float) -> str | None:
        """None, or why this worker must be replaced."""
        limits = self.limits
        report = self.report
        if report is None:
            if now - self.spawned_at > limits.startup:
                return f"worker sent no report within {limits.startup:.1f} s of starting"
            return None
        if now - report.at > limits.silence:
            return f"worker silent for {now - report.at:.1f} s (hung?)"
        if report.starting and now - self.spawned_at > limits.loading:
            return f"worker still loading the SDK {now - self.spawned_at:.1f} s after starting"
        if self.down_since is not None and now - self.down_since > limits.disconnected:
            return f"no connection for {now - self.down_since:.1f} s"
        if report.connected and report.unanswered_since and report.at - report.unanswered_since > limits.pong:
            return f"ping unanswered for {report.at - report.unanswered_since:.1f} s"
        return None


def restart_delay(failures: int, base: float, cap: float = 60.0) -> float:
    """Backoff before the *failures*-th consecutive restart (1-based): the first is immediate."""
    if failures <= 1:
        return 0.0
    return float(min(cap, base * 2 ** (failures - 2)))
