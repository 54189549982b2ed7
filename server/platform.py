"""The seam between the service and IM platform adapters (e.g. bot.feishu).

The service knows adapters only through this protocol: it mounts their HTTP routes,
starts them after the executor is up, shows their health, and stops them last in the
shutdown order (stop accepting -> tell sessions -> drain work -> stop executor -> close
platform clients). An adapter talks to the model only through `server.inference.api`.
"""

from __future__ import annotations

from typing import Any, Protocol

from starlette.routing import BaseRoute


class PlatformAdapter(Protocol):
    name: str  # e.g. "feishu"

    def routes(self) -> list[BaseRoute]:
        """HTTP routes to mount (e.g. the webhook endpoint); may be empty."""

    async def start(self) -> None:
        """Connect to the platform; must not block the event loop."""

    async def stop(self) -> None:
        """Disconnect and free everything; bounded in time."""

    def health(self) -> dict[str, Any]:
        """A small JSON-able status, e.g. {"connected": true, "state": "connected", ...}."""

    def healthy(self) -> bool:
        """False when the platform connection is down (the service reports "degraded")."""
