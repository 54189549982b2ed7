"""The `/ws` endpoint: the thin asyncio layer that pumps frames between a socket and a session.

Per connection there is the ASGI task that reads frames (the server gives us that one)
and, only while frames are waiting to go out, a writer task; an idle connection has no
other task or timer (keepalive is one shared sweeper, see keepalive.py). Protocol
decisions live in frames.py, protocol.py and sessions.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from protocol.pictures import PictureRejected, sniff_image
from protocol.v1 import HEADER_SESSION, PROTOCOL_VERSION, QUERY_LAST_SEQ, QUERY_RESUME, CloseCode
from server import metrics
from server.answers import Answer
from server.auth import Refusal
from server.inference.api import FINAL, Done, Events, ExecutorState, InferenceRequest, Turn
from server.inference.profile import Profile
from server.logs import short_id
from server.wire import error_dict, event_dict
from server.ws.frames import (
    Ask,
    Cancel,
    ClientFrame,
    InvalidFrame,
    Ping,
    Pong,
    Reset,
    encode,
    parse_client_frame,
)
from server.ws.hub import Hub, HubState
from server.ws.sessions import Session
from server.ws.state import FloodGate, Keepalive
from server.ws.transport import FRAMES, SEND_MANY

log = logging.getLogger("vlbridge.ws")

# the client ended the session on purpose: nothing to resume
CLOSE_NORMAL = (CloseCode.NORMAL, CloseCode.GOING_AWAY)
# also when the server's own frame limit closed it
CLOSE_ABUSE = (CloseCode.POLICY, CloseCode.TOO_BIG)
# where an HTTP 403 denial cannot be sent
_DENIAL_CLOSE = {"unauthorized": CloseCode.UNAUTHORIZED, "forbidden": CloseCode.FORBIDDEN}
# Frames this large (pictures) are profiled: how long they took to arrive (`frame_read`) and to
# parse (`frame_parse`). They are parsed on the event loop like the rest: orjson holds the GIL
# while it parses, so a thread would block the loop as long and add two hand-offs of the GIL,
# each waiting behind the executor's worker (H200, 2B, c=64: 19-32 ms p50 for a 1.25 MB frame).
PROFILED_FRAME = 256 * 1024
# the session's id in the handshake response, for a load balancer (see websocket_endpoint)
SESSION_HEADER = HEADER_SESSION.lower().encode()


class LinkState(Enum):
    """OPEN -> CLOSING (a close frame is due after the queued frames) -> ENDED (closed, or the
    peer is gone). Sending is possible only while OPEN."""

    OPEN = "open"
    CLOSING = "closing"
    ENDED = "ended"


class SocketLink:
    """One accepted WebSocket bound to one session; sends in order through a lazy writer."""

    __slots__ = (
        "_close",
        "_outbox",
        "_queued",
        "_reading",
        "_writer",
        "gate",
        "keepalive",
        "label",
        "loop",
        "profile",
        "send_many",
        "session",
        "state",
        "write_now",
        "ws",
    )

    def __init__(
        self,
        ws: WebSocket,
        send_many: Send | None,
        session: Session,
        keepalive: Keepalive,
        gate: FloodGate,
        profile: Profile,
    ) -> None:
        self.ws = ws
        self.profile = profile  # the hub's: how long frames wait to be written (`write_wait`)
        self._queued = 0.0  # when the outbox got its first frame
        self.loop = asyncio.get_running_loop()  # asyncio.get_running_loop() costs a getpid() on 3.11
        self.send_many = send_many
        # vlbridge's transport (server.ws.transport) writes several frames at once, also without a coroutine
        self.write_now: Callable[[list[bytes]], bool] | None = (
            ws.scope["extensions"][FRAMES]["write_now"] if send_many is not None else None
        )
        self.session = session
        self.keepalive = keepalive
        self.gate = gate
        self.label = f"session {session.tag}"
        self._outbox: list[bytes] | None = None
        self._writer: asyncio.Task[None] | asyncio.Handle | None = None  # writing, or about to
        self.state = LinkState.OPEN
        self._close: tuple[int, str] = (CLOSE_NORMAL[0], "")  # what CLOSING sends
        self._reading = False  # in the read callback: `received` writes what it queued

    @property
    def open(self) -> bool:
        return self.state is LinkState.OPEN

    @property
    def abusive(self) -> bool:
        """Closed by the server for flooding or an oversized frame: nothing is kept for resume."""
        return self.state is not LinkState.OPEN and self._close[0] in CLOSE_ABUSE

    def send(self, data: bytes) -> None:
        if self.state is not LinkState.OPEN:
            return
        outbox = self._outbox
        if outbox is None:
            self._outbox = [data]
            self._queued = time.monotonic()
            self._wake()
            return
        outbox.append(data)
        if len(outbox) > self.session.log.limit:
            self.close(CloseCode.SLOW, "the client is not reading its frames")

    def close(self, code: int, reason: str) -> None:
        """Close after the frames already queued; idempotent."""
        if not self.open:
            return
        self.state, self._close = LinkState.CLOSING, (code, reason)
        self._wake()

    def ping(self, now: float) -> bool:
        ts = int(time.time() * 1000)
        self.session.emit({"type": "ping", "ts": ts})
        return self.keepalive.ping_sent(ts, self.session.log.seq, now)

    def ended(self) -> None:
        self.state = LinkState.ENDED
        self._outbox = None

    def reading(self) -> None:
        """A frame is being handled in the socket's read callback: hold what it sends for
        `received`, which writes it at once (no scheduled write, no loop hop)."""
        self._reading = True

    def received(self) -> None:
        self._reading = False
        if self._writer is None and (self._outbox or self.state is LinkState.CLOSING):
            self._flush()

    def _wake(self) -> None:
        if self._writer is None and self.state is not LinkState.ENDED and not self._reading:
            self._writer = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what the loop iteration queued in one go; a task only to wait for room or close."""
        self._writer = None
        if self.state is LinkState.ENDED:
            return
        if self._outbox and self.session.log.backlog and self.keepalive.outstanding is None:
            # The log keeps every frame until a pong acknowledges it: ask early, in this
            # write, rather than hold a busy session's frames until the next timed ping.
            metrics.PINGS_SENT.inc()
            self.ping(time.monotonic())
        if self._outbox and self.write_now is not None:
            try:
                if self.write_now(self._outbox):
                    self._outbox = None
                    self.profile.record("write_wait", time.monotonic() - self._queued)
            except OSError:
                self.state = LinkState.ENDED  # the peer is gone; the reading side notices and cleans up
                return
        if self._outbox or self.state is LinkState.CLOSING:
            self._writer = self.loop.create_task(self._write())

    async def _write(self) -> None:
        try:
            while self._outbox:
                batch, self._outbox, queued = self._outbox, None, self._queued
                if self.send_many is not None:
                    await self.send_many({"type": SEND_MANY, "texts": batch})
                else:
                    for data in batch:
                        await self.ws.send({"type": "websocket.send", "text": data.decode()})
                self.profile.record("write_wait", time.monotonic() - queued)  # waited for room too
            if self.state is LinkState.CLOSING:
                code, reason = self._close
                metrics.WS_CLOSED.labels(str(code)).inc()
                await self.ws.send({"type": "websocket.close", "code": code, "reason": reason})
                self.state = LinkState.ENDED
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.state = LinkState.ENDED  # the peer is gone; the reading side notices and cleans up
        finally:
            self._writer = None


async def websocket_endpoint(ws: WebSocket, send: Send | None = None) -> None:
    """Serve one `/ws` connection. *send* is the raw ASGI send: when the server offers the
    `vlbridge.frames` extension (server.ws.transport), ready frames go out in one write and
    frames come in without a queue.

    The session is opened (or resumed) before the handshake completes, because the handshake
    response names it in `X-Vlbridge-Session`: the session, its running answers and its
    replay log live in this process only, and a load balancer in front of several instances
    learns the owner from that header and sends the session's ``?resume=`` here
    (docker/haproxy.cfg, docs/scaling.md)."""
    send_many = send if send is not None and FRAMES in ws.scope.get("extensions", {}) else None
    hub: Hub = ws.app.state.hub
    server = hub.config
    owner = hub.auth.admit(ws.headers, ws.query_params)
    if owner is Refusal.UNAUTHORIZED:
        await _deny(ws, 403, owner.value, "a valid token is required (Authorization: Bearer or ?token=)")
        return
    if owner is Refusal.FORBIDDEN_ORIGIN:
        origin = ws.headers.get("origin", "")
        log.warning("WebSocket handshake from origin %r refused (not allowed, no token)", origin[:200])
        await _deny(
            ws, 403, owner.value, f"origin {origin[:200]!r} is not allowed; see server.allowed_origins"
        )
        return
    resume_id = ws.query_params.get(QUERY_RESUME)
    try:
        last_seq = int(ws.query_params.get(QUERY_LAST_SEQ, "0"))
    except ValueError:
        await _deny(ws, 400, "bad_request", "last_seq must be an integer")
        return
    if not hub.accepting:
        await _refuse(ws, CloseCode.RESTART, "server shutting down")
        return
    session, hello = _open_session(hub, owner, resume_id, last_seq)
    if session is None:
        log.warning("refusing a WebSocket session: %d sessions is the limit", server.max_sessions)
        await _refuse(ws, CloseCode.FULL, f"server full ({server.max_sessions} sessions); retry later")
        return
    try:
        await ws.accept(headers=[(SESSION_HEADER, session.id.encode())])
    except BaseException:  # the client left during the handshake (or the server is stopping)
        _unserved(hub, session, hello["resumed"])
        raise
    if hub.state is not HubState.OPEN:  # a drain began while the handshake was sent
        _unserved(hub, session, False)
        await _refuse(ws, CloseCode.RESTART, "server shutting down")
        return
    now = time.monotonic()
    conn = SocketLink(
        ws,
        send_many,
        session,
        hub.pings.keepalive(now),
        FloodGate(server.max_frames_per_second, 2 * server.max_frames_per_second, now),
        hub.profile,
    )
    previous, session.link = session.link, conn
    if previous is not None:
        previous.close(CloseCode.TAKEN_OVER, "session resumed on another connection")
    hub.attach()
    metrics.WS_OPENED.inc()
    replay, lost = session.log.since(last_seq) if hello["resumed"] else ([], 0)
    conn.send(encode({**hello, "replayed": len(replay), "lost": lost}))
    for data in replay:
        conn.send(data)
    hub.pings.watch(conn)
    code: int = CloseCode.ABNORMAL
    try:
        code = await _serve(hub, conn)
    finally:
        conn.ended()
        hub.detach()
        if session.link is conn:  # not taken over by a resume
            if code in CLOSE_NORMAL or code in CLOSE_ABUSE or conn.abusive or not hub.accepting:
                hub.sessions.discard(session)
            else:
                hub.sessions.park(session, time.monotonic())
        log.debug("session %s: connection ended (%d)", session.tag, code)


def _open_session(
    hub: Hub, owner: bytes, resume_id: str | None, last_seq: int
) -> tuple[Session | None, dict[str, Any]]:
    server = hub.config
    session = None
    if resume_id:
        session = hub.sessions.resume(resume_id, owner)
        metrics.WS_RESUMED.labels("ok" if session else "unknown").inc()
        if session is None:
            log.info("resume of %s refused: unknown, expired or another token's", short_id(resume_id))
    resumed = session is not None
    if session is None:
        session = hub.sessions.open(owner)
    stats = hub.answers.stats()
    hello: dict[str, Any] = {
        "type": "hello",
        "seq": 0,
        "protocol": PROTOCOL_VERSION,
        "session": session.id if session else None,
        "resumed": resumed,
        "last_seq": session.log.seq if session else 0,
        "ping_interval": server.ping_interval,
        "ping_timeout": server.ping_timeout,
        "model": stats.model,
        "model_state": stats.state.value,  # loading, ready, failed or stopped
        "limits": {
            "max_images": server.max_images,
            "max_image_bytes": server.max_image_bytes,
            "max_frame_bytes": server.max_frame_bytes,
            "max_frames_per_second": server.max_frames_per_second,
            "max_asks": server.max_asks_per_session,
            "resume_ttl": server.resume_ttl,
        },
    }
    if stats.state is not ExecutorState.READY:
        hello["model_progress"] = round(stats.load_progress, 2)
        hello["model_detail"] = stats.detail
    if resume_id and not resumed:
        hello["resume_error"] = "unknown or expired session"
    if resumed and session is not None:
        log.info("session %s: resumed after seq %d (now %d)", session.tag, last_seq, session.log.seq)
    return session, hello


async def _refuse(ws: WebSocket, code: CloseCode, reason: str) -> None:
    """Close a connection that gets no session (accepted first: the client reads a close code
    and reason, as protocol v1 says for 1012 and 1013)."""
    metrics.WS_CLOSED.labels(str(code)).inc()
    if ws.application_state is WebSocketState.CONNECTING:
        await ws.accept()
    await ws.close(code, reason)


def _unserved(hub: Hub, session: Session, keep: bool) -> None:
    """*session* was opened or resumed for a connection that never served it: park it when
    *keep* (a resumed one, which its client may resume again) unless a connection still has
    it, else forget it."""
    if session.link is not None:  # resumed while an earlier connection still serves it
        return
    if keep and hub.accepting:
        hub.sessions.park(session, time.monotonic())
    else:
        hub.sessions.discard(session)


async def _deny(ws: WebSocket, status: int, code: str, message: str) -> None:
    metrics.count("ws", code)
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse({"error": {"code": code, "message": message}}, status))
    else:
        await ws.close(_DENIAL_CLOSE.get(code, CloseCode.BAD_REQUEST), message)


async def _serve(hub: Hub, conn: SocketLink) -> int:
    """Read frames until the connection ends; return its close code.

    With vlbridge's transport, text frames are handed to `_on_text` straight from the
    socket's read callback (no queue, no task switch per frame); what reaches this loop is
    the rest, in order: the disconnect, binary frames, and, under another ASGI server, all.
    """
    read_seconds: Callable[[], float] | None = None
    if conn.send_many is not None:  # vlbridge's transport
        frames = conn.ws.scope["extensions"][FRAMES]
        read_seconds = frames["read_seconds"]
        frames["listen"](lambda text: _on_text(hub, conn, text, read_seconds))
    while True:
        message = await conn.ws.receive()
        if message["type"] == "websocket.disconnect":
            return int(message.get("code") or CloseCode.NO_STATUS)
        _handle(hub, conn, message.get("text"), read_seconds)


def _on_text(hub: Hub, conn: SocketLink, text: str, read_seconds: Callable[[], float] | None = None) -> None:
    """Handle one text frame now, in the socket's read callback."""
    conn.reading()
    try:
        _handle(hub, conn, text, read_seconds)
    finally:
        conn.received()


def _handle(hub: Hub, conn: SocketLink, text: str | None, read_seconds: Callable[[], float] | None) -> None:
    now = _admit(hub, conn, text)
    if now is None or text is None:
        return
    try:
        frame = parse_client_frame(text, hub.frame_limits)
    except InvalidFrame as exc:
        _reject(conn.session, exc)
        return
    if len(text) > PROFILED_FRAME:
        if read_seconds is not None:
            conn.profile.record("frame_read", read_seconds())
        conn.profile.record("frame_parse", time.monotonic() - now)
    _dispatch(hub, conn, frame, now)


def _admit(hub: Hub, conn: SocketLink, text: str | None) -> float | None:
    """The checks every frame passes before it is parsed; the time, or None when refused."""
    if not conn.open:
        return None  # closing: ignore what is still in flight
    server = hub.config
    session = conn.session
    now = time.monotonic()
    conn.keepalive.received(now)
    if not conn.gate.allow(now):
        log.warning("session %s: more than %.0f frames/s; closing", session.tag, server.max_frames_per_second)
        conn.close(CloseCode.POLICY, f"more than {server.max_frames_per_second:g} frames a second")
        return None
    if text is None:
        _reject(
            session, InvalidFrame("bad_request", "binary frames are not part of protocol v1; send JSON text")
        )
        return None
    if len(text) > server.max_frame_bytes:
        log.warning("session %s: a %d-byte frame; closing", session.tag, len(text))
        conn.close(CloseCode.TOO_BIG, f"frames are limited to {server.max_frame_bytes} bytes")
        return None
    return now


def _reject(session: Session, exc: InvalidFrame) -> None:
    log.info("session %s: %s frame refused: %s", session.tag, exc.code, exc.message)
    metrics.count("ws", exc.code)
    extra: dict[str, Any] = {"id": exc.ask_id} if exc.ask_id else {}
    session.emit(error_dict(exc.code, exc.message, None, **extra))


def _dispatch(hub: Hub, conn: SocketLink, frame: ClientFrame, now: float) -> None:
    session = conn.session
    if isinstance(frame, Ask):
        _ask(hub, session, frame)
    elif isinstance(frame, Pong):
        answered = conn.keepalive.pong(frame.ts, now)
        if answered is not None:
            rtt, ping_seq = answered
            metrics.PING_RTT.observe(rtt)
            session.log.ack(ping_seq)  # the client has read everything up to that ping
    elif isinstance(frame, Ping):
        pong: dict[str, Any] = {"type": "pong", "server_ts": int(time.time() * 1000)}
        if frame.ts is not None:
            pong["ts"] = frame.ts
        session.emit(pong)
    elif isinstance(frame, Cancel):
        active = (session.asks or {}).get(frame.id)
        if active is None:
            _reject(
                session, InvalidFrame("bad_request", f"no running question has id {frame.id!r}", frame.id)
            )
        else:
            log.info("session %s: ask %s cancelled by the client", session.tag, frame.id)
            active.cancel()
    else:
        assert isinstance(frame, Reset)
        session.history.reset()
        session.emit({"type": "reset"})


def _ask(hub: Hub, session: Session, ask: Ask) -> None:
    server = hub.config
    asks = session.asks
    if asks and ask.id in asks:
        _reject(
            session, InvalidFrame("bad_request", f"a question with id {ask.id!r} is still running", ask.id)
        )
        return
    if asks and len(asks) >= server.max_asks_per_session:
        metrics.count("ws", "busy")
        message = f"{len(asks)} questions of this session are still running; wait for one to finish"
        session.emit(error_dict("busy", message, 1.0, id=ask.id))
        return
    question = ask.question
    try:  # headers only: garbage is refused now and takes no queue place
        for number, data in enumerate(question.images, start=1):
            sniff_image(data, number, server.max_image_bytes, hub.image_limits)
    except PictureRejected as exc:
        _reject(session, InvalidFrame(exc.code, exc.message, ask.id))
        return
    # The request id is a label for log lines (the executor keys nothing on it): no whole session id.
    request = InferenceRequest(
        f"{session.tag}/{ask.id}", session.history.messages(question), ask.params, client=session.id
    )
    relay = _Relay(hub, session, ask.id, question, hub.answers.submit(request, "ws"))
    if asks is None:
        asks = session.asks = {}
    asks[ask.id] = relay
    log.info(
        "session %s: ask %s (%d pictures, %d turns of context)",
        session.tag,
        ask.id,
        len(question.images),
        len(session.history),
    )
    relay.answer.listen(relay.on_events)


class _Relay:
    """One running ask of a session: turns its answer's events into session frames (sent
    now, or kept for resume). A listener, not a task: events arrive in batches as
    callbacks on the event loop, and each becomes one frame (the executor joins the
    deltas that pile up while the loop is busy)."""

    __slots__ = ("answer", "generation", "hub", "id", "question", "session")

    def __init__(self, hub: Hub, session: Session, ask_id: str, question: Turn, answer: Answer) -> None:
        self.hub = hub
        self.session = session
        self.id = ask_id
        self.question = question
        self.generation = session.history.generation  # a reset since then keeps it out
        self.answer = answer

    def cancel(self) -> None:
        self.answer.cancel()

    def on_events(self, events: Events) -> None:
        session = self.session
        try:
            for event in events:
                if isinstance(event, Done):
                    session.history.add(self.question, event.text, self.generation)
                session.emit(event_dict(self.id, event))
        except Exception:
            session.emit(error_dict("internal", "the answer could not be relayed", id=self.id))
            self.end()
            raise  # Answer.listen logs it, cancels the answer and ignores its later events
        if isinstance(events[-1], FINAL):
            self.end()

    def end(self) -> None:
        if self.session.asks is not None:
            self.session.asks.pop(self.id, None)
        self.hub.session_idle(self.session)
