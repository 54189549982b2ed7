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
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from server import metrics
from server.auth import Refusal
from server.backend import image_limits
from server.errors import RequestError
from server.inference.api import FINAL, Done, Events, InferenceRequest, Turn
from server.inference.images import sniff_image
from server.logs import short_id
from server.service import Answer, Service
from server.wire import error_dict, event_dict
from server.ws.frames import (
    PROTOCOL_VERSION,
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
from server.ws.protocol import FloodGate, Keepalive
from server.ws.sessions import Session
from server.ws.transport import FRAMES, SEND_MANY

log = logging.getLogger("vlbridge.ws")

CLOSE_NORMAL = (1000, 1001)  # the client ended the session on purpose: nothing to resume
CLOSE_POLICY = 1008  # flood
CLOSE_TOO_BIG = 1009
CLOSE_ABUSE = (CLOSE_POLICY, CLOSE_TOO_BIG)  # also when the server's own frame limit closed it
CLOSE_FULL = 1013  # max_sessions reached: try again later
CLOSE_SLOW = 4408  # the client does not read its frames
CLOSE_TAKEN_OVER = 4409  # the session was resumed on another connection
_DENIAL_CLOSE = {"unauthorized": 4401, "forbidden": 4403}  # where HTTP 403 cannot be sent
PARSE_IN_THREAD = 256 * 1024  # frames this large are parsed (base64 pictures) off the event loop


class Connection:
    """One accepted WebSocket bound to one session; sends in order through a lazy writer."""

    __slots__ = (
        "_closing",
        "_ended",
        "_outbox",
        "_reading",
        "_writer",
        "abusive",
        "gate",
        "keepalive",
        "label",
        "loop",
        "send_many",
        "session",
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
    ) -> None:
        self.ws = ws
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
        self.abusive = False
        self._outbox: list[bytes] | None = None
        self._writer: asyncio.Task[None] | asyncio.Handle | None = None  # writing, or about to
        self._closing: tuple[int, str] | None = None
        self._ended = False
        self._reading = False  # in the read callback: `received` writes what it queued

    @property
    def open(self) -> bool:
        return self._closing is None and not self._ended

    def send(self, data: bytes) -> None:
        if self._closing is not None or self._ended:
            return
        outbox = self._outbox
        if outbox is None:
            self._outbox = [data]
            self._wake()
            return
        outbox.append(data)
        if len(outbox) > self.session.log.limit:
            self.close(CLOSE_SLOW, "the client is not reading its frames")

    def close(self, code: int, reason: str) -> None:
        """Close after the frames already queued; idempotent."""
        if not self.open:
            return
        self._closing = (code, reason)
        self._wake()

    def ping(self, now: float) -> bool:
        ts = int(time.time() * 1000)
        self.session.emit({"type": "ping", "ts": ts})
        return self.keepalive.ping_sent(ts, self.session.log.seq, now)

    def ended(self) -> None:
        self._ended = True
        self._outbox = None

    def reading(self) -> None:
        """A frame is being handled in the socket's read callback: hold what it sends for
        `received`, which writes it at once (no scheduled write, no loop hop)."""
        self._reading = True

    def received(self) -> None:
        self._reading = False
        if self._writer is None and (self._outbox or self._closing is not None):
            self._flush()

    def _wake(self) -> None:
        if self._writer is None and not self._ended and not self._reading:
            self._writer = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what the loop iteration queued in one go; a task only to wait for room or close."""
        self._writer = None
        if self._ended:
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
            except OSError:
                self._ended = True  # the peer is gone; the reading side notices and cleans up
                return
        if self._outbox or self._closing is not None:
            self._writer = self.loop.create_task(self._write())

    async def _write(self) -> None:
        try:
            while self._outbox:
                batch, self._outbox = self._outbox, None
                if self.send_many is not None:
                    await self.send_many({"type": SEND_MANY, "texts": batch})
                else:
                    for data in batch:
                        await self.ws.send({"type": "websocket.send", "text": data.decode()})
            if self._closing is not None and not self._ended:
                code, reason = self._closing
                metrics.WS_CLOSED.labels(str(code)).inc()
                await self.ws.send({"type": "websocket.close", "code": code, "reason": reason})
                self._ended = True
        except (WebSocketDisconnect, RuntimeError, OSError):
            self._ended = True  # the peer is gone; the reading side notices and cleans up
        finally:
            self._writer = None


async def websocket_endpoint(ws: WebSocket, send: Send | None = None) -> None:
    """Serve one `/ws` connection. *send* is the raw ASGI send: when the server offers the
    `vlbridge.frames` extension (server.ws.transport), ready frames go out in one write and
    frames come in without a queue."""
    send_many = send if send is not None and FRAMES in ws.scope.get("extensions", {}) else None
    service: Service = ws.app.state.service
    server = service.config.server
    owner = service.auth.admit(ws.headers, ws.query_params)
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
    resume_id = ws.query_params.get("resume")
    try:
        last_seq = int(ws.query_params.get("last_seq", "0"))
    except ValueError:
        await _deny(ws, 400, "bad_request", "last_seq must be an integer")
        return
    await ws.accept()
    if not service.accepting:
        metrics.WS_CLOSED.labels("1012").inc()
        await ws.close(1012, "server shutting down")
        return
    session, hello = _open_session(service, owner, resume_id, last_seq)
    if session is None:
        log.warning("refusing a WebSocket session: %d sessions is the limit", server.max_sessions)
        metrics.WS_CLOSED.labels(str(CLOSE_FULL)).inc()
        await ws.close(CLOSE_FULL, f"server full ({server.max_sessions} sessions); retry later")
        return
    now = time.monotonic()
    conn = Connection(
        ws,
        send_many,
        session,
        service.pings.keepalive(now),
        FloodGate(server.max_frames_per_second, 2 * server.max_frames_per_second, now),
    )
    previous, session.link = session.link, conn
    if previous is not None:
        previous.close(CLOSE_TAKEN_OVER, "session resumed on another connection")
    service.connected += 1
    metrics.WS_OPENED.inc()
    replay, lost = session.log.since(last_seq) if hello["resumed"] else ([], 0)
    conn.send(encode({**hello, "replayed": len(replay), "lost": lost}))
    for data in replay:
        conn.send(data)
    service.pings.watch(conn)
    code = 1006
    try:
        code = await _serve(service, conn)
    finally:
        conn.ended()
        service.connected -= 1
        if session.link is conn:  # not taken over by a resume
            if code in CLOSE_NORMAL or code in CLOSE_ABUSE or conn.abusive or not service.accepting:
                service.sessions.discard(session)
            else:
                service.sessions.park(session, time.monotonic())
        log.debug("session %s: connection ended (%d)", session.tag, code)


def _open_session(
    service: Service, owner: bytes, resume_id: str | None, last_seq: int
) -> tuple[Session | None, dict[str, Any]]:
    server = service.config.server
    session = None
    if resume_id:
        session = service.sessions.resume(resume_id, owner)
        metrics.WS_RESUMED.labels("ok" if session else "unknown").inc()
        if session is None:
            log.info("resume of %s refused: unknown, expired or another token's", short_id(resume_id))
    resumed = session is not None
    if session is None:
        session = service.sessions.open(owner)
    hello: dict[str, Any] = {
        "type": "hello",
        "seq": 0,
        "protocol": PROTOCOL_VERSION,
        "session": session.id if session else None,
        "resumed": resumed,
        "last_seq": session.log.seq if session else 0,
        "ping_interval": server.ping_interval,
        "ping_timeout": server.ping_timeout,
        "model": service.executor.stats().model,
        "limits": {
            "max_images": server.max_images,
            "max_image_bytes": server.max_image_bytes,
            "max_frame_bytes": server.max_frame_bytes,
            "max_frames_per_second": server.max_frames_per_second,
            "max_asks": server.max_asks_per_session,
            "resume_ttl": server.resume_ttl,
        },
    }
    if resume_id and not resumed:
        hello["resume_error"] = "unknown or expired session"
    if resumed and session is not None:
        log.info("session %s: resumed after seq %d (now %d)", session.tag, last_seq, session.log.seq)
    return session, hello


async def _deny(ws: WebSocket, status: int, code: str, message: str) -> None:
    metrics.ERRORS.inc("ws", code)
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse({"error": {"code": code, "message": message}}, status))
    else:
        await ws.close(_DENIAL_CLOSE.get(code, 4400), message)


async def _serve(service: Service, conn: Connection) -> int:
    """Read frames until the connection ends; return its close code.

    With vlbridge's transport, text frames of ordinary size are handed to `_on_text`
    straight from the socket's read callback (no queue, no task switch per frame); what
    reaches this loop is the rest, in order: the disconnect, binary frames, and frames
    large enough to be parsed on a thread (the fast path stays off until they are done).
    """
    if conn.send_many is not None:  # vlbridge's transport
        conn.ws.scope["extensions"][FRAMES]["listen"](lambda text: _on_text(service, conn, text))
    while True:
        message = await conn.ws.receive()
        if message["type"] == "websocket.disconnect":
            return int(message.get("code") or 1005)
        text = message.get("text")
        now = _admit(service, conn, text)
        if now is None or text is None:
            continue
        try:
            if len(text) > PARSE_IN_THREAD:
                frame = await asyncio.to_thread(parse_client_frame, text, service.frame_limits)
            else:
                frame = parse_client_frame(text, service.frame_limits)
        except InvalidFrame as exc:
            _reject(conn.session, exc)
            continue
        _dispatch(service, conn, frame, now)


def _on_text(service: Service, conn: Connection, text: str) -> bool:
    """Handle one text frame now; False leaves a large one to `_serve` (parsed on a thread)."""
    if len(text) > PARSE_IN_THREAD:
        return False
    conn.reading()
    try:
        now = _admit(service, conn, text)
        if now is not None:
            try:
                frame = parse_client_frame(text, service.frame_limits)
            except InvalidFrame as exc:
                _reject(conn.session, exc)
            else:
                _dispatch(service, conn, frame, now)
    finally:
        conn.received()
    return True


def _admit(service: Service, conn: Connection, text: str | None) -> float | None:
    """The checks every frame passes before it is parsed; the time, or None when refused."""
    if not conn.open:
        return None  # closing: ignore what is still in flight
    server = service.config.server
    session = conn.session
    now = time.monotonic()
    conn.keepalive.received(now)
    if not conn.gate.allow(now):
        log.warning("session %s: more than %.0f frames/s; closing", session.tag, server.max_frames_per_second)
        conn.abusive = True
        conn.close(CLOSE_POLICY, f"more than {server.max_frames_per_second:g} frames a second")
        return None
    if text is None:
        _reject(
            session, InvalidFrame("bad_request", "binary frames are not part of protocol v1; send JSON text")
        )
        return None
    if len(text) > server.max_frame_bytes:
        log.warning("session %s: a %d-byte frame; closing", session.tag, len(text))
        conn.abusive = True
        conn.close(CLOSE_TOO_BIG, f"frames are limited to {server.max_frame_bytes} bytes")
        return None
    return now


def _reject(session: Session, exc: InvalidFrame) -> None:
    log.info("session %s: %s frame refused: %s", session.tag, exc.code, exc.message)
    metrics.ERRORS.inc("ws", exc.code)
    extra: dict[str, Any] = {"id": exc.ask_id} if exc.ask_id else {}
    session.emit(error_dict(exc.code, exc.message, None, **extra))


def _dispatch(service: Service, conn: Connection, frame: ClientFrame, now: float) -> None:
    session = conn.session
    if isinstance(frame, Ask):
        _ask(service, session, frame)
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
        session.conversation.reset()
        session.emit({"type": "reset"})


def _ask(service: Service, session: Session, ask: Ask) -> None:
    server = service.config.server
    asks = session.asks
    if not service.accepting:
        session.emit(
            error_dict("unavailable", "the service is shutting down; ask again shortly", 5.0, id=ask.id)
        )
        return
    if asks and ask.id in asks:
        _reject(
            session, InvalidFrame("bad_request", f"a question with id {ask.id!r} is still running", ask.id)
        )
        return
    if asks and len(asks) >= server.max_asks_per_session:
        metrics.ERRORS.inc("ws", "busy")
        message = f"{len(asks)} questions of this session are still running; wait for one to finish"
        session.emit(error_dict("busy", message, 1.0, id=ask.id))
        return
    question = ask.question
    try:  # headers only: garbage is refused now and takes no queue place
        limits = image_limits(service.config) if question.images else None
        for number, data in enumerate(question.images, start=1):
            sniff_image(data, number, server.max_image_bytes, limits)
    except RequestError as exc:
        _reject(session, InvalidFrame(exc.code, exc.message, ask.id))
        return
    # The request id is a label for log lines (the executor keys nothing on it): no whole session id.
    request = InferenceRequest(
        f"{session.tag}/{ask.id}", session.conversation.messages(question), ask.params, client=session.id
    )
    relay = _Relay(service, session, ask.id, question, service.answer(request, "ws"))
    if asks is None:
        asks = session.asks = {}
    asks[ask.id] = relay
    log.info(
        "session %s: ask %s (%d pictures, %d turns of context)",
        session.tag,
        ask.id,
        len(question.images),
        len(session.conversation),
    )
    relay.answer.listen(relay.on_events)


class _Relay:
    """One running ask of a session: turns its answer's events into session frames (sent
    now, or kept for resume). A listener, not a task: events arrive in batches as
    callbacks on the event loop, and each becomes one frame (the executor joins the
    deltas that pile up while the loop is busy)."""

    __slots__ = ("answer", "generation", "id", "question", "service", "session")

    def __init__(
        self, service: Service, session: Session, ask_id: str, question: Turn, answer: Answer
    ) -> None:
        self.service = service
        self.session = session
        self.id = ask_id
        self.question = question
        self.generation = session.conversation.generation  # a reset since then keeps it out
        self.answer = answer

    def cancel(self) -> None:
        self.answer.cancel()

    def on_events(self, events: Events) -> None:
        session = self.session
        try:
            for event in events:
                if isinstance(event, Done):
                    session.conversation.add(self.question, event.text, self.generation)
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
        self.service.session_idle(self.session)
