"""WebSocket sessions and their registry: live and parked sessions, resume, limits.

A `Session` outlives connections: its frames are numbered and kept (FrameLog) so that a
client that lost its connection can resume and receive what it missed, including
answers that finished meanwhile. A session is bound to at most one `Link` (its current
connection) at a time; resuming on a new connection takes it over.

`SessionRegistry` owns every session: it enforces `max_sessions` (evicting the oldest
parked session before refusing a new one), parks detached sessions for `resume_ttl`
seconds and discards them after that, cancelling their running answers.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from server.logs import short_id
from server.ws.state import FrameLog, History

log = logging.getLogger("vlbridge.ws")


class Link(Protocol):
    """The connection side a session talks to (server.ws.endpoint.SocketLink)."""

    def send(self, data: bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class ActiveAsk(Protocol):
    """A running question of the session (server.ws.endpoint's relay of its answer)."""

    def cancel(self) -> None: ...


class Session:
    """One conversation over one or more successive connections."""

    __slots__ = ("asks", "history", "id", "link", "log", "owner", "parked_at")

    def __init__(self, session_id: str, owner: bytes, log_limit: int, history: History) -> None:
        self.id = session_id
        self.owner = owner  # digest of the token that opened it; resume needs the same one
        self.log = FrameLog(log_limit)
        self.history = history
        self.link: Link | None = None
        self.asks: dict[str, ActiveAsk] | None = None  # created on the first ask
        self.parked_at: float | None = None

    def emit(self, frame: dict[str, Any]) -> None:
        """Number *frame*, keep it for resume, and send it if a connection is attached."""
        data = self.log.append(frame)
        if self.link is not None:
            self.link.send(data)

    @property
    def tag(self) -> str:
        """The session in log lines: a prefix of its id (the whole id would let a log
        reader resume the conversation)."""
        return short_id(self.id)

    @property
    def busy(self) -> bool:
        return bool(self.asks)

    def cancel_all(self) -> None:
        for ask in list((self.asks or {}).values()):
            ask.cancel()

    def __repr__(self) -> str:
        return f"Session({self.tag!r}, seq={self.log.seq}, asks={len(self.asks or ())})"


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_sessions: int
    resume_ttl: float
    log_frames: int
    history_turns: int
    max_images: int


class SessionRegistry:
    def __init__(self, limits: SessionLimits) -> None:
        self.limits = limits
        self._sessions: dict[str, Session] = {}
        self._parked: OrderedDict[str, Session] = OrderedDict()  # oldest first

    def open(self, owner: bytes) -> Session | None:
        """A new session, or None when `max_sessions` live sessions exist."""
        if len(self._sessions) >= self.limits.max_sessions and self._parked:
            oldest = next(iter(self._parked.values()))
            log.info("session %s: evicted while parked to make room", oldest.tag)
            self.discard(oldest)
        if len(self._sessions) >= self.limits.max_sessions:
            return None
        session = Session(
            secrets.token_urlsafe(16),
            owner,
            self.limits.log_frames,
            History(self.limits.history_turns, self.limits.max_images),
        )
        self._sessions[session.id] = session
        return session

    def resume(self, session_id: str, owner: bytes) -> Session | None:
        """The session *session_id* when it exists and *owner* opened it; it is un-parked."""
        session = self._sessions.get(session_id)
        if session is None or not secrets.compare_digest(session.owner, owner):
            return None
        self._parked.pop(session_id, None)
        session.parked_at = None
        return session

    def park(self, session: Session, now: float) -> None:
        """Keep a detached session for `resume_ttl` seconds (discard at once when it is 0)."""
        session.link = None
        if self.limits.resume_ttl <= 0:
            self.discard(session)
            return
        session.parked_at = now
        self._parked[session.id] = session
        self._parked.move_to_end(session.id)

    def discard(self, session: Session) -> None:
        """Forget *session*; its running answers are cancelled. Idempotent."""
        self._sessions.pop(session.id, None)
        self._parked.pop(session.id, None)
        session.link = None
        session.cancel_all()

    def expire(self, now: float) -> int:
        """Discard sessions parked for longer than `resume_ttl`; return how many."""
        count = 0
        while self._parked:
            session = next(iter(self._parked.values()))
            assert session.parked_at is not None
            if now - session.parked_at < self.limits.resume_ttl:
                break
            log.info("session %s: not resumed within %.0f s; discarded", session.tag, self.limits.resume_ttl)
            self.discard(session)
            count += 1
        return count

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def parked(self) -> int:
        return len(self._parked)
