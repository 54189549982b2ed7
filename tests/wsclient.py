"""A small protocol v1 test client over the real `websockets` client."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from tests.waiting import DEADLINE


class Client:
    def __init__(self, conn: ClientConnection, hello: dict[str, Any]) -> None:
        self.conn = conn
        self.hello = hello
        self.frames: list[dict[str, Any]] = []  # every frame after hello, pings included
        self.answer_pings = True

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> Client:
        conn = await connect(url, ping_interval=None, max_size=None, open_timeout=DEADLINE, **kwargs)
        hello = orjson.loads(await asyncio.wait_for(conn.recv(), DEADLINE))
        assert hello["type"] == "hello", hello
        return cls(conn, hello)

    @property
    def session(self) -> str:
        return str(self.hello["session"])

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.conn.send(frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode())

    async def recv(self, timeout: float = DEADLINE) -> dict[str, Any]:
        """The next frame that is not a ping (pings are answered unless told otherwise)."""
        while (frame := await self.recv_any(timeout))["type"] == "ping":
            pass
        return frame

    async def recv_any(self, timeout: float = DEADLINE) -> dict[str, Any]:
        """The next frame, pings included (answered unless told otherwise)."""
        frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(self.conn.recv(), timeout))
        self.frames.append(frame)
        if frame["type"] == "ping" and self.answer_pings:
            await self.send({"type": "pong", "ts": frame["ts"]})
        return frame

    async def ask(self, ask_id: str, text: str, images: list[bytes] = (), **extra: Any) -> None:  # type: ignore[assignment]
        frame = {"type": "ask", "id": ask_id, "text": text, **extra}
        if images:
            frame["images"] = [base64.b64encode(data).decode() for data in images]
        await self.send(frame)

    async def until_end(self, ask_id: str, timeout: float = DEADLINE) -> list[dict[str, Any]]:
        """Frames of *ask_id* up to and including its done or error."""
        got: list[dict[str, Any]] = []
        while True:
            frame = await self.recv(timeout)
            if frame.get("id") == ask_id:
                got.append(frame)
                if frame["type"] in ("done", "error"):
                    return got

    async def close(self) -> None:
        await self.conn.close()
