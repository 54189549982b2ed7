"""The OpenAI chat-completions wire, as the openai backend speaks it to its upstreams.

Pure functions, no I/O: the request body (pictures as ``data:`` URLs), the chunks of a
streamed answer (Server-Sent Events), and the project's `Failed` for an upstream's error in
the shapes OpenAI, vLLM, SGLang and vlbridge use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from protocol.pictures import encode_base64
from server.errors import ERROR_CODES
from server.inference.api import Failed, InferenceRequest, Turn


def request_body(request: InferenceRequest, model: str, max_new_tokens: int) -> bytes:
    """The streaming chat-completions request for *request* (JSON bytes)."""
    params = request.params
    body: dict[str, Any] = {
        "model": model or "default",
        "messages": [message(turn) for turn in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": params.max_new_tokens or max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.min_new_tokens:
        body["min_tokens"] = params.min_new_tokens  # vLLM's and SGLang's extension
    return orjson.dumps(body)


def message(turn: Turn) -> dict[str, Any]:
    """One chat message: plain text, or its pictures as data: URLs and then its text."""
    if not turn.images:
        return {"role": turn.role, "content": turn.text}
    parts: list[dict[str, Any]] = [
        {
            "type": "image_url",
            "image_url": {"url": f"data:{media_type(image)};base64,{encode_base64(image)}"},
        }
        for image in turn.images
    ]
    if turn.text:
        parts.append({"type": "text", "text": turn.text})
    return {"role": turn.role, "content": parts}


_MAGIC = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\0", "image/tiff"),
    (b"MM\0*", "image/tiff"),
)


def media_type(data: bytes) -> str:
    """The media type of a picture file from its first bytes (the upstream decodes it)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _MAGIC if data.startswith(magic)), "application/octet-stream")


async def sse_chunks(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any] | None]:
    """The JSON objects of an SSE stream's ``data:`` lines; None for ``[DONE]``."""
    async for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments (": ping"), event names
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise httpx.RemoteProtocolError(f"not JSON in the stream: {data[:80]!r}") from None
        if isinstance(chunk, dict):
            yield chunk


def error_of(raw: bytes) -> dict[str, Any]:
    """The ``error`` object of an error answer (OpenAI, vLLM and vlbridge shapes), or {}."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(body, dict):
        return {}
    error = body.get("error", body)  # vLLM's older shape: the fields at the top level
    return error if isinstance(error, dict) else {"message": str(error)}


_BY_STATUS = {400: "bad_request", 413: "too_large", 422: "bad_request", 408: "timeout", 504: "timeout"}


def failed_from(error: dict[str, Any], status: int = 0) -> Failed:
    """The project's `Failed` for an upstream's error object: its code when it is one of ours
    (another vlbridge), else by HTTP status (a refused request is a bad request)."""
    code = error.get("code")
    if isinstance(code, int) and not status:  # vLLM's errors in a stream carry their status
        status = code
    if not (isinstance(code, str) and code in ERROR_CODES):
        code = _BY_STATUS.get(status, "bad_request" if 400 <= status < 500 else "internal")
    message = str(error.get("message") or "the model server failed")
    return Failed(code, f"the model server: {message}", seconds_of(error.get("retry_after")))


def seconds_of(value: object) -> float | None:
    """A non-negative number of seconds from a header or a field, or None."""
    try:
        return max(0.0, float(value)) if value is not None else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
