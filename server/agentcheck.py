"""HAProxy agent-check responder: a TCP port that answers one line and closes.

HAProxy (``agent-check agent-port N``) connects every few seconds and reads a line such
as ``up 75%`` (serve, with this weight), ``drain`` (no new traffic) or ``down``; the line
comes from the same load figure as /health (server.health.agent_line).

"drain" puts the server in HAProxy's DRAIN administrative state, which stays until a reply
says "ready" (or an operator ends it). "ready" also ends a drain an operator set by hand
("set server vlbridge/vlbridge1 state drain"), so it is said only where it is owed: in the
first serving reply to a load balancer after this agent told it "drain", and in the first to
one it has not answered yet (which may hold the drain of this instance's previous process,
stopped with SIGTERM). A manual drain then lasts until the operator ends it or the instance
restarts. Load balancers are told apart by address; the last `PEERS` are remembered (one
forgotten is owed "ready" again, the safe side).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger("vlbridge.agentcheck")

PEERS = 64  # load balancers whose last reply is remembered


class AgentCheck:
    def __init__(self, host: str, port: int, line: Callable[[], str]) -> None:
        self.host = host
        self.port = port
        self._line = line
        self._server: asyncio.Server | None = None
        self._owed: OrderedDict[str, bool] = OrderedDict()  # peer -> whether "ready" is owed to it
        self.answered = 0  # replies written (tests wait for HAProxy's checks by it)

    def reply(self, peer: str) -> str:
        """The line for the load balancer at *peer*: `line()`, with "ready" where it is owed."""
        line = self._line()
        owed = self._owed.pop(peer, True)
        if line == "drain":
            owed = True
        elif line.startswith("up"):
            line, owed = (f"ready {line}" if owed else line), False
        self._owed[peer] = owed
        while len(self._owed) > PEERS:
            self._owed.popitem(last=False)
        return line

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = writer.get_extra_info("peername")
        peer = str(address[0]) if address else ""
        line = self.reply(peer)
        try:
            writer.write(line.encode() + b"\n")
            await asyncio.wait_for(writer.drain(), 5.0)
            self.answered += 1
        except (OSError, TimeoutError) as exc:
            if line.startswith("ready"):
                self._owed[peer] = True  # not delivered: still owed
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
