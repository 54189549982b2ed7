"""The running service: the start, drain and stop order of its parts.

Parts, each with `start`, `drain(deadline)`, `stop` and `health`: the answer gateway
(`server.answers`, which owns the executor and is the one way to the model), the
WebSocket hub (`server.ws.hub`: sessions and keepalive), the HAProxy agent check, and
the IM platform adapters.

Start order: gateway (the model starts loading) -> hub -> agent check -> platforms.
Drain (SIGTERM): stop accepting (new sessions and questions are refused with one shared
error) -> idle sessions are told (close 1012) -> running answers of every route, Feishu
cards included, finish for up to `server.shutdown_grace` seconds, then are cancelled
(their askers get "unavailable") -> the remaining sessions are closed. Stop: hub ->
agent check -> gateway (the executor) -> platform clients. Every step is bounded in time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from enum import Enum
from typing import Any

from server import metrics
from server.agentcheck import AgentCheck
from server.answers import AnswerGateway
from server.auth import Authenticator
from server.backend import image_limits
from server.config import Config
from server.health import Assessment, agent_line, assess, health_body
from server.inference.api import Executor
from server.platform import PlatformAdapter
from server.ws.hub import Hub

log = logging.getLogger("vlbridge.service")


class ServiceState(Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Service:
    def __init__(
        self,
        config: Config,
        answers: AnswerGateway | Executor,
        platforms: Sequence[PlatformAdapter] = (),
    ) -> None:
        server = config.server
        self.config = config
        self.answers = answers if isinstance(answers, AnswerGateway) else AnswerGateway(answers)
        self.auth = Authenticator(server.auth_tokens, server.allowed_origins)
        self.image_limits = image_limits(config)  # checked at every edge before a picture is queued
        self.hub = Hub(server, self.answers, self.auth, self.image_limits, config.executor.profile_seconds)
        self.platforms = tuple(platforms)
        self.agent = (
            AgentCheck(server.host, server.agent_check_port, self.agent_line)
            if server.agent_check_port
            else None
        )
        self.state = ServiceState.NEW
        self.born = time.monotonic()  # /health's uptime_seconds counts from here
        self._drained: asyncio.Future[None] | None = None
        self._started: list[PlatformAdapter] = []

    @property
    def accepting(self) -> bool:
        return self.state is ServiceState.RUNNING

    # ---- health --------------------------------------------------------------------------------

    def assessment(self) -> Assessment:
        platforms_ok = all(adapter.healthy() for adapter in self.platforms)
        return assess(self.answers.stats(), platforms_ok, self.state is not ServiceState.RUNNING)

    def health(self) -> tuple[dict[str, Any], int]:
        assessment = self.assessment()
        platforms = {adapter.name: adapter.health() for adapter in self.platforms}
        body = health_body(self.answers.stats(), assessment, self.hub.health(), platforms)
        body["version"] = metrics.VERSION
        body["uptime_seconds"] = round(time.monotonic() - self.born, 1)
        return body, assessment.http_status

    def agent_line(self) -> str:
        return agent_line(self.answers.stats(), self.assessment())

    def metrics_text(self) -> bytes:
        return metrics.render(self.answers.stats(), self.hub.connected, self.hub.sessions.parked)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.state is not ServiceState.NEW:
            raise RuntimeError(f"expected a new service, got state {self.state.value}")
        await self.answers.start()
        self.hub.start()
        if self.agent is not None:
            await self.agent.start()
        for adapter in self.platforms:
            await adapter.start()
            self._started.append(adapter)
        self.state = ServiceState.RUNNING

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting, finish or cancel running answers, close every session. Idempotent:
        a second caller waits for the first one's drain."""
        if self._drained is not None:
            await asyncio.shield(self._drained)
            return
        self._drained = asyncio.get_running_loop().create_future()
        try:
            await self._drain(self.config.server.shutdown_grace if grace is None else grace)
        finally:
            self._drained.set_result(None)

    async def _drain(self, grace: float) -> None:
        self.state = ServiceState.DRAINING
        self.answers.close()  # from here on every route's new work gets the shutdown error
        started = time.monotonic()
        deadline = started + grace
        log.info("draining: %d running answers, %d sessions", self.answers.running, len(self.hub.sessions))
        await asyncio.gather(
            self.answers.drain(deadline),
            self.hub.drain(deadline),
            *(adapter.drain(deadline) for adapter in self._started),
        )
        log.info("drained in %.2f s", time.monotonic() - started)

    async def stop(self) -> None:
        """Drain (if not done yet), then stop everything in order."""
        if self.state is ServiceState.STOPPED:
            return
        if self.state in (ServiceState.RUNNING, ServiceState.DRAINING):
            await self.drain()
        self.state = ServiceState.STOPPED
        await self.hub.stop()
        if self.agent is not None:
            await self.agent.stop()
        await self.answers.stop()
        for adapter in reversed(self._started):
            try:
                await asyncio.wait_for(adapter.stop(), 10.0)
            except Exception:
                log.exception("platform %s did not stop cleanly", adapter.name)
