"""Builders for ``im.message.receive_v1`` event bodies, shaped as Feishu sends them (schema 2.0).

The same dict goes over the long connection (as JSON bytes) and into webhook bodies (encrypted or
not, see ``webhook``). Keys Feishu leaves out when empty are left out here too: ``root_id``,
``parent_id`` and ``thread_id`` appear only on replies / thread messages, ``mentions`` only when
someone is mentioned, so the product must cope with them missing.

Message content is a JSON *string* inside the event; received posts use the flat shape
``{"title": "", "content": [[elements]]}`` (the locale-keyed shape is what a bot sends).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import ids


@dataclass(frozen=True)
class User:
    """A chat member as it appears in ``sender_id`` and ``mentions[].id``."""

    name: str = "Test User"
    open_id: str = field(default_factory=ids.open_id)
    union_id: str = field(default_factory=ids.union_id)
    user_id: str = field(default_factory=ids.user_id)

    def id_block(self) -> dict[str, str]:
        return {"union_id": self.union_id, "user_id": self.user_id, "open_id": self.open_id}


# -- post elements, received shape ----------------------------------------------------------------


def post_text(text: str) -> dict[str, Any]:
    return {"tag": "text", "text": text, "style": []}


def post_at(key: str, name: str) -> dict[str, Any]:
    """An @ inside a post; ``key`` is the ``@_user_N`` placeholder of the matching mention."""
    return {"tag": "at", "user_id": key, "user_name": name, "style": []}


def post_img(image_key: str, width: int = 800, height: int = 600) -> dict[str, Any]:
    return {"tag": "img", "image_key": image_key, "width": width, "height": height}


class EventFactory:
    """Builds event bodies for one app; every builder returns a fresh dict with new ids.

    ``bot`` is the identity used when a builder is asked to @ the bot (use the fake's bot open_id so
    the product recognises itself); ``sender`` is the default author.
    """

    def __init__(
        self,
        *,
        app_id: str = "cli_fakefeishu",
        token: str = "fake-verification-token",
        tenant_key: str = "fake-tenant",
        bot: User | None = None,
        sender: User | None = None,
    ) -> None:
        self.app_id = app_id
        self.token = token
        self.tenant_key = tenant_key
        self.bot = bot or User(name="vlbridge-test-bot")
        self.sender = sender or User()

    def message(
        self,
        message_type: str,
        content: Mapping[str, Any],
        *,
        chat_type: str = "p2p",
        chat_id: str | None = None,
        message_id: str | None = None,
        root_id: str = "",
        parent_id: str = "",
        thread_id: str = "",
        mentions: Sequence[User] = (),
        sender: User | None = None,
        create_time_ms: int | None = None,
        event_id: str | None = None,
    ) -> dict[str, Any]:
        """The general builder; ``mentions[i]`` gets the placeholder key ``@_user_{i+1}``."""
        if chat_type not in ("p2p", "group"):
            raise ValueError(f"expected chat_type 'p2p' or 'group', got {chat_type!r}")
        author = sender or self.sender
        created = str(create_time_ms if create_time_ms is not None else ids.now_ms())
        message: dict[str, Any] = {"message_id": message_id or ids.message_id()}
        if root_id:
            message["root_id"] = root_id
        if parent_id:
            message["parent_id"] = parent_id
        message.update(
            {
                "create_time": created,
                "update_time": created,
                "chat_id": chat_id or ids.chat_id(),
            }
        )
        if thread_id:
            message["thread_id"] = thread_id
        message.update(
            {
                "chat_type": chat_type,
                "message_type": message_type,
                "content": json.dumps(dict(content), ensure_ascii=False),
            }
        )
        if mentions:
            message["mentions"] = [
                {
                    "key": f"@_user_{i}",
                    "id": user.id_block(),
                    "name": user.name,
                    "tenant_key": self.tenant_key,
                }
                for i, user in enumerate(mentions, start=1)
            ]
        message["user_agent"] = "Mozilla/5.0 (Macintosh) Lark/7.30.0"
        return {
            "schema": "2.0",
            "header": {
                "event_id": event_id or ids.event_id(),
                "token": self.token,
                "create_time": created,
                "event_type": "im.message.receive_v1",
                "tenant_key": self.tenant_key,
                "app_id": self.app_id,
            },
            "event": {
                "sender": {
                    "sender_id": author.id_block(),
                    "sender_type": "user",
                    "tenant_key": self.tenant_key,
                },
                "message": message,
            },
        }

    def text(
        self, text: str, *, mention_bot: bool = False, mentions: Sequence[User] = (), **kw: Any
    ) -> dict[str, Any]:
        """A text message; ``mention_bot`` prefixes ``@_user_1 `` and mentions the bot first."""
        if mention_bot:
            mentions = (self.bot, *mentions)
            text = f"@_user_1 {text}"
        return self.message("text", {"text": text}, mentions=mentions, **kw)

    def image(self, image_key: str | None = None, **kw: Any) -> dict[str, Any]:
        """A lone picture (it cannot carry a caption or an @; those arrive as ``post``)."""
        return self.message("image", {"image_key": image_key or ids.image_key()}, **kw)

    def post(
        self,
        paragraphs: Sequence[Sequence[Mapping[str, Any]]],
        *,
        title: str = "",
        mentions: Sequence[User] = (),
        **kw: Any,
    ) -> dict[str, Any]:
        content = {"title": title, "content": [[dict(el) for el in p] for p in paragraphs]}
        return self.message("post", content, mentions=mentions, **kw)

    def captioned_image(
        self, text: str, image_keys: Sequence[str] = (), *, mention_bot: bool = False, **kw: Any
    ) -> dict[str, Any]:
        """What a picture with a caption (or a pasted screenshot) looks like: a ``post``."""
        first: list[dict[str, Any]] = []
        mentions: tuple[User, ...] = ()
        if mention_bot:
            first.append(post_at("@_user_1", self.bot.name))
            mentions = (self.bot,)
        first.append(post_text(f" {text}" if mention_bot else text))
        keys = list(image_keys) or [ids.image_key()]
        return self.post([first, *[[post_img(k)] for k in keys]], mentions=mentions, **kw)

    def merge_forward(self, **kw: Any) -> dict[str, Any]:
        """A bundle of forwarded messages (its content is a fixed placeholder, not JSON); make its
        messages known with ``FakeFeishu.forward``."""
        event = self.message("merge_forward", {}, **kw)
        event["event"]["message"]["content"] = "Merged and Forwarded Message"
        return event

    def card(self, title: str, lines: Sequence[str], **kw: Any) -> dict[str, Any]:
        """An interactive card message as it is received: a title and post-like paragraphs (a
        button's label among them, as cards carry them)."""
        paragraphs = [[post_text(line)] for line in lines]
        paragraphs.append([{"tag": "button", "text": "Open"}])
        return self.message("interactive", {"title": title, "elements": paragraphs}, **kw)

    def file(self, file_key: str | None = None, file_name: str = "report.pdf", **kw: Any) -> dict[str, Any]:
        return self.message("file", {"file_key": file_key or ids.file_key(), "file_name": file_name}, **kw)

    def audio(self, file_key: str | None = None, duration_ms: int = 2000, **kw: Any) -> dict[str, Any]:
        return self.message("audio", {"file_key": file_key or ids.file_key(), "duration": duration_ms}, **kw)

    def sticker(self, file_key: str | None = None, **kw: Any) -> dict[str, Any]:
        return self.message("sticker", {"file_key": file_key or ids.file_key()}, **kw)

    def card_action(
        self,
        value: Mapping[str, Any],
        *,
        operator: User | None = None,
        open_message_id: str,
        open_chat_id: str,
        event_id: str | None = None,
    ) -> dict[str, Any]:
        """A button press on a card (``card.action.trigger``, the new card callback): the platform
        sends it as an event (a data frame of type ``event`` on the long connection, a POST by
        webhook) and shows the toast of the answer."""
        presser = operator or self.sender
        created = str(ids.now_ms())
        return {
            "schema": "2.0",
            "header": {
                "event_id": event_id or ids.event_id(),
                "token": self.token,
                "create_time": created,
                "event_type": "card.action.trigger",
                "tenant_key": self.tenant_key,
                "app_id": self.app_id,
            },
            "event": {
                "operator": {"tenant_key": self.tenant_key, **presser.id_block()},
                "token": f"c-{ids.event_id()}",
                "action": {"value": dict(value), "tag": "button"},
                "host": "im_message",
                "context": {"open_message_id": open_message_id, "open_chat_id": open_chat_id},
            },
        }

    def url_verification(self, challenge: str = "fakefeishu-challenge") -> dict[str, Any]:
        """The body Feishu posts when the webhook URL is configured (answer ``{"challenge": ...}``)."""
        return {"challenge": challenge, "token": self.token, "type": "url_verification"}


def event_id_of(event: Mapping[str, Any]) -> str:
    return str(event["header"]["event_id"])


def message_of(event: Mapping[str, Any]) -> dict[str, Any]:
    return dict(event["event"]["message"])
