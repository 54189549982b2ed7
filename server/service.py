"""The running service: owns the executor, sessions, keepalive, agent check and platforms.

Start order: executor -> keepalive -> agent check -> platforms. Shutdown order (`drain`
then `stop`): stop accepting (new WebSocket sessions and HTTP asks are refused) -> tell
idle sessions (close 1012) -> let running answers finish for up to `shutdown_grace`
seconds -> cancel the rest (their askers get an "unavailable" error) -> close the
remaining sessions (1012) -> stop keepalive and agent check -> stop the executor ->
stop platform adapters. Every step is bounded in time.

Every answer, whatever its route, goes through `answer()`, which tracks it for the
drain and records its metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from enum import Enum
from typing import Any

from server import metrics
from server.agentcheck import AgentCheck
from server.auth import Authenticator
from server.config import Config
from server.health import Assessment, agent_line, assess, health_body
from server.inference.api import FINAL, Done, Event, Events, Executor, Failed, InferenceRequest, RequestHandle
from server.platform import PlatformAdapter
from server.ws.frames import FrameLimits
from server.ws.keepalive import PingManager
from server.ws.sessions import Session, SessionLimits, SessionRegistry

log = logging.getLogger("vlbridge.service")

SHUTDOWN_CLOSE_CODE = 1012  # service restart: reconnect later (to another instance)
SHUTTING_DOWN = "the service is shutting down; ask again shortly"


class ServiceState(Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Answer:
    """One submitted request, tracked until its stream ends."""

    __slots__ = ("_listener", "_service", "handle", "route", "shutdown")

    def __init__(self, service: Service, handle: RequestHandle, route: str) -> None:
        self._service = service
        self._listener: Callable[[Events], None] | None = None
        self.handle = handle
        self.route = route
        self.shutdown = False

    def cancel(self) -> None:
        self.handle.cancel()

    async def events(self) -> AsyncIterator[Event]:
        """The request's events; a request cut by shutdown ends with "unavailable"."""
        code = "internal"
        try:
            async for event in self.handle:
                if isinstance(event, FINAL):
                    event, code = self._finish(event)
                yield event
        finally:
            self._service._untrack(self, code)

    def listen(self, callback: Callable[[Events], None]) -> None:
        """The same events as `events()`, passed to *callback* in batches as the handle
        delivers them (no task needed). A callback that raises ends the request: it is
        cancelled and untracked, and the error logged."""
        self._listener = callback
        self.handle.listen(self._deliver)

    def _deliver(self, events: Events) -> None:
        listener = self._listener
        if listener is None:  # its listener failed: the rest is of no interest
            return
        code = None
        last = events[-1]
        if isinstance(last, FINAL):
            self._listener = None  # no cycle left through the listener: freed without the GC
            final, code = self._finish(last)
            if final is not last:
                events = [*events[:-1], final]
        try:
            listener(events)
        except Exception:
            log.exception("%s: handling an answer event failed", self.handle.id)
            self._listener = None
            self.handle.cancel()
            self._service._untrack(self, "internal")
            return
        if code is not None:
            self._service._untrack(self, code)

    def _finish(self, event: Done | Failed) -> tuple[Done | Failed, str]:
        """The last event as the caller should see it, and the result code to count."""
        if isinstance(event, Done):
            metrics.LATENCY.observe(event.timings.total, self.route)
            metrics.TTFT.observe(event.timings.first_token, self.route)
            return event, "ok"
        if self.shutdown and event.code == "cancelled":
            event = Failed("unavailable", SHUTTING_DOWN, 5.0)
        return event, event.code


class Service:
    def __init__(self, config: Config, executor: Executor, platforms: Sequence[PlatformAdapter] = ()) -> None:
        server = config.server
        self.config = config
        self.executor = executor
        self.platforms = tuple(platforms)
        self.auth = Authenticator(server.auth_tokens, server.allowed_origins)
        self.frame_limits = FrameLimits(server.max_images, server.max_image_bytes)
        self.sessions = SessionRegistry(
            SessionLimits(
                max_sessions=server.max_sessions,
                resume_ttl=server.resume_ttl,
                log_frames=server.resume_buffer_frames,
                history_turns=server.history_turns,
                max_images=server.max_images,
            )
        )
        self.pings = PingManager(self.sessions, server.ping_interval, server.ping_timeout)
        self.agent = (
            AgentCheck(server.host, server.agent_check_port, self.agent_line)
            if server.agent_check_port
            else None
        )
        self.state = ServiceState.NEW
        self.connected = 0  # WebSocket connections attached to a session
        self._answers: set[Answer] = set()
        self._idle = asyncio.Event()  # set when the last answer ends while draining
        self._drained: asyncio.Future[None] | None = None
        self._started: list[PlatformAdapter] = []

    # ---- answers -------------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self.state is ServiceState.RUNNING

    def answer(self, request: InferenceRequest, route: str) -> Answer:
        """Submit *request*; iterate `.events()` of the result to its end (that untracks it)."""
        answer = Answer(self, self.executor.submit(request), route)
        self._answers.add(answer)
        return answer

    def _untrack(self, answer: Answer, code: str) -> None:
        if answer in self._answers:
            self._answers.discard(answer)
            answer.handle.cancel()  # no-op when finished; frees the slot when the caller left early
            metrics.REQUESTS.inc(answer.route, code)
            if code != "ok":
                metrics.ERRORS.inc(answer.route, code)
        if not self._answers and self.state is ServiceState.DRAINING:
            self._idle.set()

    @property
    def running_answers(self) -> int:
        return len(self._answers)

    # ---- health --------------------------------------------------------------------------------

    def assessment(self) -> Assessment:
        platforms_ok = all(adapter.healthy() for adapter in self.platforms)
        return assess(self.executor.stats(), platforms_ok, self.state is not ServiceState.RUNNING)

    def health(self) -> tuple[dict[str, Any], int]:
        stats = self.executor.stats()
        assessment = self.assessment()
        sessions = {"connected": self.connected, "parked": self.sessions.parked, "total": len(self.sessions)}
        platforms = {adapter.name: adapter.health() for adapter in self.platforms}
        return health_body(stats, assessment, sessions, platforms), assessment.http_status

    def agent_line(self) -> str:
        return agent_line(self.executor.stats(), self.assessment())

    def metrics_text(self) -> bytes:
        return metrics.render(self.executor.stats(), self.connected, self.sessions.parked)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.state is not ServiceState.NEW:
            raise RuntimeError(f"expected a new service, got state {self.state.value}")
        await self.executor.start()
        self.pings.start()
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
        started = time.monotonic()
        log.info("draining: %d running answers, %d sessions", len(self._answers), len(self.sessions))
        for session in self.sessions:
            if not session.busy or session.link is None:  # nobody would read a parked one's answers
                self._close_session(session)
        await self._answers_end(grace)
        if self._answers:
            log.warning("grace of %.1f s over: cancelling %d running answers", grace, len(self._answers))
            for answer in list(self._answers):
                answer.shutdown = True
                answer.cancel()
            await self._answers_end(5.0)
        for session in self.sessions:
            self._close_session(session)
        for _ in range(100):  # let writers flush their last frames and close frames
            if not self.connected:
                break
            await asyncio.sleep(0.02)
        log.info("drained in %.2f s", time.monotonic() - started)

    async def _answers_end(self, within: float) -> None:
        """Wait up to *within* seconds for the running answers to end."""
        self._idle.clear()
        if self._answers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), within)

    def _close_session(self, session: Session) -> None:
        link = session.link
        self.sessions.discard(session)
        if link is not None:
            link.close(SHUTDOWN_CLOSE_CODE, "server shutting down")

    def session_idle(self, session: Session) -> None:
        """Called when a session's last running answer ended: during a drain, close it now."""
        if self.state is ServiceState.DRAINING and not session.busy:
            self._close_session(session)

    async def stop(self) -> None:
        """Drain (if not done yet), then stop everything in order."""
        if self.state is ServiceState.STOPPED:
            return
        if self.state in (ServiceState.RUNNING, ServiceState.DRAINING):
            await self.drain()
        self.state = ServiceState.STOPPED
        await self.pings.stop()
        if self.agent is not None:
            await self.agent.stop()
        await self.executor.stop(0.0)
        for adapter in reversed(self._started):
            try:
                await asyncio.wait_for(adapter.stop(), 10.0)
            except Exception:
                log.exception("platform %s did not stop cleanly", adapter.name)
