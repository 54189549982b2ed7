"""Message content validation, as the IM send APIs apply it (pure functions).

``content`` is the JSON object inside the request's ``content`` string. What the bot sends differs
from what it receives for posts: a sent post is locale-keyed (``{"zh_cn": {"title", "content"}}``);
the flat received shape is accepted as well.
"""

from __future__ import annotations

import json
from typing import Any

from . import codes
from .codes import ApiError

MSG_TYPES = frozenset(
    {
        "text",
        "post",
        "image",
        "file",
        "audio",
        "media",
        "sticker",
        "interactive",
        "share_chat",
        "share_user",
        "system",
    }
)
TEXT_LIMIT = 150 * 1024
CARD_LIMIT = 30 * 1024


def parse_content(msg_type: str, raw: str) -> dict[str, Any]:
    """Parse and check a request's ``content`` string; raises ``ApiError`` as the platform would."""
    try:
        content = json.loads(raw)
    except ValueError as exc:
        raise ApiError(codes.IM_INVALID_PARAM, f"content is not valid JSON: {exc}") from exc
    if not isinstance(content, dict):
        raise ApiError(codes.IM_INVALID_PARAM, "content must be a JSON object")
    check_content(msg_type, content)
    limit = CARD_LIMIT if msg_type == "interactive" else TEXT_LIMIT
    size = len(raw.encode())
    if size > limit:
        raise ApiError(codes.IM_CONTENT_TOO_LONG, f"message content too long ({size} > {limit} bytes)")
    return content


def check_content(msg_type: str, content: dict[str, Any]) -> None:
    """Raise the platform's invalid-param error when ``content`` does not fit ``msg_type``."""
    if msg_type not in MSG_TYPES:
        raise ApiError(codes.IM_INVALID_PARAM, f"invalid msg_type: {msg_type}")
    problem = ""
    if msg_type == "text":
        if not isinstance(content.get("text"), str):
            problem = 'text content needs a string "text"'
    elif msg_type == "post":
        bodies = [content] if "content" in content else [v for v in content.values() if isinstance(v, dict)]
        if not bodies or not all(_is_paragraphs(b.get("content")) for b in bodies):
            problem = "post content needs {locale: {title, content: [[elements]]}}"
    elif msg_type == "image":
        if not isinstance(content.get("image_key"), str):
            problem = 'image content needs "image_key"'
    elif msg_type in ("file", "audio", "media", "sticker"):
        if not isinstance(content.get("file_key"), str):
            problem = f'{msg_type} content needs "file_key"'
    elif msg_type == "interactive":
        if content.get("type") == "card":
            data = content.get("data")
            if not isinstance(data, dict) or not isinstance(data.get("card_id"), str):
                problem = 'card reference needs {"type": "card", "data": {"card_id": ...}}'
        elif content.get("type") == "template":
            if not isinstance(content.get("data"), dict):
                problem = 'template card needs "data"'
        elif not any(k in content for k in ("elements", "body", "header", "schema", "i18n_elements")):
            problem = "interactive content is neither a card JSON nor a card reference"
    if problem:
        raise ApiError(codes.IM_INVALID_PARAM, f"invalid message content: {problem}")


def _is_paragraphs(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(p, list) and all(isinstance(e, dict) and "tag" in e for e in p) for p in value
    )
