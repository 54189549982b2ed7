"""What a Feishu message refers to, read when it is answered: the message it quotes, or the
bundle (``merge_forward``) it forwards, as a platform-neutral `bot.types.Referenced`.

One call per message: ``GET /open-apis/im/v1/messages/{id}`` answers a message as a list of
items, the message first; for a bundle every message inside it follows, those of nested
bundles too, each naming the bundle that holds it in ``upper_message_id``. A picture inside a
bundle is downloaded with the id of the item that holds it (`PictureRef`).

Bounds: one level of quote (a quoted message's own quote is not followed); a bundle is read to
`MAX_DEPTH` levels of nesting and `MAX_MESSAGES` messages in reading order, pictures up to what
the question has room for; what is not read is counted (`left_out_*`) so the answer can say so.
Kinds the bot cannot read (files, stickers, ...) inside a bundle are counted as left out too.

`read_bundle` and `read_quoted` are pure; `ReferenceReader` adds the call and translates the
platform's refusals into `ReferenceUnreadable`, naming the missing permission when that is why.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from bot.feishu.messages import MalformedEvent, mentions_of, read_body
from bot.feishu.openapi import FeishuApi, FeishuApiError
from bot.types import (
    ChatType,
    InboundMessage,
    MessageKind,
    PictureRef,
    Referenced,
    ReferenceUnreadable,
    Unreadable,
)

log = logging.getLogger("vlbridge.feishu")

MAX_DEPTH = 2  # a bundle inside the bundle is read; one inside that is left out
MAX_MESSAGES = 20  # messages of a bundle read, in reading order

# 99991672 (tenant) / 99991679 (user): the app lacks a scope, listed in the message;
# 230027: "Lack of necessary permissions" (e.g. a group message without im:message.group_msg).
PERMISSION_CODES = frozenset({99991672, 99991679, 230027})
# 230001 invalid message_id, 230002 the bot is not in that chat, 230050 invisible to the bot.
GONE_CODES = frozenset({230001, 230002, 230050})
GROUP_SCOPE = "im:message.group_msg"  # read every message of a group, not only those to the bot
READ_SCOPE = "im:message:readonly"
_SCOPES = re.compile(r"\[\s*([a-z][\w.:-]*(?:\s*,\s*[a-z][\w.:-]*)*)\s*\]")


class _Item:
    """One fetched message: its kind, words and pictures (unreadable content reads as nothing)."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.id = str(raw.get("message_id") or "")
        self.type = str(raw.get("msg_type") or raw.get("message_type") or "")
        self.upper = str(raw.get("upper_message_id") or "")
        try:
            self.created = int(str(raw.get("create_time") or "0"))
        except ValueError:
            self.created = 0
        body = raw.get("body")
        content = body.get("content") if isinstance(body, Mapping) else raw.get("content")
        try:
            self.kind, self.text, self.keys = read_body(self.type, content, mentions_of(raw.get("mentions")))
        except MalformedEvent:
            self.kind, self.text, self.keys = MessageKind.UNSUPPORTED, "", ()
        if raw.get("deleted"):
            self.kind, self.text, self.keys = MessageKind.UNSUPPORTED, "", ()

    @property
    def readable(self) -> bool:
        return self.kind is not MessageKind.UNSUPPORTED


class _Collector:
    """Pictures, words and left-out counts, in reading order, within the picture budget."""

    def __init__(self, max_pictures: int) -> None:
        self.room = max_pictures
        self.pictures: list[PictureRef] = []
        self.texts: list[str] = []
        self.left_messages = 0
        self.left_pictures = 0

    def take(self, item: _Item) -> None:
        if not item.readable:
            self.left_messages += 1
            return
        if item.text:
            self.texts.append(item.text)
        keys = item.keys[: self.room]
        self.left_pictures += len(item.keys) - len(keys)
        self.room -= len(keys)
        if keys:
            self.pictures.append(PictureRef(item.id, keys))

    def leave(self, item: _Item) -> None:
        self.left_messages += 1
        self.left_pictures += len(item.keys)


def read_quoted(
    items: Sequence[Mapping[str, Any]],
    quoted_id: str,
    *,
    max_pictures: int,
    max_depth: int = MAX_DEPTH,
    max_messages: int = MAX_MESSAGES,
) -> Referenced:
    """The quoted message's words and pictures; a quoted bundle is read as `read_bundle` does.
    Raises `ReferenceUnreadable` (gone) when the answer lacks the message or it was deleted."""
    first = next((raw for raw in items if raw.get("message_id") == quoted_id), None)
    if first is None or first.get("deleted"):
        raise ReferenceUnreadable(Unreadable.GONE, f"message {quoted_id} is not in the answer, or deleted")
    item = _Item(first)
    if item.kind is MessageKind.FORWARD:
        return read_bundle(
            items, quoted_id, max_pictures=max_pictures, max_depth=max_depth, max_messages=max_messages
        )
    collected = _Collector(max_pictures)
    collected.take(item)
    return Referenced(
        pictures=tuple(collected.pictures),
        quoted=item.text,
        left_out_messages=collected.left_messages,
        left_out_pictures=collected.left_pictures,
    )


def read_bundle(
    items: Sequence[Mapping[str, Any]],
    bundle_id: str,
    *,
    max_pictures: int,
    max_depth: int = MAX_DEPTH,
    max_messages: int = MAX_MESSAGES,
) -> Referenced:
    """The messages inside bundle *bundle_id*, in reading order (by ``create_time`` within each
    bundle), nested bundles in their place, within the bounds; the rest counted as left out."""
    children: dict[str, list[_Item]] = defaultdict(list)
    for raw in items:
        item = _Item(raw)
        if item.id == bundle_id and not item.upper:
            continue  # the bundle itself
        children[item.upper or bundle_id].append(item)
    for bucket in children.values():
        bucket.sort(key=lambda item: item.created)
    collected = _Collector(max_pictures)
    read = 0
    for item, depth in _walk(children, bundle_id, 1, set()):
        if depth > max_depth or read >= max_messages:
            collected.leave(item)
            continue
        read += 1
        collected.take(item)
    return Referenced(
        pictures=tuple(collected.pictures),
        forwarded=tuple(collected.texts),
        left_out_messages=collected.left_messages,
        left_out_pictures=collected.left_pictures,
    )


def _walk(
    children: Mapping[str, list[_Item]], parent: str, depth: int, seen: set[str]
) -> Iterator[tuple[_Item, int]]:
    """Every message under *parent* but bundles, with the depth it is at (a bundle's messages
    are one deeper than the bundle); each bundle is entered once, whatever the answer says."""
    seen.add(parent)
    for item in children.get(parent, ()):
        if item.kind is MessageKind.FORWARD:
            if item.id and item.id not in seen:
                yield from _walk(children, item.id, depth + 1, seen)
            continue
        yield item, depth


def permission_of(error: FeishuApiError, chat_type: ChatType) -> str:
    """The scope(s) an error says the app lacks, else the one such a read needs in that chat."""
    named = _SCOPES.search(error.msg)
    if named:
        return " / ".join(scope.strip() for scope in named.group(1).split(","))
    return GROUP_SCOPE if chat_type is ChatType.GROUP else READ_SCOPE


class ReferenceReader:
    """Reads what a message quotes or forwards through `FeishuApi` (one call)."""

    def __init__(
        self, api: FeishuApi, *, max_depth: int = MAX_DEPTH, max_messages: int = MAX_MESSAGES
    ) -> None:
        self.api = api
        self.max_depth = max_depth
        self.max_messages = max_messages

    async def read(self, message: InboundMessage, *, max_pictures: int) -> Referenced:
        """`Referenced()` for a message that neither quotes nor forwards; raises `ReferenceUnreadable`."""
        forwarded = message.kind is MessageKind.FORWARD
        target = message.message_id if forwarded else message.quoted_id
        if not target:
            return Referenced()
        try:
            items = await self.api.get_message(target)
        except FeishuApiError as exc:
            raise self._unreadable(exc, message, forwarded) from None
        if forwarded:
            referenced = read_bundle(
                items,
                target,
                max_pictures=max_pictures,
                max_depth=self.max_depth,
                max_messages=self.max_messages,
            )
        else:
            try:
                referenced = read_quoted(
                    items,
                    target,
                    max_pictures=max_pictures,
                    max_depth=self.max_depth,
                    max_messages=self.max_messages,
                )
            except ReferenceUnreadable as exc:
                raise ReferenceUnreadable(exc.reason, str(exc), forwarded=False) from None
        log.info(
            "message %s: read %s %s: %d pictures, %d texts, left out %d messages and %d pictures",
            message.message_id,
            "bundle" if forwarded else "quoted",
            target,
            referenced.picture_count,
            len(referenced.forwarded) + bool(referenced.quoted),
            referenced.left_out_messages,
            referenced.left_out_pictures,
        )
        return referenced

    @staticmethod
    def _unreadable(exc: FeishuApiError, message: InboundMessage, forwarded: bool) -> ReferenceUnreadable:
        if exc.code in PERMISSION_CODES:
            permission = permission_of(exc, message.chat_type)
            return ReferenceUnreadable(
                Unreadable.PERMISSION, str(exc), permission=permission, forwarded=forwarded
            )
        reason = Unreadable.GONE if exc.code in GONE_CODES else Unreadable.FAILED
        return ReferenceUnreadable(reason, str(exc), forwarded=forwarded)
