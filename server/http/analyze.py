"""`POST /v1/analyze`: multipart pictures + a prompt; SSE events, or one JSON answer.

Form fields: `image` (one or more files, up to server.max_images), `prompt` (text),
optional `max_tokens`, `temperature`. ``?stream=false`` answers with one JSON object;
otherwise the response is ``text/event-stream`` with the WebSocket protocol's event
types (queued, reading, started, delta..., done | error) as ``event:`` names.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import orjson
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.errors import BadRequest, RequestError, TooLarge, UnsupportedMediaType, shutting_down
from server.http.body import read_form
from server.http.common import check_auth, check_images, collect_while_connected, context_of, first_event
from server.http.errors import from_request_error
from server.http.sse import EventStream, sse_event
from server.inference.api import Event, InferenceRequest, SamplingParams, Turn
from server.wire import event_dict

ROUTE = "/v1/analyze"


async def analyze(request: Request) -> Response:
    if (denied := check_auth(request)) is not None:
        return denied
    ctx = context_of(request)
    if not ctx.answers.accepting:
        return from_request_error(shutting_down(), ROUTE)
    try:
        prompt, images, params = await _read_form(request)
        check_images(images, ctx.image_limits)
    except RequestError as exc:
        return from_request_error(exc, ROUTE)
    ask_id = "an-" + secrets.token_hex(8)
    events = aiter(ctx.answers.submit(InferenceRequest(ask_id, [Turn.user(prompt, images)], params), ROUTE))
    stream = request.query_params.get("stream", "true").lower() not in ("false", "0", "no")
    try:
        if not stream:
            done = await collect_while_connected(request, events)
            return JSONResponse(event_dict(ask_id, done)) if done else Response(status_code=499)
        first = await first_event(events)
    except RequestError as exc:
        return from_request_error(exc)  # the answer gateway counted it
    return EventStream(_sse(ask_id, first, events))


async def _sse(ask_id: str, first: Event, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    try:
        yield sse_event(orjson.dumps(event_dict(ask_id, first)), first.type)
        async for event in events:
            yield sse_event(orjson.dumps(event_dict(ask_id, event)), event.type)
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def _read_form(request: Request) -> tuple[str, list[bytes], SamplingParams]:
    server = context_of(request).server
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedMediaType("send multipart/form-data with an 'image' file and a 'prompt' field")
    limit = server.max_images * server.max_image_bytes + (1 << 20)
    async with read_form(request, limit, max_files=server.max_images + 1, max_fields=16) as form:
        files = [item for item in form.getlist("image") if isinstance(item, UploadFile)]
        if len(files) > server.max_images:
            raise TooLarge(f"{len(files)} pictures; at most {server.max_images} are accepted")
        images = [await item.read() for item in files]
        prompt = form.get("prompt", "")
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a text field")
        if not prompt.strip() and not images:
            raise BadRequest("send an 'image' file, a 'prompt' or both")
        params = SamplingParams(
            max_new_tokens=_int_field(form.get("max_tokens")),
            temperature=_float_field(form.get("temperature")),
        )
    return prompt or "Describe this picture.", images, params


def _int_field(value: object) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(str(value))
    except ValueError:
        raise BadRequest("'max_tokens' must be a positive integer") from None
    if number < 1:
        raise BadRequest("'max_tokens' must be a positive integer")
    return number


def _float_field(value: object) -> float:
    if value is None or value == "":
        return 0.0
    try:
        number = float(str(value))
    except ValueError:
        raise BadRequest("'temperature' must be a number between 0 and 2") from None
    if not 0 <= number <= 2:
        raise BadRequest("'temperature' must be a number between 0 and 2")
    return number
