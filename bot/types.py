"""Platform-neutral chat types: what an IM adapter turns a platform message into.

Adapters convert at their edge with pure functions (e.g. `bot.feishu.messages.parse_event`);
everything behind that edge (`bot.conversation`) knows only these types.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class MessageKind(StrEnum):
    TEXT = "text"  # words only
    IMAGE = "image"  # one or more pictures, maybe with words (a captioned post)
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
class InboundMessage:
    """One user message, as the conversation layer sees it.

    `text` has the mention placeholders removed and whitespace trimmed; `image_keys` are the
    platform's references to the pictures (downloaded later, only when the message is answered);
    `mentioned` holds the platform ids of everyone @-mentioned; `created_at` is Unix seconds.
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
