"""Pure functions: a Feishu `im.message.receive_v1` event (a dict) -> `bot.types.InboundMessage`.

Handles `text` (with `@_user_N` placeholders), `image`, and `post` in both shapes: the flat
``{"title", "content": [[elements]]}`` Feishu delivers and the locale-keyed
``{"zh_cn": {...}}`` a bot sends (accepted too, e.g. from forwarded posts). A post may hold
a caption, @-mentions, one or several pictures (pasted screenshots arrive this way).
Everything else (file, audio, sticker, ...) becomes `MessageKind.UNSUPPORTED`.

`parse_event` raises `MalformedEvent` (never returns a half-parsed message) when the event
lacks what every message has; unknown element tags inside a post are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from bot.types import ChatType, InboundMessage, MessageKind
from server.errors import BadRequest

_PLACEHOLDER = re.compile(r"@_user_\d+")
_SPACES = re.compile(r"[ \t]+")


class MalformedEvent(BadRequest):
    """The event is not a message event this adapter can read (logged, never answered)."""


def parse_event(event: Mapping[str, Any], *, bot_id: str = "") -> InboundMessage:
    """Convert one event body (schema 2.0: ``{"header", "event": {"sender", "message"}}``).

    *bot_id* is the bot's own open_id: its @-mention is removed from the text (other people's
    mentions become ``@Name``).
    """
    body = event.get("event")
    if not isinstance(body, Mapping):
        raise MalformedEvent("event body missing")
    message = body.get("message")
    if not isinstance(message, Mapping) or not message.get("message_id") or not message.get("chat_id"):
        raise MalformedEvent("event.message with message_id and chat_id expected")
    sender = body.get("sender") or {}
    sender_ids = sender.get("sender_id") or {}
    mentions = _mentions(message.get("mentions"))
    message_type = str(message.get("message_type") or "")
    content = _content(message.get("content"))
    kind, text, images = _read_content(message_type, content, mentions, bot_id)
    chat_type = ChatType.GROUP if message.get("chat_type") == "group" else ChatType.PRIVATE
    try:
        created_at = int(str(message.get("create_time") or "0")) / 1000.0
    except ValueError:
        created_at = 0.0
    return InboundMessage(
        message_id=str(message["message_id"]),
        chat_id=str(message["chat_id"]),
        chat_type=chat_type,
        sender_id=str(sender_ids.get("open_id") or sender_ids.get("user_id") or ""),
        kind=kind,
        text=text,
        image_keys=images,
        mentioned=tuple(open_id for open_id, _ in mentions.values() if open_id),
        thread_id=str(message.get("thread_id") or ""),
        root_id=str(message.get("root_id") or ""),
        created_at=created_at,
        raw_type=message_type,
    )


_LEADING_MENTIONS = re.compile(r"^(?:\s*@_user_\d+)*\s*")


def is_command(event: Mapping[str, Any]) -> bool:
    """A text message whose first word after any @-mentions starts with ``/``: a command
    (``/cancel`` must not wait in its chat's queue behind the answer it stops)."""
    message = (event.get("event") or {}).get("message") or {}
    if message.get("message_type") != "text":
        return False
    try:
        text = str(_content(message.get("content")).get("text") or "")
    except MalformedEvent:
        return False
    return _LEADING_MENTIONS.sub("", text, count=1).startswith("/")


def _mentions(raw: Any) -> dict[str, tuple[str, str]]:
    """``{"@_user_1": (open_id, name)}`` from ``message.mentions``."""
    found: dict[str, tuple[str, str]] = {}
    for item in raw or ():
        if not isinstance(item, Mapping) or not item.get("key"):
            continue
        ids = item.get("id") or {}
        open_id = ids.get("open_id", "") if isinstance(ids, Mapping) else str(ids)
        found[str(item["key"])] = (str(open_id or ""), str(item.get("name") or ""))
    return found


def _content(raw: Any) -> Mapping[str, Any]:
    if isinstance(raw, Mapping):
        return raw
    try:
        value = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        raise MalformedEvent("message content is not JSON") from None
    return value if isinstance(value, Mapping) else {}


def _read_content(
    message_type: str, content: Mapping[str, Any], mentions: Mapping[str, tuple[str, str]], bot_id: str
) -> tuple[MessageKind, str, tuple[str, ...]]:
    if message_type == "text":
        text = _replace_mentions(str(content.get("text") or ""), mentions, bot_id)
        return MessageKind.TEXT, text, ()
    if message_type == "image":
        key = str(content.get("image_key") or "")
        if not key:
            raise MalformedEvent("image message without image_key")
        return MessageKind.IMAGE, "", (key,)
    if message_type == "post":
        text, images = parse_post(content, mentions, bot_id)
        return (MessageKind.IMAGE if images else MessageKind.TEXT), text, images
    return MessageKind.UNSUPPORTED, "", ()


def _post_body(content: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``{"title", "content"}`` part of a post, whichever shape it came in."""
    if isinstance(content.get("content"), list):
        return content
    inner = content.get("post")
    if isinstance(inner, Mapping):
        content = inner
    for locale in ("zh_cn", "en_us", "ja_jp", *content.keys()):
        body = content.get(locale)
        if isinstance(body, Mapping) and isinstance(body.get("content"), list):
            return body
    return {}


def parse_post(
    content: Mapping[str, Any], mentions: Mapping[str, tuple[str, str]] = {}, bot_id: str = ""
) -> tuple[str, tuple[str, ...]]:
    """Return (text, image keys) of a post; paragraphs become lines, the bot's @ disappears."""
    body = _post_body(content)
    lines: list[str] = []
    title = str(body.get("title") or "").strip()
    if title:
        lines.append(title)
    images: list[str] = []
    for paragraph in body.get("content") or ():
        parts: list[str] = []
        for element in paragraph if isinstance(paragraph, list) else ():
            if not isinstance(element, Mapping):
                continue
            tag = element.get("tag")
            if tag in ("text", "a", "code_block", "md"):
                parts.append(str(element.get("text") or ""))
            elif tag == "at":
                parts.append(_at_text(element, mentions, bot_id))
            elif tag == "img" and element.get("image_key"):
                images.append(str(element["image_key"]))
            elif tag == "emotion" and element.get("emoji_type"):
                parts.append(f":{element['emoji_type']}:")
        line = _SPACES.sub(" ", "".join(parts)).strip()
        if line:
            lines.append(line)
    return "\n".join(lines), tuple(images)


def _at_text(element: Mapping[str, Any], mentions: Mapping[str, tuple[str, str]], bot_id: str) -> str:
    key = str(element.get("user_id") or "")
    open_id, name = mentions.get(key, (key, str(element.get("user_name") or "")))
    if bot_id and open_id == bot_id:
        return ""
    name = name or str(element.get("user_name") or "")
    return f"@{name}" if name else ""


def _replace_mentions(text: str, mentions: Mapping[str, tuple[str, str]], bot_id: str) -> str:
    def replace(match: re.Match[str]) -> str:
        open_id, name = mentions.get(match.group(0), ("", ""))
        if bot_id and open_id == bot_id:
            return ""
        return f"@{name}" if name else ""

    return _SPACES.sub(" ", _PLACEHOLDER.sub(replace, text)).strip()
