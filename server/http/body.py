"""Reading request bodies under a size limit that holds however the body is sent.

Every route that reads a body goes through here. The limit is checked twice: a declared
``Content-Length`` over it is refused before a byte is read, and the bytes actually
received are counted as they arrive, so a chunked body (no length declared) or a body
longer than it declared is refused as soon as it passes the limit, not after it was
buffered. What the client sends after the refusal is discarded by the server protocol
(`server.http.transport`), under its body deadline.

Raises, for the route to turn into its error answer: `TooLarge` (over the limit),
`BadRequest` (a bad ``Content-Length`` or malformed form data), `Cancelled` (the client
went away, or the connection was closed for sending too slowly).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive

from server.errors import BadRequest, Cancelled, TooLarge


def check_length(headers: Mapping[str, str], limit: int) -> None:
    """Refuse a declared ``Content-Length`` over *limit* (TooLarge) or not a number (BadRequest)."""
    declared = headers.get("content-length")
    if declared is None:
        return
    if not declared.isdigit() or not declared.isascii():
        raise BadRequest("the Content-Length header is not a number")
    if int(declared) > limit:
        raise TooLarge(f"the request is {int(declared) / 1e6:.1f} MB; {_limit(limit)}")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most *limit* bytes."""
    try:
        return await _limited(request, limit).body()
    except ClientDisconnect:
        raise Cancelled("the client went away while sending the request") from None


@contextlib.asynccontextmanager
async def read_form(
    request: Request, limit: int, *, max_files: int, max_fields: int
) -> AsyncIterator[FormData]:
    """The parsed form of a body of at most *limit* bytes; its files are closed on exit.

    The parser is fed from the counted stream, so it never sees more than *limit* bytes;
    file parts spool to disk past 1 MB while they are parsed.
    """
    try:
        form = await _limited(request, limit).form(max_files=max_files, max_fields=max_fields)
    except ClientDisconnect:
        raise Cancelled("the client went away while sending the request") from None
    except HTTPException as exc:  # starlette's answer to a malformed multipart body
        raise BadRequest(f"the form data could not be read: {exc.detail}") from None
    try:
        yield form
    finally:
        await form.close()


def _limited(request: Request, limit: int) -> Request:
    check_length(request.headers, limit)
    return Request(request.scope, _Counted(request.receive, limit))


class _Counted:
    """A `receive` that raises TooLarge once the body received passes *limit* bytes."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.received = 0

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise TooLarge(f"more was sent than the limit allows; {_limit(self.limit)}")
        return message


def _limit(limit: int) -> str:
    return f"the limit is {limit / 1e6:.1f} MB"
