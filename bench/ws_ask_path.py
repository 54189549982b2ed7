"""Benchmark: server CPU per /ws ask without sockets, the part of an ask that is vlbridge's own.

Drives `_on_text` of server/ws/endpoint.py directly: one session, the zero-cost backend
(`builtin:instant`), and a connection whose writes go nowhere; everything else (admission,
parsing, the session, the answer's tracking and metrics, the four frames and the resume log)
is the real code. Prints the best of 7 blocks in microseconds per ask. Quiet and quick
(seconds), so a change to the ask path can be judged here before bench/ws_sessions.py.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

import orjson

from server.config import Config
from server.inference.instant import INSTANT_PATH, InstantExecutor
from server.service import Service
from server.ws.endpoint import SocketLink, _on_text
from server.ws.state import FloodGate
from server.ws.transport import FRAMES


class _Socket:
    """What SocketLink needs of a WebSocket whose server offers vlbridge's transport."""

    def __init__(self) -> None:
        self.frames = 0
        self.scope = {"extensions": {FRAMES: {"write_now": self.write_now}}}

    def write_now(self, texts: list[bytes]) -> bool:
        self.frames += len(texts)
        return True

    async def send(self, message: MutableMapping[str, Any]) -> None:
        """The ASGI send: only the close frame at shutdown comes this way."""


async def measure(asks: int, blocks: int = 7) -> tuple[float, int]:
    """Best microseconds per ask over *blocks* blocks, and the frames written."""
    unlimited = {"max_frames_per_second": 1e9}
    config = Config.model_validate({"server": unlimited, "model": {"path": INSTANT_PATH}})
    service = Service(config, InstantExecutor())
    await service.start()
    socket = _Socket()
    session = service.hub.sessions.open(b"bench")
    assert session is not None
    now = time.monotonic()
    gate = FloodGate(1e9, 2e9, now)
    keepalive = service.hub.pings.keepalive(now)
    conn = SocketLink(socket, socket.send, session, keepalive, gate, service.hub.profile)  # type: ignore[arg-type]
    session.link = conn
    texts = [orjson.dumps({"type": "ask", "id": f"q{n}", "text": "hi"}).decode() for n in range(asks)]
    per_block = asks // blocks
    best = float("inf")
    for block in range(blocks):
        started = time.process_time()
        for text in texts[block * per_block : (block + 1) * per_block]:
            _on_text(service.hub, conn, text)
        best = min(best, (time.process_time() - started) / per_block)
        await asyncio.sleep(0)
    await service.stop()
    return 1e6 * best, socket.frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--asks", type=int, default=140_000)
    args = parser.parse_args()
    us, frames = asyncio.run(measure(args.asks))
    print(f"ask path without sockets: {us:.2f} us per ask (best of 7 blocks; {frames} frames written)")


if __name__ == "__main__":
    main()
