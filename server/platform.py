"""The seam between the service and IM platform adapters (e.g. bot.feishu).

The service knows adapters only through this protocol: it mounts their HTTP routes,
starts them after the executor is up, shows their health, and stops them last in the
shutdown order (stop accepting -> tell sessions -> drain work -> stop executor -> close
platform clients). An adapter talks to the model only through the `AnswerSource` it was
given (the service's answer gateway, `server.answers`).

Platform HTTP endpoints (e.g. Feishu's webhook) are framework-neutral: an `HttpRoute` is a
method, a path and an async handler from `HttpRequest` to `HttpResponse`; `server.http.platform`
mounts them on the web framework, with the same body limits and deadlines as every route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # names in any case; look them up case-insensitively
    client: str  # the peer's address, for log lines
    # The body, at most *limit* bytes, counted as it arrives: raises `server.errors.TooLarge`
    # past the limit and another `RequestError` when it cannot be read (the client left, ...).
    read_body: Callable[[int], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class HttpRoute:
    method: str
    path: str
    handler: Callable[[HttpRequest], Awaitable[HttpResponse]]


class PlatformAdapter(Protocol):
    name: str  # e.g. "feishu"

    def routes(self) -> list[HttpRoute]:
        """HTTP endpoints to mount (e.g. the webhook); may be empty."""

    async def start(self) -> None:
        """Connect to the platform; must not block the event loop."""

    async def drain(self, deadline: float) -> None:
        """Stop taking new work from the platform and let what is running (answers, their
        last platform updates) finish until *deadline* (monotonic seconds). Idempotent."""

    async def stop(self) -> None:
        """Disconnect and free everything (after `drain`, or instead of it); bounded in time."""

    def health(self) -> dict[str, Any]:
        """A small JSON-able status, e.g. {"connected": true, "state": "connected", ...}."""

    def healthy(self) -> bool:
        """False when the platform connection is down (the service reports "degraded")."""
