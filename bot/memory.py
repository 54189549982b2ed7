"""Conversation memory, kept in the inbox's store: what the next message of a chat needs,
whichever process answers it and however often the service restarted in between.

A conversation's `Context` is its turns so far; when it is about pictures, the first turn is
the question about them and the pictures are kept *by reference* (`bot.types.PictureRef`s: each
a message and the platform's keys, e.g. a quoted message's, then the question's own) and
downloaded again when a follow-up needs them, so a context is a few hundred bytes in SQLite or
Redis, not megabytes. `PictureCache` keeps the recent pictures of
this process, so a follow-up answered where the picture was is not downloaded twice. A context
expires `context_hours` after its last answer.

The rate limit's minute is in the store as well: a user reaching two instances is still one
user, and a restart does not hand out a fresh minute.

Storage failing here is not worth a lost answer: a context that cannot be read is an empty one,
a question that cannot be counted is allowed, and each says so in the log.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from bot.inbox import Inbox
from bot.store import StorageError
from bot.types import PictureRef
from server.inference.api import Turn

log = logging.getLogger("vlbridge.bot")

MAX_EXCHANGES = 4  # question-answer pairs kept after the picture's (or in a chat without one)


@dataclass(frozen=True, slots=True)
class Context:
    """One conversation's memory. `turns` hold text only, alternating user and assistant; with
    `pictures`, ``turns[0]`` is the question about them (they are attached when prompting)."""

    turns: tuple[Turn, ...] = ()
    pictures: tuple[PictureRef, ...] = ()

    def prompt(self, question: str, pictures: Sequence[bytes] = ()) -> list[Turn]:
        """The messages asking *question* in this context; *pictures* are the downloaded
        `pictures` (for a new context about pictures, those and no turns yet)."""
        turns = [*self.turns, Turn.user(question)]
        if pictures:
            turns[0] = Turn.user(turns[0].text, tuple(pictures))
        return turns

    def then(self, question: str, answer: str, max_exchanges: int = MAX_EXCHANGES) -> Context:
        """The context after *question* was answered with *answer*: the picture's exchange is
        kept, then the last *max_exchanges* exchanges."""
        turns = [*self.turns, Turn.user(question), Turn.assistant(answer)]
        keep = 2 * max_exchanges
        if self.pictures and len(turns) > 2 + keep:
            turns = turns[:2] + turns[-keep:]
        elif not self.pictures:
            turns = turns[-keep:]
        return replace(self, turns=tuple(turns))

    def encode(self) -> bytes:
        pictures = [[ref.message_id, list(ref.keys)] for ref in self.pictures]
        return orjson.dumps({"turns": [[t.role, t.text] for t in self.turns], "pictures": pictures})

    @classmethod
    def decode(cls, data: bytes) -> Context:
        """Raises ValueError for anything but what `encode` wrote (or, before a context could
        hold several messages' pictures, its ``"picture": [message_id, keys] | null``)."""
        try:
            value: Any = orjson.loads(data)
            turns = tuple(
                Turn(role, str(text)) for role, text in value["turns"] if role in ("user", "assistant")
            )
            if "pictures" in value:
                refs = tuple(_ref(item) for item in value["pictures"])
            else:
                refs = () if value["picture"] is None else (_ref(value["picture"]),)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"not a saved context: {exc}") from None
        return cls(turns, refs)


def _ref(item: Any) -> PictureRef:
    return PictureRef(str(item[0]), tuple(map(str, item[1])))


class PictureCache:
    """The pictures this process downloaded most recently, up to *max_bytes* in all."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[PictureRef, tuple[bytes, ...]] = OrderedDict()
        self._size = 0

    def get(self, ref: PictureRef) -> tuple[bytes, ...] | None:
        pictures = self._items.get(ref)
        if pictures is not None:
            self._items.move_to_end(ref)
        return pictures

    def put(self, ref: PictureRef, pictures: Sequence[bytes]) -> None:
        size = sum(map(len, pictures))
        if size > self.max_bytes or ref in self._items:
            return
        self._items[ref] = tuple(pictures)
        self._size += size
        while self._size > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self._size -= sum(map(len, dropped))


class Memory:
    """Contexts and the rate limit in *inbox*'s store (SQLite or Redis): shared by every
    process using that store, kept across restarts."""

    def __init__(
        self,
        inbox: Inbox,
        *,
        context_hours: float,
        rate_per_minute: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inbox = inbox
        self.ttl = context_hours * 3600.0
        self.rate_per_minute = rate_per_minute
        self.clock = clock

    async def context(self, key: str) -> Context:
        """The context of conversation *key* (an empty one when there is none, or it cannot be read)."""
        try:
            data = await self.inbox.run(self.inbox.db.load_context, key, self.clock())
            return Context() if data is None else Context.decode(data)
        except (StorageError, ValueError) as exc:
            log.warning("context of %s not read, answering without it: %s", key, exc)
            return Context()

    async def keep(self, key: str, context: Context) -> None:
        try:
            await self.inbox.run(self.inbox.db.save_context, key, context.encode(), self.clock() + self.ttl)
        except StorageError as exc:
            log.warning("context of %s not saved (the next message starts afresh): %s", key, exc)

    async def forget(self, key: str) -> None:
        await self.inbox.run(self.inbox.db.drop_context, key)

    async def take_turn(self, user: str) -> float | None:
        """None when *user* may ask now (the question is counted), else seconds to wait."""
        try:
            return await self.inbox.run(self.inbox.db.take_turn, user, self.clock(), self.rate_per_minute)
        except StorageError as exc:
            log.warning("question of %s not counted (allowed): %s", user, exc)
            return None

    async def answering(self, user: str, *, besides: str) -> bool:
        """Whether a message of *user* other than *besides* is being answered (by any process)."""
        running = await self.inbox.run(self.inbox.db.running_of, user)
        return any(message_id != besides for message_id in running)
