"""The long connection: discovery endpoint plus the WebSocket speaking ``pbbp2.Frame``.

Everything here runs on the server's event loop and is owned by ``LongConn``; the facade reaches it
from other threads only through ``ServerThread.call``. What it does, as the platform does it:

- ``POST /callback/ws/endpoint`` checks ``AppID``/``AppSecret`` and answers the socket URL (with
  ``device_id``, ``service_id`` and a ticket) and the ``ClientConfig``; errors come with HTTP 200 and
  a code (see ``codes`` for which codes the SDK retries);
- pings are answered with pongs, optionally carrying the current ``ClientConfig``;
- each pushed event goes to ONE randomly chosen open connection; with none open it waits for the
  next connection; it may be split over several frames, delivered several times, and delivered again
  while unacknowledged (the platform's retry schedule, compressed);
- cluster mode: with several clients of one app connected (several bridge instances), every
  delivery of an event, each copy and each retry, picks its connection anew at random, so a
  retry of an event a stalled client never acknowledged may reach another client;
- every acknowledgement is recorded with its code and its latency from the first frame written.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.responses import Response
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket

from . import codes, frames
from .codes import ApiError
from .faults import Route
from .frames import ClientConfig, FrameMethod, FrameType
from .records import Ack, ConnectionRecord, Delivery
from .routing import ApiRequest, Endpoints, json_response, require

log = logging.getLogger("fakefeishu.longconn")

WS_PATH = "/ws/v2"


@dataclass
class Push:
    """One event to deliver; ``retry_unacked_after_s`` re-sends it until a code-200 ack arrives."""

    event_id: str
    payload: bytes
    parts: int = 1
    copies: int = 1
    retry_unacked_after_s: float | None = None
    max_retries: int = 4
    attempts: int = 0
    retries: int = 0
    acked: bool = False


@dataclass
class _InFlight:
    push: Push
    attempt: int
    queued_at: float
    sent_at: float | None = None


@dataclass(frozen=True)
class _Outgoing:
    frames: list[bytes]
    on_sent: Callable[[float], None] | None = None


@dataclass(frozen=True)
class _Close:
    code: int


@dataclass(frozen=True)
class _Grant:
    device_id: str
    service_id: int


@dataclass
class _Session:
    conn_id: str
    grant: _Grant
    ws: WebSocket
    outbox: asyncio.Queue[_Outgoing | _Close] = field(default_factory=asyncio.Queue)
    in_flight: dict[str, _InFlight] = field(default_factory=dict)
    seq_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    closing: bool = False


class LongConn:
    """Owner of discovery tickets, open sessions, pending pushes and retry timers."""

    def __init__(self, endpoints: Endpoints, config: ClientConfig, *, seed: int | None = None) -> None:
        self.ep = endpoints
        self.records = endpoints.records
        self.config = config
        self.answer_pings = True
        self.pong_carries_config = True
        self._rng = random.Random(seed)
        self._tickets: dict[str, _Grant] = {}
        self._sessions: dict[str, _Session] = {}
        self._pending: list[Push] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._conn_ids = itertools.count(1)

    def routes(self) -> list[BaseRoute]:
        return [
            self.ep.route("POST", "/callback/ws/endpoint", Route.WS_ENDPOINT, self.discovery, auth=False),
            WebSocketRoute(WS_PATH, self.websocket),
        ]

    # -- discovery --------------------------------------------------------------------------------

    def discovery(self, req: ApiRequest) -> Response:
        app_id, app_secret = require(req.body, "AppID"), req.body.get("AppSecret", "")
        if app_id != self.ep.state.app_id or app_secret != self.ep.state.app_secret:
            # HTTP 200 with a code the SDK does not retry, as for any credential problem.
            raise ApiError(codes.APP_SECRET_INVALID, "app id or secret invalid", status=200)
        grant = _Grant(device_id=str(self._rng.getrandbits(60)), service_id=self._rng.randrange(1, 2**31))
        ticket = secrets.token_hex(16)
        self._tickets[ticket] = grant
        url = (
            f"ws://{req.host}{WS_PATH}?fpid=493&aid=552564&device_id={grant.device_id}"
            f"&access_key={secrets.token_hex(8)}&service_id={grant.service_id}&ticket={ticket}"
        )
        return json_response(
            {"code": 0, "msg": "ok", "data": {"URL": url, "ClientConfig": self.config.to_wire()}}
        )

    # -- the socket -------------------------------------------------------------------------------

    async def websocket(self, ws: WebSocket) -> None:
        grant = self._tickets.get(ws.query_params.get("ticket", ""))
        if grant is None or ws.query_params.get("device_id") != grant.device_id:
            log.warning("refusing socket with unknown ticket: %s", ws.url.query)
            await ws.close(code=1008)  # before accept: the handshake is refused with HTTP 403
            return
        await ws.accept()
        session = _Session(conn_id=f"conn-{next(self._conn_ids)}", grant=grant, ws=ws)
        with self.records.mutate() as t:
            t.connections[session.conn_id] = ConnectionRecord(
                conn_id=session.conn_id, device_id=grant.device_id
            )
        self._sessions[session.conn_id] = session
        log.info("connection %s opened", session.conn_id)
        sender = asyncio.create_task(self._send_loop(session), name=f"fakefeishu-send-{session.conn_id}")
        self._flush_pending()
        close_code: int | None = None
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    close_code = message.get("code")
                    break
                data = message.get("bytes")
                if data is None:
                    log.warning("%s sent a text message; the protocol is binary frames only", session.conn_id)
                    continue
                self._on_frame(session, data)
        finally:
            self._sessions.pop(session.conn_id, None)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            with self.records.mutate() as t:
                record = t.connections[session.conn_id]
                record.closed_at, record.close_code = time.monotonic(), close_code
            log.info("connection %s closed (code %s)", session.conn_id, close_code)

    async def _send_loop(self, session: _Session) -> None:
        try:
            while True:
                item = await session.outbox.get()
                if isinstance(item, _Close):
                    await session.ws.close(code=item.code)
                    return
                started = time.monotonic()
                for frame in item.frames:
                    await session.ws.send_bytes(frame)
                if item.on_sent is not None:
                    item.on_sent(started)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sending on %s failed", session.conn_id)

    def _on_frame(self, session: _Session, data: bytes) -> None:
        try:
            frame = frames.parse_frame(data)
        except ValueError:
            log.exception("undecodable frame on %s", session.conn_id)
            return
        if frame.method is FrameMethod.CONTROL:
            if frame.type == FrameType.PING:
                self._on_ping(session, frame)
            else:
                log.warning("unexpected control frame %r on %s", frame.type, session.conn_id)
            return
        self._on_ack(session, frame)

    def _on_ping(self, session: _Session, frame: frames.InboundFrame) -> None:
        now = time.monotonic()
        with self.records.mutate() as t:
            record = t.connections[session.conn_id]
            record.pings += 1
            record.last_ping_at = now
        if self.answer_pings and not session.closing:
            config = self.config if self.pong_carries_config else None
            session.outbox.put_nowait(_Outgoing([frames.pong_frame(frame.service, config)]))

    def _on_ack(self, session: _Session, frame: frames.InboundFrame) -> None:
        now = time.monotonic()
        in_flight = session.in_flight.pop(frame.message_id, None)
        if in_flight is None:
            log.warning("ack for unknown frame message_id %r on %s", frame.message_id, session.conn_id)
            return
        try:
            code = frame.ack_code()
        except ValueError:
            log.exception("malformed ack on %s", session.conn_id)
            code = -1
        latency = now - (in_flight.sent_at if in_flight.sent_at is not None else in_flight.queued_at)
        ack = Ack(
            event_id=in_flight.push.event_id,
            frame_message_id=frame.message_id,
            conn_id=session.conn_id,
            code=code,
            biz_rt_ms=frame.biz_rt_ms(),
            latency_s=latency,
            at=now,
            data=frame.ack_data(),
        )
        with self.records.mutate() as t:
            t.acks.append(ack)
        if code == 200:
            in_flight.push.acked = True

    # -- pushing (server loop only) ---------------------------------------------------------------

    def push(self, push: Push) -> None:
        for _ in range(push.copies):
            self._deliver(push)
        self._arm_retry(push)

    def _deliver(self, push: Push) -> None:
        sessions = [s for s in self._sessions.values() if not s.closing]
        if not sessions:
            self._pending.append(push)
            return
        session = self._rng.choice(sessions)
        push.attempts += 1
        frame_message_id = secrets.token_hex(16)
        payload_frames = frames.event_frames(
            push.payload,
            service=session.grant.service_id,
            message_id=frame_message_id,
            trace_id=secrets.token_hex(8),
            seq_id=next(session.seq_ids),
            log_id=self._rng.getrandbits(62),
            parts=push.parts,
        )
        in_flight = _InFlight(push=push, attempt=push.attempts, queued_at=time.monotonic())
        session.in_flight[frame_message_id] = in_flight

        def on_sent(at: float) -> None:
            in_flight.sent_at = at
            with self.records.mutate() as t:
                t.deliveries.append(
                    Delivery(
                        event_id=push.event_id,
                        frame_message_id=frame_message_id,
                        conn_id=session.conn_id,
                        attempt=in_flight.attempt,
                        parts=push.parts,
                        sent_at=at,
                    )
                )

        session.outbox.put_nowait(_Outgoing(payload_frames, on_sent))

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        for push in pending:
            self._deliver(push)

    def _arm_retry(self, push: Push) -> None:
        if push.retry_unacked_after_s is None or push.retries >= push.max_retries:
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            if push.acked:
                return
            push.retries += 1
            log.info(
                "event %s unacknowledged after %ss: delivering again",
                push.event_id,
                push.retry_unacked_after_s,
            )
            self._deliver(push)
            self._arm_retry(push)

        handle = loop.call_later(push.retry_unacked_after_s, fire)
        self._timers.add(handle)

    def drop(self, code: int = 1001) -> int:
        """Close every open connection with ``code``; returns how many were closed."""
        sessions = [s for s in self._sessions.values() if not s.closing]
        for session in sessions:
            session.closing = True
            session.outbox.put_nowait(_Close(code))
        return len(sessions)

    async def shutdown(self, timeout: float = 2.0) -> None:
        """Cancel retries, close every connection and wait (bounded) until they are gone."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        self._pending.clear()
        self.drop(1001)
        deadline = time.monotonic() + timeout
        while self._sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
