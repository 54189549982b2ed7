"""HAProxy agent-check responder: a TCP port that answers one line and closes.

HAProxy (``agent-check agent-port N``) connects every few seconds and reads a line such
as ``ready up 75%`` (serve, with this weight), ``drain`` (no new traffic) or ``down``; the line
comes from the same load figure as /health (server.health.agent_line).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger("vlbridge.agentcheck")


class AgentCheck:
    def __init__(self, host: str, port: int, line: Callable[[], str]) -> None:
        self.host = host
        self.port = port
        self._line = line
        self._server: asyncio.Server | None = None

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self._line().encode() + b"\n")
            await asyncio.wait_for(writer.drain(), 5.0)
        except (OSError, TimeoutError) as exc:
            log.debug("agent check: could not answer: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._answer, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("HAProxy agent check on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)
