"""Running the app under uvicorn with vlbridge's settings and an ordered, bounded shutdown.

`Server` is uvicorn's server with one change: on SIGTERM/SIGINT it first stops
accepting connections and drains the service (sessions told with close 1012, running
answers finish within `server.shutdown_grace`, then are cancelled) before uvicorn closes
what is left and runs the lifespan shutdown (executor, then platform adapters).
"""

from __future__ import annotations

import functools
import socket

import uvicorn

from server.config import Config
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


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in getattr(self, "servers", []):
            server.close()  # stop accepting before the drain, not after it
        await self.service.drain()
        await super().shutdown(sockets)
