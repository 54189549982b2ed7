"""Pure functions: a Feishu `im.message.receive_v1` event (a dict) -> `bot.types.InboundMessage`.

Handles `text` (with `@_user_N` placeholders), `image`, and `post` in both shapes: the flat
``{"title", "content": [[elements]]}`` Feishu delivers and the locale-keyed
``{"zh_cn": {...}}`` a bot sends (accepted too, e.g. from forwarded posts). A post may hold
a caption, @-mentions, one or several pictures (pasted screenshots arrive this way).
An `interactive` card is read as its text (`card_text`); a `merge_forward` bundle becomes
`MessageKind.FORWARD` (its messages are fetched when it is answered: `bot.feishu.references`).
Everything else (file, audio, sticker, ...) becomes `MessageKind.UNSUPPORTED`.
A reply's ``parent_id`` becomes `InboundMessage.quoted_id`.

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
    mentions = mentions_of(message.get("mentions"))
    message_type = str(message.get("message_type") or "")
    kind, text, images = read_body(message_type, message.get("content"), mentions, bot_id)
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
        quoted_id=str(message.get("parent_id") or ""),
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


def read_body(
    message_type: str, raw_content: Any, mentions: Mapping[str, tuple[str, str]], bot_id: str = ""
) -> tuple[MessageKind, str, tuple[str, ...]]:
    """(kind, text, image keys) of one message's content (a JSON string, or already a dict), as
    an event or ``GET /im/v1/messages/{id}`` carries it. A bundle's own content is a fixed
    placeholder ("Merged and Forwarded Message", not always JSON): never read."""
    if message_type == "merge_forward":
        return MessageKind.FORWARD, "", ()
    return _read_content(message_type, _content(raw_content), mentions, bot_id)


def mentions_of(raw: Any) -> dict[str, tuple[str, str]]:
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
    if message_type == "interactive":
        text = card_text(content)
        return (MessageKind.TEXT if text else MessageKind.UNSUPPORTED), text, ()
    return MessageKind.UNSUPPORTED, "", ()


_CARD_WORDS = frozenset({"plain_text", "lark_md", "markdown"})  # their words are in "content"
_CARD_CONTROLS = frozenset({"button", "action", "select_static", "overflow", "input", "date_picker"})


def card_text(content: Mapping[str, Any]) -> str:
    """The words of a card, one line per paragraph or text element (buttons and other controls
    left out). Two shapes: what a card message carries when received or fetched (a title and
    post-like paragraphs, ``{"title", "elements": [[{"tag": "text", ...}]]}``) and a card's own
    JSON (``header`` and ``elements``, or ``body.elements`` in schema 2.0)."""
    elements = content.get("elements")
    if isinstance(elements, list) and elements and all(isinstance(p, list) for p in elements):
        text, _ = parse_post({"title": content.get("title") or "", "content": elements})
        return text
    lines: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, Mapping):
            return
        tag = node.get("tag")
        if tag in _CARD_CONTROLS:
            return
        if tag in _CARD_WORDS and isinstance(node.get("content"), str):
            lines.append(node["content"])
            return
        if tag in ("text", "a") and isinstance(node.get("text"), str):
            lines.append(node["text"])
            return
        for key, value in node.items():
            if key not in ("tag", "config", "card_link", "behaviors"):
                visit(value)

    header = content.get("header")
    if isinstance(header, Mapping):
        visit(header.get("title"))
        visit(header.get("subtitle"))
    elif isinstance(content.get("title"), str):
        lines.append(content["title"])
    body = content.get("body")
    visit(body.get("elements") if isinstance(body, Mapping) else content.get("elements"))
    return "\n".join(line.strip() for line in lines if line.strip())


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
