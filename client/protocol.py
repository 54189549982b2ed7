"""The client side of WebSocket protocol v1, sans I/O: frames in, events and frames out.

No awaits, no sockets, no clock. The asyncio layer (`connection.py`) calls::

    core.connecting()                     # before each handshake; resume_query() says how
    events = core.receive(text)           # every text frame; then send core.take_outgoing()
    ask_id = core.ask("what is it?", [png_bytes])
    core.cancel(ask_id); core.reset(); core.ping(ts_ms)
    core.disconnected()                   # when the socket is gone, before reconnecting

and sends `take_outgoing()` whenever it is non-empty. What the core guarantees:

* Frames are deduplicated by `seq`: after a resume the server replays everything after
  `last_seq`, so a frame seen twice is dropped, and a hole in the numbering is reported
  (`FramesLost`) instead of silently showing a shorter answer.
* Server pings are answered with a pong carrying the same `ts`.
* Asks, cancels and resets made while the link is down are kept and sent, in order, once
  the link is back. After a resume the core first sends a `ping`; the server answers it
  after replaying the missed frames, so when its `pong` arrives every ask the server had
  received has been acknowledged, and the ones that were lost in the drop are sent again.
* When the server starts a fresh session instead of resuming (it forgot ours), questions
  it was answering are failed with code "session_lost" and unanswered ones are asked again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from client.errors import ClientError
from protocol.pictures import encode_base64
from protocol.v1 import (
    PROTOCOL_VERSION,
    QUERY_LAST_SEQ,
    QUERY_RESUME,
    ClientFrameType,
    ErrorCode,
    ServerFrameType,
)

log = logging.getLogger("vlbridge.client")

SESSION_LOST = "session_lost"  # an AskFailed code of the client's own: the server forgot the session


class ProtocolError(ClientError):
    """The server sent something protocol v1 does not allow, or the core was misused."""


class Link(StrEnum):
    IDLE = "idle"  # never connected
    HANDSHAKE = "handshake"  # connecting; waiting for hello
    SYNCING = "syncing"  # resumed; waiting for the pong that ends the replay
    READY = "ready"
    DOWN = "down"  # lost; will reconnect


class AskState(StrEnum):
    PENDING = "pending"  # not sent yet (link down or syncing)
    SENT = "sent"  # written to a socket, no frame about it seen yet
    QUEUED = "queued"
    STARTED = "started"
    DONE = "done"
    FAILED = "failed"


_OPEN = (AskState.PENDING, AskState.SENT, AskState.QUEUED, AskState.STARTED)


@dataclass(slots=True)
class Ask:
    id: str
    text: str
    images: list[str]  # base64
    state: AskState = AskState.PENDING
    answer: str = ""  # the deltas received so far
    max_tokens: int | None = None  # None: the server's default length

    def frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": ClientFrameType.ASK, "id": self.id, "text": self.text}
        if self.images:
            frame["images"] = self.images
        if self.max_tokens is not None:
            frame["max_tokens"] = self.max_tokens
        return frame


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    session: str
    resumed: bool
    ping_interval: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Queued:
    id: str
    position: int


@dataclass(frozen=True, slots=True)
class Reading:
    """The server began reading the ask's pictures (it may not send this: older servers)."""

    id: str


@dataclass(frozen=True, slots=True)
class Started:
    id: str


@dataclass(frozen=True, slots=True)
class Delta:
    id: str
    text: str


@dataclass(frozen=True, slots=True)
class AskDone:
    id: str
    text: str
    usage: dict[str, Any]
    finish_reason: str = "stop"  # "length": cut at max_tokens or the room the context left


@dataclass(frozen=True, slots=True)
class AskFailed:
    id: str
    code: str
    message: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class ServerError:
    """An error frame that belongs to no question (e.g. a malformed frame of ours)."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class SessionLost:
    """The server started a new session instead of resuming ours: its context is gone.
    *asked_again*: the questions it had not acknowledged, sent again to the new session (the
    others it was answering fail with code "session_lost")."""

    old: str
    new: str
    asked_again: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FramesLost:
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class ResetDone:
    """The server forgot the conversation's earlier turns."""


@dataclass(frozen=True, slots=True)
class Pong:
    ts: int | None


Event = (
    Hello
    | Queued
    | Reading
    | Started
    | Delta
    | AskDone
    | AskFailed
    | ServerError
    | SessionLost
    | FramesLost
    | ResetDone
    | Pong
)


class ClientProtocol:
    """One logical session across any number of connections (see the module docstring)."""

    def __init__(self, id_prefix: str = "q") -> None:
        self.link = Link.IDLE
        self.session: str | None = None
        self.last_seq = 0
        self.ping_interval: float | None = None
        self.asks: dict[str, Ask] = {}
        self._prefix = id_prefix
        self._counter = 0
        self._outgoing: list[dict[str, Any]] = []
        self._deferred: list[dict[str, Any]] = []  # cancels/resets made while not READY

    # -- connection lifecycle ---------------------------------------------------------------

    def resume_query(self) -> dict[str, str]:
        """Query parameters for the next handshake: resume the session we have, if any."""
        if self.session is None:
            return {}
        return {QUERY_RESUME: self.session, QUERY_LAST_SEQ: str(self.last_seq)}

    def connecting(self) -> None:
        self._expect(Link.IDLE, Link.DOWN, Link.HANDSHAKE)
        self.link = Link.HANDSHAKE

    def disconnected(self) -> None:
        """The socket is gone. Asks stay open; they continue after the resume."""
        self.link = Link.DOWN
        # Unwritten asks are found again after the next hello (still unacknowledged); unwritten
        # cancels and resets are kept; pings and pongs belong to the dead connection.
        unwritten = [
            f for f in self._outgoing if f["type"] in (ClientFrameType.CANCEL, ClientFrameType.RESET)
        ]
        self._deferred[:0] = unwritten
        self._outgoing.clear()

    # -- what the user does ---------------------------------------------------------------

    def ask(
        self, text: str, images: list[bytes] | tuple[bytes, ...] = (), max_tokens: int | None = None
    ) -> str:
        """Queue a question; *max_tokens* caps the answer's length (the server may cap it lower)."""
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"expected a positive max_tokens, got {max_tokens}")
        self._counter += 1
        ask_id = f"{self._prefix}{self._counter}"
        encoded = [encode_base64(data) for data in images]
        ask = Ask(ask_id, text, encoded, max_tokens=max_tokens)
        self.asks[ask_id] = ask
        if self.link is Link.READY:
            self._send_ask(ask)
        return ask_id

    def cancel(self, ask_id: str) -> list[Event]:
        """Stop *ask_id*. One not yet sent is failed here; otherwise the server says so."""
        ask = self.asks.get(ask_id)
        if ask is None or ask.state not in _OPEN:
            return []
        if ask.state is AskState.PENDING:
            ask.state = AskState.FAILED
            return [AskFailed(ask_id, ErrorCode.CANCELLED, "cancelled before it was sent")]
        self._control({"type": ClientFrameType.CANCEL, "id": ask_id})
        return []

    def reset(self) -> None:
        """Forget the conversation context (earlier turns) on the server."""
        self._control({"type": ClientFrameType.RESET})

    def ping(self, ts: int) -> None:
        if self.link is Link.READY:
            self._outgoing.append({"type": ClientFrameType.PING, "ts": ts})

    def open_asks(self) -> list[str]:
        return [a.id for a in self.asks.values() if a.state in _OPEN]

    def take_outgoing(self) -> list[dict[str, Any]]:
        frames, self._outgoing = self._outgoing, []
        return frames

    # -- what the server says -------------------------------------------------------------

    def receive(self, data: str | bytes) -> list[Event]:
        """Handle one text frame; raises `ProtocolError` for frames v1 does not allow."""
        try:
            frame = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"server sent invalid JSON: {exc}") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise ProtocolError(f"expected a JSON object with a type, got {str(data)[:80]!r}")
        kind: str = frame["type"]
        if kind == ServerFrameType.HELLO:
            return self._hello(frame)
        if self.link is Link.HANDSHAKE:
            raise ProtocolError(f"expected hello first, got {kind}")
        events = self._sequence(frame)
        if events is None:
            return []  # a duplicate from a replay
        handler = getattr(self, f"_on_{kind}", None)  # _on_<ServerFrameType value>
        if handler is None:
            log.warning("session %s: ignoring unknown frame type %r", self.session, kind)
            return events
        result: list[Event] = handler(frame)
        return events + result

    def _sequence(self, frame: dict[str, Any]) -> list[Event] | None:
        seq = frame.get("seq")
        if not isinstance(seq, int):
            return []
        if seq <= self.last_seq:
            log.debug("session %s: dropping replayed frame seq %d", self.session, seq)
            return None
        events: list[Event] = []
        if seq > self.last_seq + 1:
            log.info("session %s: frames %d..%d were lost", self.session, self.last_seq + 1, seq - 1)
            events.append(FramesLost(self.last_seq + 1, seq - 1))
        self.last_seq = seq
        return events

    def _hello(self, frame: dict[str, Any]) -> list[Event]:
        self._expect(Link.HANDSHAKE)
        session = frame.get("session")
        if not isinstance(session, str) or not session:
            raise ProtocolError("hello without a session id")
        if frame.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            raise ProtocolError(f"expected protocol {PROTOCOL_VERSION}, got {frame.get('protocol')!r}")
        interval = frame.get("ping_interval")
        self.ping_interval = float(interval) if isinstance(interval, int | float) else None
        events: list[Event] = []
        resumed = self.session is not None and session == self.session
        if self.session is not None and not resumed:
            failed = self._session_lost()
            again = tuple(a.id for a in self.asks.values() if a.state is AskState.PENDING)
            events.append(SessionLost(self.session, session, again))
            events.extend(failed)
        if not resumed:
            self.last_seq = 0
            seq = frame.get("seq")
            if isinstance(seq, int):
                self.last_seq = seq
        # A resumed hello's own seq is not part of the replayed sequence we track.
        self.session = session
        info = {k: v for k, v in frame.items() if k not in ("type", "session", "ping_interval")}
        events.insert(0, Hello(session, resumed, self.ping_interval or 0.0, info))
        if resumed and any(a.state is AskState.SENT for a in self.asks.values()):
            self.link = Link.SYNCING
            self._outgoing.append({"type": ClientFrameType.PING, "ts": 0})
        else:
            self._synced()
        return events

    def _session_lost(self) -> list[Event]:
        events: list[Event] = []
        for ask in self.asks.values():
            if ask.state in (AskState.QUEUED, AskState.STARTED):
                ask.state = AskState.FAILED
                message = "the server lost the session while answering"
                events.append(AskFailed(ask.id, SESSION_LOST, message))
            elif ask.state is AskState.SENT:
                ask.state = AskState.PENDING  # never acknowledged: ask the new session
        self._deferred = [f for f in self._deferred if f["type"] != ClientFrameType.CANCEL]
        return events

    def _synced(self) -> None:
        self.link = Link.READY
        for ask in self.asks.values():
            if ask.state in (AskState.SENT, AskState.PENDING):
                if ask.state is AskState.SENT:
                    log.info("session %s: asking %s again, it was lost in the drop", self.session, ask.id)
                self._send_ask(ask)
        deferred, self._deferred = self._deferred, []
        self._outgoing.extend(deferred)

    def _on_ping(self, frame: dict[str, Any]) -> list[Event]:
        self._outgoing.append({"type": ClientFrameType.PONG, "ts": frame.get("ts")})
        return []

    def _on_pong(self, frame: dict[str, Any]) -> list[Event]:
        if self.link is Link.SYNCING:
            self._synced()
        ts = frame.get("ts")
        return [Pong(ts if isinstance(ts, int) else None)]

    def _on_reset(self, frame: dict[str, Any]) -> list[Event]:
        return [ResetDone()]

    def _on_queued(self, frame: dict[str, Any]) -> list[Event]:
        ask = self._ask_for(frame)
        if ask is None:
            return []
        ask.state = AskState.QUEUED
        position = frame.get("position")
        return [Queued(ask.id, position if isinstance(position, int) else 0)]

    def _on_reading(self, frame: dict[str, Any]) -> list[Event]:
        ask = self._ask_for(frame)
        return [] if ask is None else [Reading(ask.id)]

    def _on_started(self, frame: dict[str, Any]) -> list[Event]:
        ask = self._ask_for(frame)
        if ask is None:
            return []
        ask.state = AskState.STARTED
        return [Started(ask.id)]

    def _on_delta(self, frame: dict[str, Any]) -> list[Event]:
        ask = self._ask_for(frame)
        text = frame.get("text")
        if ask is None or not isinstance(text, str):
            return []
        ask.state = AskState.STARTED
        ask.answer += text
        return [Delta(ask.id, text)]

    def _on_done(self, frame: dict[str, Any]) -> list[Event]:
        ask = self._ask_for(frame)
        if ask is None:
            return []
        ask.state = AskState.DONE
        text = frame.get("text")
        usage = frame.get("usage")
        reason = frame.get("finish_reason")
        return [
            AskDone(
                ask.id,
                text if isinstance(text, str) else ask.answer,
                usage or {},
                reason if isinstance(reason, str) else "stop",
            )
        ]

    def _on_error(self, frame: dict[str, Any]) -> list[Event]:
        code = str(frame.get("code", ErrorCode.INTERNAL))
        message = str(frame.get("message", ""))
        retry = frame.get("retry_after")
        if frame.get("id") is None or str(frame["id"]) not in self.asks:
            return [ServerError(code, message)]
        ask = self._ask_for(frame)
        if ask is None:
            return []  # e.g. a cancel that crossed the answer's done frame
        ask.state = AskState.FAILED
        return [AskFailed(ask.id, code, message, float(retry) if isinstance(retry, int | float) else None)]

    # -- helpers --------------------------------------------------------------------------

    def _ask_for(self, frame: dict[str, Any]) -> Ask | None:
        ask = self.asks.get(str(frame.get("id")))
        if ask is None:
            log.warning(
                "session %s: %s frame for unknown ask %r", self.session, frame["type"], frame.get("id")
            )
            return None
        if ask.state in (AskState.DONE, AskState.FAILED):
            log.debug("session %s: %s frame for finished ask %s", self.session, frame["type"], ask.id)
            return None
        return ask

    def _send_ask(self, ask: Ask) -> None:
        ask.state = AskState.SENT
        self._outgoing.append(ask.frame())

    def _control(self, frame: dict[str, Any]) -> None:
        if self.link is Link.READY:
            self._outgoing.append(frame)
        else:
            self._deferred.append(frame)

    def _expect(self, *states: Link) -> None:
        if self.link not in states:
            expected = "|".join(state.value for state in states)
            raise ProtocolError(f"expected link {expected}, got {self.link.value}")
