"""Platform state the routes consult: tenant tokens, known messages, their resources, send uuids,
the scopes granted to the app.

Thread-safe: routes run on the server thread, tests seed state from theirs. Unlike ``Records`` this is
the platform's own bookkeeping, not an observation of the bot.
"""

from __future__ import annotations

import json
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Any

from . import codes, ids
from .codes import ApiError


@dataclass(frozen=True)
class KnownMessage:
    message_id: str
    chat_id: str
    chat_type: str
    msg_type: str
    content: str
    root_id: str = ""
    thread_id: str = ""
    from_bot: bool = False
    parent_id: str = ""
    upper_message_id: str = ""  # the bundle (merge_forward) this message was forwarded in
    sender_open_id: str = ""
    mentions: tuple[dict[str, Any], ...] = ()  # as ``GET /im/v1/messages/{id}`` lists them
    create_time: str = ""


@dataclass(frozen=True)
class Resource:
    data: bytes
    kind: str  # "image" | "file", the ``type`` query value that must be used to fetch it
    file_name: str
    content_type: str


def tiny_png() -> bytes:
    """A valid 1x1 white PNG, served for image keys a test did not give bytes for."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\xff\xff")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def sniff_content_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def resource_keys(msg_type: str, content: Any) -> dict[str, str]:
    """``{key: kind}`` for every downloadable key a received message's content refers to."""
    if not isinstance(content, dict):
        return {}
    keys: dict[str, str] = {}
    if msg_type == "image" and "image_key" in content:
        keys[content["image_key"]] = "image"
    elif msg_type in ("file", "audio", "media", "sticker") and "file_key" in content:
        keys[content["file_key"]] = "file"
        if msg_type == "media" and "image_key" in content:
            keys[content["image_key"]] = "image"
    elif msg_type == "post":
        body = (
            content
            if "content" in content
            else next((v for v in content.values() if isinstance(v, dict)), {})
        )
        for paragraph in body.get("content", []):
            for element in paragraph:
                if element.get("tag") == "img" and "image_key" in element:
                    keys[element["image_key"]] = "image"
                elif element.get("tag") == "media" and "file_key" in element:
                    keys[element["file_key"]] = "file"
    return keys


# What the app may do, by scope; all are granted unless a test revokes one (``revoke_scope``).
READ_SCOPES = ("im:message", "im:message:readonly")  # either one reads messages (p2p)
GROUP_SCOPE = "im:message.group_msg"  # needed as well to read a group's messages
SCOPES = frozenset({*READ_SCOPES, GROUP_SCOPE, "im:message:send_as_bot", "cardkit:card:write"})


class PlatformState:
    """Tokens, messages, resources and idempotency keys of one fake tenant."""

    def __init__(self, *, app_id: str, app_secret: str, token_expire_s: int) -> None:
        self.app_id = app_id
        self.app_secret = app_secret
        self.token_expire_s = token_expire_s
        self._lock = threading.Lock()
        self._tokens: set[str] = set()
        self._messages: dict[str, KnownMessage] = {}
        self._resources: dict[tuple[str, str], Resource] = {}
        self._send_uuids: dict[str, str] = {}
        self.scopes: set[str] = set(SCOPES)

    # -- tokens ----------------------------------------------------------------------------------

    def issue_token(self, app_id: str, app_secret: str) -> str:
        if app_id != self.app_id:
            raise ApiError(codes.APP_ID_INVALID, "invalid param: app_id", status=400)
        if app_secret != self.app_secret:
            raise ApiError(codes.APP_SECRET_INVALID, "app secret invalid", status=400)
        token = ids.tenant_token()
        with self._lock:
            self._tokens.add(token)
        return token

    def check_token(self, authorization: str | None) -> str:
        """Return the bearer token or raise the platform's 99991661 / 99991663 error."""
        if not authorization or not authorization.startswith("Bearer ") or not authorization[7:].strip():
            raise ApiError(codes.TOKEN_MISSING, "Missing access token for authorization.", status=400)
        token = authorization[7:].strip()
        with self._lock:
            valid = token in self._tokens
        if not valid:
            raise ApiError(codes.TOKEN_INVALID, "Invalid access token for authorization.", status=400)
        return token

    def invalidate_tokens(self) -> int:
        """Invalidate every issued token (as Feishu does early at times); returns how many."""
        with self._lock:
            count = len(self._tokens)
            self._tokens.clear()
        return count

    # -- messages and resources -----------------------------------------------------------------

    def add_message(self, message: KnownMessage) -> None:
        with self._lock:
            self._messages[message.message_id] = message

    def message(self, message_id: str) -> KnownMessage | None:
        with self._lock:
            return self._messages.get(message_id)

    def forwarded_in(self, bundle_id: str) -> list[KnownMessage]:
        """Every message inside bundle *bundle_id*, nested bundles' too (flat: level by level)."""
        with self._lock:
            messages = list(self._messages.values())
        found: list[KnownMessage] = []
        uppers = {bundle_id}
        while True:
            more = [m for m in messages if m.upper_message_id in uppers and m.message_id not in uppers]
            if not more:
                return found
            found.extend(more)
            uppers.update(m.message_id for m in more)

    def check_read(self, message: KnownMessage) -> None:
        """Raise what the platform answers when the app may not read *message*."""
        with self._lock:
            scopes = set(self.scopes)
        if not scopes & set(READ_SCOPES):
            raise ApiError(
                codes.SCOPE_MISSING,
                f"Access denied. One of the following scopes is required: [{', '.join(READ_SCOPES)}].",
            )
        if message.chat_type == "group" and GROUP_SCOPE not in scopes:
            raise ApiError(codes.IM_NO_PERMISSION, "Lack of necessary permissions.")

    def add_resource(
        self,
        message_id: str,
        key: str,
        data: bytes,
        *,
        kind: str = "image",
        file_name: str | None = None,
        content_type: str | None = None,
    ) -> None:
        if kind not in ("image", "file"):
            raise ValueError(f"expected kind 'image' or 'file', got {kind!r}")
        resource = Resource(
            data=data,
            kind=kind,
            file_name=file_name or key,
            content_type=content_type or sniff_content_type(data),
        )
        with self._lock:
            self._resources[(message_id, key)] = resource

    def resource(self, message_id: str, key: str) -> Resource | None:
        with self._lock:
            return self._resources.get((message_id, key))

    def register_event(
        self,
        event: dict[str, Any],
        resources: dict[str, bytes] | None = None,
        *,
        upper_message_id: str = "",
    ) -> KnownMessage:
        """Make the message of an ``im.message.receive_v1`` event known, with its resources
        (*upper_message_id*: the bundle it is forwarded in).

        Keys referred to by the content get the bytes in ``resources``; keys without bytes get a 1x1
        PNG (images) or a few placeholder bytes (files). A ``resources`` key the content does not name
        raises ``ValueError``: the platform would refuse to serve it for this message.
        """
        msg = event["event"]["message"]
        # A bundle's content is a fixed placeholder, not JSON ("Merged and Forwarded Message").
        content = {} if msg["message_type"] == "merge_forward" else json.loads(msg["content"])
        sender = event["event"].get("sender") or {}
        known = KnownMessage(
            message_id=msg["message_id"],
            chat_id=msg["chat_id"],
            chat_type=msg["chat_type"],
            msg_type=msg["message_type"],
            content=msg["content"],
            root_id=msg.get("root_id", ""),
            thread_id=msg.get("thread_id", ""),
            parent_id=msg.get("parent_id", ""),
            upper_message_id=upper_message_id,
            sender_open_id=(sender.get("sender_id") or {}).get("open_id", ""),
            mentions=tuple(
                {
                    "key": m["key"],
                    "id": m["id"]["open_id"],
                    "id_type": "open_id",
                    "name": m["name"],
                    "tenant_key": m.get("tenant_key", ""),
                }
                for m in msg.get("mentions", ())
            ),
            create_time=msg.get("create_time", ""),
        )
        self.add_message(known)
        given = dict(resources or {})
        for key, kind in resource_keys(known.msg_type, content).items():
            data = given.pop(key, None)
            if data is None:
                data = tiny_png() if kind == "image" else b"fakefeishu placeholder file\n"
            self.add_resource(known.message_id, key, data, kind=kind)
        if given:
            raise ValueError(f"resources {sorted(given)} are not referred to by message {known.message_id}")
        return known

    # -- idempotency ------------------------------------------------------------------------------

    def claim_send_uuid(self, uuid: str, message_id: str) -> str | None:
        """Remember ``uuid`` -> ``message_id``; return the earlier message id if ``uuid`` was used."""
        if not uuid:
            return None
        with self._lock:
            earlier = self._send_uuids.get(uuid)
            if earlier is None:
                self._send_uuids[uuid] = message_id
            return earlier
