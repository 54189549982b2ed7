"""The asyncio layer of the client: one logical session over as many sockets as it takes.

`Connection` owns one task that connects, pumps frames between the socket and the
sans-I/O `ClientProtocol`, and when the socket dies reconnects with exponential backoff
and `?resume=<session>&last_seq=<n>`. Each socket gets its own reader and writer bound
to it (nothing reads a shared "current socket" field). The user side calls `ask`,
`cancel`, `reset` at any time, connected or not, and reads `events()`.

Failure contract: `start()` and the `events()` iterator raise `AuthFailed` when the
server refuses the token and `ConnectFailed` when no connection comes back within
`Backoff.give_up_after` seconds or the server closes for a reason retrying cannot fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from client.errors import AuthFailed, ConnectFailed
from client.protocol import ClientProtocol, Event, Hello, ProtocolError
from protocol.v1 import CloseCode

log = logging.getLogger("vlbridge.client")

# Close codes after which reconnecting would only repeat the failure.
_FATAL_CLOSE: dict[int, str] = {
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.UNSUPPORTED_DATA: "unsupported data",
    CloseCode.POLICY: "policy violation",
    CloseCode.TOO_BIG: "too big",
    CloseCode.TAKEN_OVER: "the session was resumed by another connection",
}
_EVENT_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: initial * factor**n, capped, with +-jitter; give up after a while."""

    initial: float = 0.25
    factor: float = 2.0
    maximum: float = 5.0
    jitter: float = 0.2
    give_up_after: float = 120.0  # seconds without a working connection

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The socket is gone; the next attempt starts in `retry_in` seconds."""

    reason: str
    attempt: int
    retry_in: float


@dataclass(frozen=True, slots=True)
class _Fatal:
    error: Exception


LinkEvent = Event | Disconnected


class Connection:
    """A resuming protocol-v1 client session (see the module docstring)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        backoff: Backoff | None = None,
        open_timeout: float = 10.0,
        silence_grace: float = 15.0,
    ) -> None:
        self.url = url
        self.token = token
        self.backoff = backoff or Backoff()
        self.open_timeout = open_timeout
        self.silence_grace = silence_grace  # beyond ping_interval before a silent server is dead
        self.core = ClientProtocol()
        self.hellos = 0  # connections that got as far as the server's hello
        self._events: asyncio.Queue[LinkEvent | _Fatal] = asyncio.Queue(_EVENT_BACKLOG)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._hello: asyncio.Future[Hello] | None = None
        self._closing = False

    @property
    def reconnects(self) -> int:
        return max(0, self.hellos - 1)

    # -- the user's side ------------------------------------------------------------------

    async def start(self) -> Hello:
        """Connect and return the server's hello; the first connection is not retried.

        Raises `AuthFailed` or `ConnectFailed`. Later drops are retried per the backoff.
        """
        if self._task is not None:
            raise RuntimeError("expected a new Connection, got one already started")
        self._hello = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="vlbridge-client")
        return await self._hello

    def ask(
        self, text: str, images: list[bytes] | tuple[bytes, ...] = (), max_tokens: int | None = None
    ) -> str:
        ask_id = self.core.ask(text, images, max_tokens)
        self._wakeup.set()
        return ask_id

    def cancel(self, ask_id: str) -> None:
        for event in self.core.cancel(ask_id):
            self._events.put_nowait(event)
        self._wakeup.set()

    def reset(self) -> None:
        self.core.reset()
        self._wakeup.set()

    async def next_event(self) -> LinkEvent:
        """The next thing that happened, in order; raises the error that ended the session."""
        item = await self._events.get()
        if isinstance(item, _Fatal):
            self._events.put_nowait(item)  # every later call raises it too
            raise item.error
        return item

    async def close(self) -> None:
        """Close the socket politely (`CloseCode.NORMAL`) and stop reconnecting."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- the owner task -------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        down_since = time.monotonic()
        resume = True
        try:
            while True:
                self.core.connecting()
                try:
                    ws = await connect(
                        self._url(resume),
                        additional_headers=self._headers(),
                        open_timeout=self.open_timeout,
                        max_size=64 * 1024 * 1024,
                        user_agent_header="vlbridge-chat",
                        close_timeout=2.0,
                    )
                except InvalidStatus as exc:
                    status = exc.response.status_code
                    if status in (401, 403):
                        raise AuthFailed(f"the server refused the token (HTTP {status})") from None
                    if resume and self.core.session is not None and 400 <= status < 500:
                        log.warning("resume of session %s refused (HTTP %d)", self.core.session, status)
                        resume = False  # start a new session; the hello reports the loss
                    reason = f"handshake refused (HTTP {status})"
                except (OSError, TimeoutError, InvalidHandshake) as exc:
                    reason = _describe(exc)
                else:
                    resume = True
                    hellos = self.hellos
                    reason = await self._pump(ws)
                    # Only a socket that got a hello was a working connection; a server that
                    # accepts and closes at once (full, restarting) keeps the backoff growing.
                    if self.hellos > hellos:
                        attempt, down_since = 0, time.monotonic()
                self.core.disconnected()
                if self._hello is not None and not self._hello.done():
                    raise ConnectFailed(f"cannot connect to {self.url}: {reason}")
                attempt += 1
                if time.monotonic() - down_since > self.backoff.give_up_after:
                    raise ConnectFailed(
                        f"{self.url}: no connection for {self.backoff.give_up_after:.0f} s ({reason})"
                    )
                delay = self.backoff.delay(attempt)
                log.info("connection lost (%s); reconnecting in %.2f s", reason, delay)
                await self._emit(Disconnected(reason, attempt, delay))
                await asyncio.sleep(delay)
        except (AuthFailed, ConnectFailed, ProtocolError, InvalidURI) as exc:
            error = exc if isinstance(exc, AuthFailed | ConnectFailed) else ConnectFailed(str(exc))
            if self._hello is not None and not self._hello.done():
                self._hello.set_exception(error)
            await self._events.put(_Fatal(error))

    async def _pump(self, ws: ClientConnection) -> str:
        """Serve one socket until it dies; return why. Fatal closes raise."""
        writer = asyncio.create_task(self._writer(ws), name="vlbridge-client-writer")
        try:
            while True:
                silence = (self.core.ping_interval or 30.0) + self.silence_grace
                try:
                    async with asyncio.timeout(silence):
                        data = await ws.recv()
                except TimeoutError:
                    await ws.close(CloseCode.PING_TIMEOUT, "no frame from the server")
                    return f"the server was silent for {silence:.0f} s"
                for event in self.core.receive(data):
                    if isinstance(event, Hello):
                        self.hellos += 1
                        if self._hello is not None and not self._hello.done():
                            self._hello.set_result(event)
                    await self._emit(event)
                self._wakeup.set()
        except ConnectionClosed as exc:
            return self._closed(exc)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            # Not closed on purpose: a code that keeps the session on the server for a resume.
            code = CloseCode.NORMAL if self._closing else CloseCode.PING_TIMEOUT
            with contextlib.suppress(Exception):  # a no-op when the socket is already closed
                await ws.close(code)

    async def _writer(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                for frame in self.core.take_outgoing():
                    await ws.send(orjson.dumps(frame).decode())

    def _closed(self, exc: ConnectionClosed) -> str:
        rcvd = exc.rcvd
        if rcvd is None:
            return "the connection dropped"
        if rcvd.code == CloseCode.UNAUTHORIZED:
            raise AuthFailed(f"the server refused the token (close {rcvd.code} {rcvd.reason})".strip())
        if rcvd.code in _FATAL_CLOSE:
            why = f"{rcvd.code} {_FATAL_CLOSE[rcvd.code]} {rcvd.reason}".strip()
            raise ConnectFailed(f"the server closed the connection: {why}")
        return f"the server closed the connection ({rcvd.code} {rcvd.reason})".strip()

    async def _emit(self, event: LinkEvent) -> None:
        await self._events.put(event)

    def _url(self, resume: bool) -> str:
        parts = urlsplit(self.url)
        query = dict(parse_qsl(parts.query))
        if resume:
            query.update(self.core.resume_query())
        return urlunsplit(parts._replace(query=urlencode(query)))

    def _headers(self) -> dict[str, Any]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
