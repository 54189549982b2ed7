"""Running the app under uvicorn with vlbridge's settings and an ordered, bounded shutdown.

`Server` is uvicorn's server with one change: on SIGTERM/SIGINT it first stops
accepting connections and drains the service (sessions told with close 1012, running
answers finish within `server.shutdown_grace`, then are cancelled) before uvicorn closes
what is left and runs the lifespan shutdown (executor, then platform adapters).
"""

from __future__ import annotations

import errno
import functools
import socket
from collections.abc import Callable

import uvicorn

from server.config import Config
from server.errors import ListenError
from server.http.transport import HttpProtocol, ReadDeadlines
from server.service import Service
from server.ws.transport import WebSocketProtocol

AFTER_DRAIN_SECONDS = 5  # uvicorn's own wait for connections once the service has drained


def uvicorn_config(app: object, config: Config, **overrides: object) -> uvicorn.Config:
    deadlines = ReadDeadlines(
        config.server.header_timeout, config.server.body_timeout, config.server.body_min_rate
    )
    options: dict[str, object] = {
        "host": config.server.host,
        "port": config.server.port,
        "log_config": None,
        "http": functools.partial(HttpProtocol, deadlines=deadlines),  # httptools, with read deadlines
        "ws": WebSocketProtocol,  # uvicorn's websockets-sansio, plus one write for several frames
        "ws_max_size": config.server.max_frame_bytes,
        "ws_ping_interval": None,  # keepalive is the protocol's own ping manager
        "ws_ping_timeout": None,
        "ws_per_message_deflate": False,  # per-connection zlib state would cost ~100 KiB a session
        "timeout_graceful_shutdown": AFTER_DRAIN_SECONDS,
        "backlog": 4096,
        **overrides,
    }
    return uvicorn.Config(app, **options)  # type: ignore[arg-type]


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to *host*:*port*, taken before anything slow (the model) starts; raises
    `ListenError` with one line that says what to change. uvicorn then serves on it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}: {exc.strerror}; set server.host or --host") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own bind does
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ListenError(_bind_failure(host, port, exc)) from exc
    sock.set_inheritable(True)
    return sock


def _bind_failure(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (another vlbridge?); choose another with --port or server.port"
        )
    if exc.errno == errno.EACCES:
        return f"port {port} on {host} needs privileges; choose one above 1023 with --port or server.port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this host; set server.host or --host (e.g. 0.0.0.0)"
    return f"cannot listen on {host}:{port}: {exc.strerror}"


class Server(uvicorn.Server):
    """*fatal*, when given, is asked ten times a second (uvicorn's tick) for a reason to stop
    serving (the model failed to load); once it gives one, the server shuts down and keeps it
    in `fatal_reason`."""

    def __init__(
        self, config: uvicorn.Config, service: Service, fatal: Callable[[], str | None] | None = None
    ) -> None:
        super().__init__(config)
        self.service = service
        self._fatal = fatal
        self.fatal_reason: str | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if sockets is not None and self.started:
            # uvicorn says where it listens only for sockets it bound itself (on pre-bound ones it
            # assumes a process manager said so); `vlbridge serve` binds first (`listen`) and its
            # operators and tests read this line
            self._log_started_message(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self._fatal is not None and self.fatal_reason is None:
            self.fatal_reason = self._fatal()
            if self.fatal_reason is not None:
                return True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in getattr(self, "servers", []):
            server.close()  # stop accepting before the drain, not after it
        await self.service.drain()
        await super().shutdown(sockets)
