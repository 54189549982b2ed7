"""Which OpenAI-compatible server answers next: least outstanding requests, failing ones ejected.

Sans-I/O: plain values in and out, the clock passed as `now`, so balancing and ejection
are tested without sockets. The OpenAI backend (`server.inference.openai_backend`) drives it:

- `pick(now, exclude)`: the healthy upstream with the fewest requests in flight (ties: the
  one listed first), or None; `begin`/`end` count a request in and out.
- `fail(upstream, now, reason)`: a connect error, a 5xx or a stream broken off: the upstream
  is left out (ejected) for `eject_seconds`, then `due(now)` lists it for a probe; `recover`
  takes it back, another `fail` keeps it out for another period.

An upstream is healthy from its first good probe or answer until it fails; before any
probe it is `UNKNOWN`, and picked like a healthy one (a request is as good a probe as any).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Health(StrEnum):
    UNKNOWN = "unknown"  # not probed yet
    HEALTHY = "healthy"
    EJECTED = "ejected"


@dataclass(eq=False)
class Upstream:
    url: str  # the base URL, e.g. http://gpu-1:8000/v1 (no trailing slash)
    health: Health = Health.UNKNOWN
    outstanding: int = 0  # requests in flight on it
    ejected_until: float = 0.0
    reason: str = ""  # why it was last ejected
    requests: int = 0  # requests sent to it, ever
    failures: int = 0  # times it was ejected


class UpstreamPool:
    """The upstreams of one backend and their health; not thread-safe (the event loop's)."""

    def __init__(self, urls: Iterable[str], eject_seconds: float) -> None:
        self.upstreams = [Upstream(url) for url in urls]
        if not self.upstreams:
            raise ValueError("expected at least one upstream URL")
        self.eject_seconds = eject_seconds

    def pick(self, now: float, exclude: Iterable[Upstream] = ()) -> Upstream | None:
        """The usable upstream with the fewest requests in flight, or None when none is."""
        skip = set(exclude)
        usable = [u for u in self.upstreams if u not in skip and u.health is not Health.EJECTED]
        return min(usable, key=lambda u: u.outstanding, default=None)

    def begin(self, upstream: Upstream) -> None:
        upstream.outstanding += 1
        upstream.requests += 1

    def end(self, upstream: Upstream) -> None:
        upstream.outstanding -= 1

    def succeed(self, upstream: Upstream) -> None:
        """It answered (a probe or a request's first bytes): usable."""
        upstream.health = Health.HEALTHY
        upstream.reason = ""

    def fail(self, upstream: Upstream, now: float, reason: str) -> None:
        """Leave *upstream* out for `eject_seconds`; it is probed when `due`."""
        if upstream.health is not Health.EJECTED:
            upstream.failures += 1
        upstream.health = Health.EJECTED
        upstream.ejected_until = now + self.eject_seconds
        upstream.reason = reason

    def due(self, now: float) -> list[Upstream]:
        """Upstreams to probe now: the ejected ones whose period is over, and the unknown."""
        return [
            u
            for u in self.upstreams
            if u.health is Health.UNKNOWN or (u.health is Health.EJECTED and u.ejected_until <= now)
        ]

    def next_due(self) -> float | None:
        """When the next ejected upstream is due for a probe (monotonic), or None."""
        ejected = [u.ejected_until for u in self.upstreams if u.health is Health.EJECTED]
        return min(ejected, default=None)

    def retry_after(self, now: float) -> float:
        """Seconds until an ejected upstream is probed again (at least 1)."""
        due = self.next_due()
        return max(1.0, (due - now) if due is not None else self.eject_seconds)

    @property
    def healthy(self) -> int:
        return sum(1 for u in self.upstreams if u.health is Health.HEALTHY)

    @property
    def usable(self) -> bool:
        return any(u.health is not Health.EJECTED for u in self.upstreams)

    @property
    def outstanding(self) -> int:
        return sum(u.outstanding for u in self.upstreams)

    def summary(self) -> str:
        """One line for /health's detail: e.g. ``1/2 upstreams healthy; http://b/v1 ejected: ...``."""
        parts = [f"{self.healthy}/{len(self.upstreams)} upstreams healthy"]
        parts += [f"{u.url} ejected: {u.reason}" for u in self.upstreams if u.health is Health.EJECTED]
        return "; ".join(parts)
