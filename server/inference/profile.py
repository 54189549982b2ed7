"""Where the time goes, summarised in one log line per interval while there is work.

The executor and the engine record durations by name (cheap: a list append on their own
thread); every `interval` seconds, at the next record, `Profile.record` logs the count, p50,
p95 and max of each series and starts over (an interval of 0 turns it off). Reading a
server's log is then enough to split a client's time to first token into preparation,
queueing, prefill and relay, and to see how long decode steps take and how long prefills
stall them.
"""

from __future__ import annotations

import logging
import time


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class Profile:
    """Durations in seconds by series name, logged in milliseconds; one thread records."""

    def __init__(self, logger: logging.Logger, title: str, interval: float = 10.0) -> None:
        self._log = logger
        self._title = title
        self.interval = interval
        self._series: dict[str, list[float]] = {}
        self._counts: dict[str, list[int]] = {}
        self._since = time.monotonic()

    def record(self, name: str, seconds: float) -> None:
        if not self.interval:
            return
        self._series.setdefault(name, []).append(seconds)
        now = time.monotonic()
        if now - self._since >= self.interval:
            self.flush(now)

    def count(self, name: str, value: int) -> None:
        """A size (rows, tokens) logged as its mean and max; does not start a log line."""
        if not self.interval:
            return
        self._counts.setdefault(name, []).append(value)

    def flush(self, now: float | None = None) -> None:
        """Log what was recorded since the last line (nothing if nothing was)."""
        now = time.monotonic() if now is None else now
        if self._series and self._log.isEnabledFor(logging.INFO):
            parts = [
                f"{name} n={len(v)} p50={1e3 * _pct(v, 50):.1f} p95={1e3 * _pct(v, 95):.1f} "
                f"max={1e3 * max(v):.1f}"
                for name, v in self._series.items()
            ]
            parts += [f"{name} mean={sum(v) / len(v):.1f} max={max(v)}" for name, v in self._counts.items()]
            self._log.info("%s over %.1f s (ms): %s", self._title, now - self._since, "; ".join(parts))
        self._series = {}
        self._counts = {}
        self._since = now
