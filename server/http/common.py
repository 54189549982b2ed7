"""What the HTTP routes share: auth, the edge check of pictures, collecting an answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from protocol.pictures import ImageLimits, PictureRejected, sniff_image
from server.answers import AnswerGateway
from server.auth import Authenticator, Refusal
from server.config import ServerConfig
from server.errors import RequestError
from server.http.errors import forbidden_origin, route_of, unauthorized
from server.inference.api import Done, Event, Failed


@dataclass(frozen=True, slots=True)
class HttpContext:
    """What the HTTP routes need from the service (``app.state.http``)."""

    answers: AnswerGateway
    auth: Authenticator
    server: ServerConfig
    image_limits: ImageLimits  # what a picture must pass before its request is queued, as on /ws


def context_of(request: HTTPConnection) -> HttpContext:
    context: HttpContext = request.app.state.http
    return context


def check_auth(request: HTTPConnection) -> Response | None:
    """None when the request may proceed, else the 401 or 403 response to send (server.auth)."""
    verdict = context_of(request).auth.admit(request.headers, request.query_params)
    if verdict is Refusal.UNAUTHORIZED:
        return unauthorized(route_of(request))
    if verdict is Refusal.FORBIDDEN_ORIGIN:
        return forbidden_origin(request)
    return None


def check_images(images: list[bytes], limits: ImageLimits) -> None:
    """Refuse what is clearly not a usable picture before any queueing (raises RequestError).

    Only headers are read here (format, bytes, dimensions, decoding budget: what the
    executor's decoder would refuse); the executor decodes fully and reports what is left."""
    try:
        _sniff_all(images, limits)
    except PictureRejected as exc:
        raise RequestError.from_code(exc.code, exc.message) from None


def _sniff_all(images: list[bytes], limits: ImageLimits) -> None:
    for number, data in enumerate(images, start=1):
        sniff_image(data, number, limits.max_bytes, limits)


async def first_event(events: AsyncIterator[Event]) -> Event:
    """The first event; raises the RequestError when the request failed at once (busy, ...)."""
    event = await anext(events)
    if isinstance(event, Failed):
        await _close(events)
        raise RequestError.from_code(event.code, event.message, event.retry_after)
    return event


async def collect(events: AsyncIterator[Event]) -> Done:
    """Wait for the whole answer; raise its RequestError when it failed."""
    async for event in events:
        if isinstance(event, Done):
            return event
        if isinstance(event, Failed):
            raise RequestError.from_code(event.code, event.message, event.retry_after)
    raise RequestError("the answer ended without a result")


async def collect_while_connected(request: Request, events: AsyncIterator[Event]) -> Done | None:
    """`collect`, unless the client goes away first: then the answer is cancelled and None returned.

    Call after the request body was read: from then on `receive()` only reports the disconnect.
    The answer's stream is closed before this returns or raises, so the answer gateway has
    counted it (`collect` leaves it at its final event, and a failed one would otherwise stay
    tracked until the garbage collector found it).
    """
    answer = asyncio.ensure_future(collect(events))

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not answer.done():
        answer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await answer
    await _close(events)  # the executor frees the request's slot at its next step
    return None if answer.cancelled() else answer.result()


async def _close(events: AsyncIterator[Event]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
