"""The hub: every WebSocket session of the service, and what `/ws` connections need to serve them.

It owns the session registry, the ping manager and the frame limits, counts attached
connections, and closes sessions: at once while idle during a drain, and when their last
answer ends (`session_idle`) for busy ones. The `/ws` endpoint reaches everything through
the hub it finds at ``app.state.hub``: the answer gateway for questions, the authenticator
for handshakes, the server settings for limits.

Lifecycle (driven by `server.service.Service`): `start` -> `drain(deadline)` -> `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from enum import Enum

from protocol.pictures import ImageLimits
from protocol.v1 import CloseCode
from server.answers import CANCEL_WAIT, AnswerGateway
from server.auth import Authenticator
from server.config import ServerConfig
from server.inference.profile import Profile
from server.ws.frames import FrameLimits
from server.ws.keepalive import PingManager
from server.ws.sessions import Session, SessionLimits, SessionRegistry

log = logging.getLogger("vlbridge.ws")

FLUSH_WAIT = 2.0  # after closing: how long writers get to send their last frames and close frames


class HubState(Enum):
    OPEN = "open"
    DRAINING = "draining"
    STOPPED = "stopped"


class Hub:
    def __init__(
        self,
        server: ServerConfig,
        answers: AnswerGateway,
        auth: Authenticator,
        image_limits: ImageLimits,
        profile_seconds: float = 0.0,
    ) -> None:
        self.config = server
        # On the event loop: how long the sessions' frames wait to be written (`write_wait`,
        # from the first frame queued to the write), a log line every *profile_seconds* while busy.
        self.profile = Profile(logging.getLogger("vlbridge.profile"), "websocket", profile_seconds)
        self.image_limits = image_limits  # what a picture must pass before its ask is queued
        self.answers = answers
        self.auth = auth
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
        self.state = HubState.OPEN
        self.connected = 0  # connections attached to a session
        self._idle = asyncio.Event()  # set when a drain finds no busy session left
        self._gone = asyncio.Event()  # set when the last connection ends

    @property
    def accepting(self) -> bool:
        return self.state is HubState.OPEN

    def start(self) -> None:
        self.pings.start()

    def attach(self) -> None:
        """A connection was bound to a session."""
        self.connected += 1
        self._gone.clear()

    def detach(self) -> None:
        """A connection ended."""
        self.connected -= 1
        if not self.connected:
            self._gone.set()

    def close_session(self, session: Session) -> None:
        """Forget *session* (its running answers are cancelled) and close its connection (1012)."""
        link = session.link
        self.sessions.discard(session)
        if link is not None:
            link.close(CloseCode.RESTART, "server shutting down")

    def session_idle(self, session: Session) -> None:
        """Called when a session's last running answer ended: during a drain, close it now."""
        if self.state is HubState.DRAINING and not session.busy:
            self.close_session(session)
            if not any(s.busy for s in self.sessions):
                self._idle.set()

    async def drain(self, deadline: float) -> None:
        """Refuse new sessions; close idle ones now, busy ones as their answers end (until
        *deadline*, plus the gateway's wait for cancelled answers); then every other one."""
        self.state = HubState.DRAINING
        for session in self.sessions:
            if not session.busy or session.link is None:  # nobody would read a parked one's answers
                self.close_session(session)
        if any(s.busy for s in self.sessions):
            self._idle.clear()
            remaining = deadline - time.monotonic() + CANCEL_WAIT
            if remaining > 0:
                try:
                    await asyncio.wait_for(self._idle.wait(), remaining)
                except TimeoutError:
                    log.warning("drain: closing %d sessions with answers still running", len(self.sessions))
        for session in self.sessions:
            self.close_session(session)
        if self.connected:  # writers flush their last frames and close frames
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gone.wait(), FLUSH_WAIT)

    async def stop(self) -> None:
        self.state = HubState.STOPPED
        await self.pings.stop()

    def health(self) -> dict[str, int]:
        return {"connected": self.connected, "parked": self.sessions.parked, "total": len(self.sessions)}
