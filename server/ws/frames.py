"""Protocol v1 frames: client frames parsed and validated, server frames encoded (sans-I/O).

`parse_client_frame(raw, limits)` turns one WebSocket message into a typed frame or
raises `InvalidFrame` carrying the wire error code, a sentence for the sender and, when
it could be read, the ask id. It never touches a socket or a clock; the endpoint answers
an `InvalidFrame` with an error frame and keeps the session. docs/protocol.md is the
contract this module implements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from protocol.pictures import PictureRejected, decode_base64
from protocol.v1 import MAX_ID_CHARS, MAX_TEXT_CHARS, ClientFrameType
from server.errors import VlbridgeError
from server.inference.api import SamplingParams, Turn, value

# Ids end up in log lines and in the client's display: no control characters (C0, DEL,
# C1: newlines, ANSI escapes) and no Unicode line or paragraph separators.
_ID_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True, slots=True)
class FrameLimits:
    max_images: int = 8
    max_image_bytes: int = 20 * 1024 * 1024


DEFAULT_PARAMS = SamplingParams()  # greedy, the configured length: most asks set neither


@value
class Ask:
    id: str
    question: Turn
    params: SamplingParams = DEFAULT_PARAMS


@dataclass(frozen=True, slots=True)
class Cancel:
    id: str


@dataclass(frozen=True, slots=True)
class Reset:
    pass


@dataclass(frozen=True, slots=True)
class Ping:
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class Pong:
    ts: float | None = None


ClientFrame = Ask | Cancel | Reset | Ping | Pong


class InvalidFrame(VlbridgeError):
    """A client frame the server will not act on; the session stays usable."""

    def __init__(self, code: str, message: str, ask_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ask_id = ask_id


def encode(frame: dict[str, Any]) -> bytes:
    return orjson.dumps(frame)


def parse_client_frame(raw: str | bytes, limits: FrameLimits) -> ClientFrame:
    """Parse one text message; raise `InvalidFrame` (bad_request, bad_image or too_large)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidFrame("bad_request", f"the frame is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidFrame("bad_request", f"a frame must be a JSON object, not {type(data).__name__}")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise InvalidFrame("bad_request", 'a frame needs a string "type"')
    if kind == "ask":
        return _ask(data, limits)
    if kind == "cancel":
        return Cancel(_id(data))
    if kind == "reset":
        return Reset()
    if kind == "ping":
        return Ping(_number(data, "ts", None))
    if kind == "pong":
        return Pong(_number(data, "ts", None))
    raise InvalidFrame(
        "bad_request", f"unknown frame type {kind[:40]!r}; expected one of {', '.join(ClientFrameType)}"
    )


def _id(data: dict[str, Any]) -> str:
    value = data.get("id")
    if not isinstance(value, str) or not value:
        raise InvalidFrame("bad_request", 'this frame needs a non-empty string "id"')
    if len(value) > MAX_ID_CHARS:
        raise InvalidFrame("bad_request", f'"id" is longer than {MAX_ID_CHARS} characters')
    if _ID_FORBIDDEN.search(value):
        raise InvalidFrame("bad_request", '"id" must not contain control characters (newlines, escapes)')
    return value


def _number(data: dict[str, Any], key: str, ask_id: str | None) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidFrame("bad_request", f'"{key}" must be a number', ask_id)
    return float(value)


def _ask(data: dict[str, Any], limits: FrameLimits) -> Ask:
    ask_id = _id(data)
    text = data.get("text", "")
    if not isinstance(text, str):
        raise InvalidFrame("bad_request", '"text" must be a string', ask_id)
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidFrame("too_large", f"the question is longer than {MAX_TEXT_CHARS} characters", ask_id)
    raw_images = data.get("images", [])
    if not isinstance(raw_images, list) or (raw_images and not all(isinstance(i, str) for i in raw_images)):
        raise InvalidFrame("bad_request", '"images" must be a list of base64 strings', ask_id)
    if len(raw_images) > limits.max_images:
        raise InvalidFrame(
            "too_large",
            f"{len(raw_images)} pictures in one question; at most {limits.max_images} are accepted",
            ask_id,
        )
    if not text.strip() and not raw_images:
        raise InvalidFrame("bad_request", "an ask needs a question, a picture or both", ask_id)
    images = _pictures(raw_images, limits.max_image_bytes, ask_id) if raw_images else ()
    tuned = "max_tokens" in data or "temperature" in data  # most asks set neither
    return Ask(ask_id, Turn("user", text, images), _params(data, ask_id) if tuned else DEFAULT_PARAMS)


def _pictures(raw_images: list[str], max_bytes: int, ask_id: str) -> tuple[bytes, ...]:
    try:
        return tuple(
            decode_base64(item, number, max_bytes) for number, item in enumerate(raw_images, start=1)
        )
    except PictureRejected as exc:
        raise InvalidFrame(exc.code, exc.message, ask_id) from None


def _params(data: dict[str, Any], ask_id: str) -> SamplingParams:
    max_tokens = _number(data, "max_tokens", ask_id)
    if max_tokens is not None and (max_tokens < 1 or max_tokens != int(max_tokens)):
        raise InvalidFrame("bad_request", '"max_tokens" must be a positive integer', ask_id)
    temperature = _number(data, "temperature", ask_id)
    if temperature is not None and not 0 <= temperature <= 2:
        raise InvalidFrame("bad_request", '"temperature" must be between 0 and 2', ask_id)
    if max_tokens is None and temperature is None:
        return DEFAULT_PARAMS
    return SamplingParams(None if max_tokens is None else int(max_tokens), temperature or 0.0)
