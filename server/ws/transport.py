"""uvicorn's sans-I/O WebSocket protocol, with one ASGI extension for fewer system calls and hops.

An answer is several frames (queued, started, delta, done) that are often ready together;
with plain ASGI each `websocket.send` is its own socket write, and every received frame
goes through a queue and a task switch. On loopback that was most of the server's CPU per
question. The extension ``vlbridge.frames`` (in the scope's ``extensions``) offers:

- the message ``{"type": "vlbridge.send_many", "texts": [b"...", ...]}``: each item becomes
  one text frame (UTF-8 already encoded, framed here: a server's text frame is two to ten
  header bytes and the payload) and all of them go out in one write; it waits while the
  transport's buffer is full;
- ``write_now(texts) -> bool``: the same without a coroutine, False (nothing written) while
  the buffer is full;
- ``listen(callback)``: text frames are passed to ``callback(text)`` straight from the read
  callback while the app waits in receive() with nothing queued; the others (and all while
  something is queued, so order is kept) take uvicorn's queue as usual;
- ``read_seconds() -> float``: how long the last whole text frame took to arrive, from the
  first read after the frame before it to the read that completed it (for the server's
  profile: a large picture frame is many reads, each waiting for the event loop).

Everything else is uvicorn's. The endpoint falls back to plain ASGI under any other server.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

FRAMES = "vlbridge.frames"  # the extension's name in the scope
SEND_MANY = "vlbridge.send_many"  # its ASGI message type
_TINY = [bytes((0x81, size)) for size in range(126)]  # the header of each text frame under 126 bytes
_SHORT = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


class WebSocketProtocol(WebSocketsSansIOProtocol):
    text_listener: Callable[[str], None] | None = None
    app_waiting = False  # the app is inside receive(), nothing queued for it
    frame_began: float | None = None  # the first read since the last frame was complete
    frame_read = 0.0  # seconds the last whole text frame took to arrive

    def data_received(self, data: bytes) -> None:
        if self.frame_began is None:
            self.frame_began = time.monotonic()
        super().data_received(data)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:  # the app task runs later, so the scope is still ours
            self.scope["extensions"][FRAMES] = {
                "write_now": self.write_now,
                "listen": self.listen,
                "read_seconds": lambda: self.frame_read,
            }

    def listen(self, callback: Callable[[str], None]) -> None:
        """Pass text frames to *callback* from the read callback while the app waits in
        receive() with nothing queued."""
        self.text_listener = callback

    def send_receive_event_to_app(self) -> None:
        if self.frame_began is not None:
            self.frame_read, self.frame_began = time.monotonic() - self.frame_began, None
        listener = self.text_listener
        if (
            listener is None
            or not self.app_waiting
            or self.curr_msg_data_type != "text"
            or self.close_sent
            or not self.queue.empty()
        ):
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        try:
            text = data.decode()
        except UnicodeDecodeError:
            super().send_receive_event_to_app()  # uvicorn closes with 1007
            return
        self.frames = []
        try:
            listener(text)
        except Exception:
            self.logger.exception("handling a WebSocket frame failed")
            self.transport.close()

    async def receive(self) -> Any:
        self.app_waiting = self.queue.empty()
        try:
            return await super().receive()
        finally:
            self.app_waiting = False

    async def send(self, message: Any) -> None:
        if message["type"] != SEND_MANY:
            await super().send(message)
            return
        while not self.write_now(message["texts"]):
            await self.writable.wait()

    def write_now(self, texts: list[bytes]) -> bool:
        """Write *texts* as text frames in one write; False (nothing written) while the
        transport's buffer is full. Raises ClientDisconnected once the connection is closing."""
        conn = self.conn
        if self.disconnected or self.close_sent or conn.state is not State.OPEN:
            raise ClientDisconnected()
        if not self.writable.is_set():
            return False
        if conn.extensions:  # e.g. permessage-deflate: let websockets frame (and compress) them
            for text in texts:
                conn.send_text(text)
            self.transport.write(b"".join(conn.data_to_send()))
        else:
            self.transport.write(text_frames(texts))
        return True


def text_frames(texts: list[bytes]) -> bytes:
    """RFC 6455 unmasked, unfragmented text frames (what a server sends), concatenated."""
    parts: list[bytes] = []
    for data in texts:
        size = len(data)
        if size < 126:
            parts.append(_TINY[size])
        elif size < 65536:
            parts.append(_SHORT.pack(0x81, 126, size))
        else:
            parts.append(_LONG.pack(0x81, 127, size))
        parts.append(data)
    return b"".join(parts)
