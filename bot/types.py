"""Platform-neutral chat types: what an IM adapter turns a platform message into.

Adapters convert at their edge with pure functions (e.g. `bot.feishu.messages.parse_event`);
everything behind that edge (`bot.conversation`) knows only these types.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from server.errors import VlbridgeError


class MessageKind(StrEnum):
    TEXT = "text"  # words only
    IMAGE = "image"  # one or more pictures, maybe with words (a captioned post)
    FORWARD = "forward"  # a bundle of forwarded messages: read (`Referenced`) when it is answered
    UNSUPPORTED = "unsupported"  # file, audio, sticker, ...: answered with what the bot can do


class ChatType(StrEnum):
    PRIVATE = "p2p"
    GROUP = "group"


@dataclass(frozen=True, slots=True)
class PictureRef:
    """Where a message's pictures are on the platform: enough to download them again later."""

    message_id: str
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Referenced:
    """What a message brings along from other messages, read from the platform when it is
    answered: the message it quotes (one level), or the bundle it forwards (bounded).

    `pictures` come in the order shown (a quoted post's, a bundle's in reading order);
    `quoted` is the quoted message's words, `forwarded` the words of a bundle's messages;
    `left_out_messages` / `left_out_pictures` count what the bounds (or unreadable kinds) dropped.
    """

    pictures: tuple[PictureRef, ...] = ()
    quoted: str = ""
    forwarded: tuple[str, ...] = ()
    left_out_messages: int = 0
    left_out_pictures: int = 0

    @property
    def picture_count(self) -> int:
        return sum(len(ref.keys) for ref in self.pictures)


class Unreadable(StrEnum):
    """Why a referenced message could not be read."""

    PERMISSION = "permission"  # the app lacks a scope (named in `ReferenceUnreadable.permission`)
    GONE = "gone"  # recalled, deleted, or not visible to the bot
    FAILED = "failed"  # the platform did not answer (after retries)


class ReferenceUnreadable(VlbridgeError):
    """The message a message quotes or forwards cannot be read (`reason`); the user is told
    which permission is missing when that is the cause."""

    def __init__(self, reason: Unreadable, detail: str, *, permission: str = "", forwarded: bool = False):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.permission = permission
        self.forwarded = forwarded


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One user message, as the conversation layer sees it.

    `text` has the mention placeholders removed and whitespace trimmed; `image_keys` are the
    platform's references to the pictures (downloaded later, only when the message is answered);
    `mentioned` holds the platform ids of everyone @-mentioned; `created_at` is Unix seconds;
    `quoted_id` is the message it replies to (its pictures and words become context).
    """

    message_id: str
    chat_id: str
    chat_type: ChatType
    sender_id: str
    kind: MessageKind
    text: str = ""
    image_keys: tuple[str, ...] = ()
    mentioned: tuple[str, ...] = ()
    thread_id: str = ""
    root_id: str = ""
    created_at: float = 0.0
    raw_type: str = ""  # the platform's own type name, for logs and the unsupported reply
    quoted_id: str = ""

    @property
    def context_key(self) -> str:
        """Conversations are kept per chat, and per thread inside a chat."""
        return f"{self.chat_id}/{self.thread_id}" if self.thread_id else self.chat_id

    @property
    def pictures(self) -> PictureRef:
        return PictureRef(self.message_id, self.image_keys)

    @property
    def in_thread(self) -> bool:
        return bool(self.thread_id)
