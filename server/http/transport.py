"""uvicorn's httptools HTTP protocol, with deadlines for reading a request.

uvicorn closes an idle keep-alive connection, but a client that has begun a request is
waited for forever: a request line sent one byte a minute, or a body that stops halfway,
holds a connection (and the memory of its half-read request) for as long as the client
likes. Many of them starve everyone else. `HttpProtocol` adds two deadlines, in the
manner of Apache's mod_reqtimeout:

- headers: the request line and headers must be complete within `header_timeout`
  seconds of the connection opening, or of the request's first byte on a kept-alive
  connection (between requests uvicorn's `timeout_keep_alive` applies);
- body: the body must be complete within `body_timeout` seconds of the headers, plus one
  second for every `body_min_rate` bytes received: a large upload at a fair pace always
  finishes, a trickle does not. A deadline that passes while the app is not reading
  (uvicorn paused the socket) is not held against the client: it moves to
  `body_timeout` after that moment.

When a deadline passes, the client gets a 408 JSON answer if no answer was begun, and
the connection is closed; the app's pending `receive()` reports ``http.disconnect``.
After a WebSocket upgrade neither deadline applies (the session's ping manager does).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from server.http.errors import STATUS, error_body

log = logging.getLogger("vlbridge.http")


@dataclass(frozen=True)
class ReadDeadlines:
    header_timeout: float
    body_timeout: float
    body_min_rate: float  # bytes a second


class Reading(enum.Enum):
    IDLE = "idle"  # between requests, or the request is read
    HEADERS = "headers"
    BODY = "body"


class HttpProtocol(HttpToolsProtocol):
    """Build with ``functools.partial(HttpProtocol, deadlines=...)`` as uvicorn's ``http``."""

    def __init__(self, *args: Any, deadlines: ReadDeadlines, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadlines = deadlines
        self.reading = Reading.IDLE
        self.deadline = 0.0  # loop time by which the part being read must be complete
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect(Reading.HEADERS, self.deadlines.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if (
            self.reading is Reading.IDLE
        ):  # a kept-alive connection's next request (the first is timed already)
            self._expect(Reading.HEADERS, self.deadlines.header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.parser.should_upgrade() and self._should_upgrade():
            self._stop_timer()  # the WebSocket protocol takes the connection over
            return
        self._expect(Reading.BODY, self.deadlines.body_timeout)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self.deadline += len(body) / self.deadlines.body_min_rate

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._stop_timer()

    def _expect(self, reading: Reading, seconds: float) -> None:
        self._stop_timer()
        self.reading = reading
        self.deadline = self.loop.time() + seconds
        self.timer = self.loop.call_at(self.deadline, self._check)

    def _stop_timer(self) -> None:
        self.reading = Reading.IDLE
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        now = self.loop.time()
        if self.reading is Reading.BODY and self.flow.read_paused:
            # The app has not taken what came (uvicorn stopped reading): not the client's fault.
            self.deadline = max(self.deadline, now + self.deadlines.body_timeout)
        if now < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._check)
            return
        self.timer = None
        if self.transport.is_closing():
            return
        what = "request headers" if self.reading is Reading.HEADERS else "request body"
        log.info("%s: the %s did not arrive in time; closing the connection", _peer(self.client), what)
        cycle = self.cycle
        if self.reading is Reading.HEADERS:
            answerable = cycle is None or cycle.response_complete  # else a response is still going out
        else:
            answerable = not cycle.response_started
        if answerable:
            self.transport.write(self._timeout_response(f"the {what} did not arrive in time"))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() reports a disconnect, its sends are dropped
            cycle.message_event.set()
        self.reading = Reading.IDLE
        self.transport.close()

    def _timeout_response(self, message: str) -> bytes:
        body = orjson.dumps(error_body("request_timeout", message))
        head = [STATUS_LINE[STATUS["request_timeout"]]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        return b"".join(head) + body


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"
