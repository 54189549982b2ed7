"""`POST /v1/chat/completions` (OpenAI-compatible) and `GET /v1/models`.

Messages may hold `image_url` parts; pictures come as ``data:image/...;base64,`` URLs.
Remote ``http(s)`` URLs are refused unless `server.allow_remote_images` is on (then they
are fetched with a size and time limit, without following redirects). Supported
parameters: `stream`, `stream_options.include_usage`, `max_tokens` (or
`max_completion_tokens`), `temperature`, `top_p`, `stop`, `seed`, `min_tokens` (vLLM's and
SGLang's extension, which vlbridge's own openai backend sends); `n` must be 1; the others
are ignored when they do not change the answer, else refused (`server.http.openai_params`).
The answer's `model` is the served model's id (the one `GET /v1/models` lists), whatever the
request named.
Unlike OpenAI's API (400 past the context window), `max_tokens` is an upper bound clamped to
the room the prompt leaves (finish_reason "length" when reached): a client cannot count its
prompt's tokens, pictures included, to pick an accepted value. More than `server.max_turns`
messages answer 413 `too_large`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from protocol.pictures import PictureRejected, decode_base64
from server.errors import BadImage, BadRequest, RequestError, TooLarge, UnsupportedMediaType, shutting_down
from server.http.body import read_body
from server.http.common import (
    check_auth,
    check_images,
    collect_while_connected,
    context_of,
    first_event,
)
from server.http.errors import from_request_error
from server.http.openai_params import refuse_unsupported
from server.http.sse import EventStream
from server.inference.api import Delta, Done, Event, Failed, InferenceRequest, SamplingParams, Turn

ROUTE = "/v1/chat/completions"
MAX_BODY = 1 << 20  # besides the pictures


async def models(request: Request) -> Response:
    if (denied := check_auth(request)) is not None:
        return denied
    model = context_of(request).answers.stats().model
    return JSONResponse(
        {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "vlbridge"}]}
    )


async def chat_completions(request: Request) -> Response:
    if (denied := check_auth(request)) is not None:
        return denied
    ctx = context_of(request)
    server = ctx.server
    if not ctx.answers.accepting:
        return from_request_error(shutting_down(), ROUTE)
    try:
        body = await _read_json(request, server.max_images * server.max_image_bytes * 2 + MAX_BODY)
        refuse_unsupported(body)  # before the pictures are decoded: it costs nothing
        messages = await _messages(
            body, server.max_images, server.max_image_bytes, server.allow_remote_images
        )
        check_images([data for turn in messages for data in turn.images], ctx.image_limits)
        params = _params(body)
    except RequestError as exc:
        return from_request_error(exc, ROUTE)
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    events = aiter(ctx.answers.submit(InferenceRequest(completion_id, messages, params), ROUTE))
    model = ctx.answers.stats().model  # what answers, not what the client asked for
    try:
        if not body.get("stream"):
            done = await collect_while_connected(request, events)
            if done is None:  # the client went away: nothing to answer
                return Response(status_code=499)
            return JSONResponse(_completion(completion_id, model, done))
        first = await first_event(events)
    except RequestError as exc:
        return from_request_error(exc)  # the answer gateway counted it
    options = body.get("stream_options") or {}
    usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    return EventStream(_chunks(completion_id, model, first, events, usage))


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise UnsupportedMediaType("send the request as application/json")
    raw = await read_body(request, limit)
    try:
        body = orjson.loads(raw)  # on the loop: orjson holds the GIL, a thread would only add hand-offs
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


async def _messages(body: dict[str, Any], max_images: int, max_bytes: int, remote: bool) -> list[Turn]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty list")
    turns: list[Turn] = []
    count = 0
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{index}] must be an object")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise BadRequest(f"messages[{index}].role {role!r} is not supported (system, user, assistant)")
        text, images = await _content(message.get("content"), index, max_bytes, remote, count)
        count += len(images)
        if count > max_images:
            raise TooLarge(f"{count} pictures; at most {max_images} are accepted")
        if images and role != "user":
            raise BadRequest(f"messages[{index}]: only user messages may hold pictures")
        turns.append(Turn("system" if role == "developer" else role, text, tuple(images)))
    if turns[-1].role != "user":
        raise BadRequest("the last message must be the user's")
    return turns


async def _content(
    content: Any, index: int, max_bytes: int, remote: bool, seen: int
) -> tuple[str, list[bytes]]:
    if isinstance(content, str):
        return content, []
    if content is None:
        return "", []
    if not isinstance(content, list):
        raise BadRequest(f"messages[{index}].content must be a string or a list of parts")
    texts: list[str] = []
    images: list[bytes] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise BadRequest(f"messages[{index}]: image_url needs a 'url'")
            images.append(await _image(url, seen + len(images) + 1, max_bytes, remote))
        else:
            raise BadRequest(f"messages[{index}]: unsupported content part {kind!r} (text, image_url)")
    return "\n".join(texts), images


async def _image(url: str, number: int, max_bytes: int, remote: bool) -> bytes:
    if url.startswith("data:"):
        try:
            return decode_base64(url, number, max_bytes)
        except PictureRejected as exc:
            raise RequestError.from_code(exc.code, exc.message) from None
    if url.startswith(("http://", "https://")):
        if not remote:
            raise BadRequest(
                f"picture {number}: remote image URLs are not fetched by this server; "
                "send the picture as a data: URL (or enable server.allow_remote_images)"
            )
        return await _fetch(url, number, max_bytes)
    raise BadImage(f"picture {number}: expected a data: URL")


async def _fetch(url: str, number: int, max_bytes: int) -> bytes:
    try:
        async with (
            httpx.AsyncClient(timeout=10.0, follow_redirects=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise BadImage(f"picture {number}: fetching it answered HTTP {response.status_code}")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise TooLarge(f"picture {number} is larger than {max_bytes / 1e6:.1f} MB")
            return bytes(data)
    except httpx.HTTPError as exc:
        raise BadImage(f"picture {number} could not be fetched ({exc})") from None


def _params(body: dict[str, Any]) -> SamplingParams:
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise BadRequest("'n' must be 1: one answer per request")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise BadRequest("'max_tokens' must be a positive integer")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, list | tuple) or not all(isinstance(item, str) for item in stop):
        raise BadRequest("'stop' must be a string or a list of strings")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest("'seed' must be an integer")
    min_tokens = body.get("min_tokens") or 0
    if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0:
        raise BadRequest("'min_tokens' must be a non-negative integer")
    return SamplingParams(
        max_tokens, temperature, top_p or 1.0, tuple(stop), min_new_tokens=min_tokens, seed=seed
    )


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"'{key}' must be a number from {low:g} to {high:g}")
    return float(value)


def _usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.usage.prompt_tokens,
        "completion_tokens": done.usage.completion_tokens,
        "total_tokens": done.usage.total_tokens,
    }


def _completion(completion_id: str, model: str, done: Done) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": done.text},
                "finish_reason": done.finish_reason.value,
            }
        ],
        "usage": _usage(done),
    }


async def _chunks(
    completion_id: str, model: str, first: Event, events: AsyncIterator[Event], include_usage: bool
) -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return b"data: " + orjson.dumps(body) + b"\n\n"

    async def all_events() -> AsyncIterator[Event]:
        yield first
        async for event in events:
            yield event

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in all_events():
            if isinstance(event, Delta):
                yield chunk({"content": event.text})
            elif isinstance(event, Done):
                yield chunk({}, event.finish_reason.value)
                if include_usage:
                    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": [], "usage": _usage(event)}  # fmt: skip
                    yield b"data: " + orjson.dumps(body) + b"\n\n"
            elif isinstance(event, Failed):
                error = {"error": {"code": event.code, "message": event.message, "type": event.code}}
                yield b"data: " + orjson.dumps(error) + b"\n\n"
        yield b"data: [DONE]\n\n"
    finally:
        await events.aclose()  # type: ignore[attr-defined]
