"""Executor events as wire objects: the same shapes on WebSocket frames and SSE events.

Pure functions at the transport edge; `server.inference.api` stays transport-neutral.
"""

from __future__ import annotations

from typing import Any

from server.errors import RequestError
from server.inference.api import Delta, Done, Event, Failed, Queued, Reading, Started, Usage


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "image_tokens": usage.image_tokens,
        "total_tokens": usage.total_tokens,
    }


def error_dict(code: str, message: str, retry_after: float | None = None, **extra: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", **extra, "code": code, "message": message}
    if retry_after is not None:
        frame["retry_after"] = round(retry_after, 1)
    return frame


def error_from(exc: RequestError, **extra: Any) -> dict[str, Any]:
    return error_dict(exc.code, exc.message, exc.retry_after, **extra)


def event_dict(ask_id: str, event: Event) -> dict[str, Any]:
    """The wire object for one executor event of the ask *ask_id* (no `seq`)."""
    if isinstance(event, Delta):
        return {"type": "delta", "id": ask_id, "text": event.text}
    if isinstance(event, Queued):
        frame: dict[str, Any] = {"type": "queued", "id": ask_id, "position": event.position}
        if event.eta is not None:
            frame["eta"] = event.eta
        return frame
    if isinstance(event, Started):
        return {"type": "started", "id": ask_id}
    if isinstance(event, Reading):
        return {"type": "reading", "id": ask_id}
    if isinstance(event, Done):
        return {
            "type": "done",
            "id": ask_id,
            "text": event.text,
            "finish_reason": event.finish_reason,  # a StrEnum: orjson writes it as its string
            "usage": usage_dict(event.usage),
            "timings": {  # already rounded to 0.1 ms by the executor
                "queued": event.timings.queued,
                "first_token": event.timings.first_token,
                "total": event.timings.total,
            },
        }
    assert isinstance(event, Failed)
    return error_dict(event.code, event.message, event.retry_after, id=ask_id)
