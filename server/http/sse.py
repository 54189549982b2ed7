"""A Server-Sent Events response that stops its producer when the client goes away."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import anyio.abc
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}


def sse_event(data: bytes, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + data + b"\n\n"


class EventStream(StreamingResponse):
    """Streams the byte chunks of *chunks*; when the client disconnects, the iterator is
    closed (its `finally` blocks run, e.g. cancelling the answer)."""

    def __init__(self, chunks: AsyncIterator[bytes], status_code: int = 200) -> None:
        super().__init__(chunks, status_code, SSE_HEADERS, media_type="text/event-stream")
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream(group: anyio.abc.TaskGroup) -> None:
            with contextlib.suppress(OSError):  # the client left mid-write
                await send(
                    {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
                )
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            group.cancel_scope.cancel()

        async def listen(group: anyio.abc.TaskGroup) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(stream, group)
                group.start_soon(listen, group)
        finally:
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
