"""The inbox's contract: message states, the stored row, and what every store backend does.

Two backends keep the inbox: `bot.inbox.InboxDb` (SQLite, one file, the embedded default) and
`bot.inbox_redis.RedisInboxDb` (Redis, shared by several processes). Both satisfy `InboxStore`
and pass the same contract tests (tests/test_inbox_contract.py). A store is synchronous and
used from one thread at a time; `bot.inbox.Inbox` runs its calls on a thread of its own so the
event loop never waits on storage.

A running message is *leased* to the process answering it (`start`, `renew`); when the lease
ends without a renewal (the process died), another one `claim`s it and answers it again, the
attempt counted.

The state machine (every move is checked atomically: "expected running, got answered")::

    received -> running -> answered | failed(reason) | ignored
        ^          |                   |
        +----------+ (requeue)         +-- (admin retry) -> received
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import orjson

from bot.types import InboundMessage
from server.errors import VlbridgeError


class InboxState(StrEnum):
    RECEIVED = "received"  # persisted and acked; waiting to be answered
    RUNNING = "running"  # being answered (found so at start-up: the process died meanwhile)
    ANSWERED = "answered"
    FAILED = "failed"  # not answered; `reason` says why, the user was told
    IGNORED = "ignored"  # deliberately not answered (not for us, stale, a command, ...)


PENDING = (InboxState.RECEIVED, InboxState.RUNNING)
FINAL = (InboxState.ANSWERED, InboxState.FAILED, InboxState.IGNORED)
RATE_WINDOW = 60.0  # seconds: `InboxStore.take_turn` counts the questions of the last minute


class StorageError(VlbridgeError):
    """The inbox cannot be used: a corrupt, locked or unwritable file, a file in use by another
    service, or a Redis server that cannot be reached or refuses the commands."""


class TransitionError(VlbridgeError):
    """A state change that does not fit the message's current state (a bug, or a race)."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    message_id: str
    chat_id: str
    context_key: str
    sender_id: str
    text: str
    image_keys: tuple[str, ...]
    created_at: float
    received_at: float
    body: bytes
    state: InboxState
    attempts: int
    reason: str
    updated_at: float
    card_id: str
    reply_id: str
    sequence: int
    receipt_id: str = ""  # the reaction shown while it waited, until its answer starts (receipts.py)

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> StoredMessage:
        (seq, mid, chat, key, sender, text, keys, created, received, body, state, attempts) = row[:12]
        reason, updated, card, reply, sequence, receipt = row[12:]
        return cls(
            seq=int(str(seq)),
            message_id=str(mid),
            chat_id=str(chat),
            context_key=str(key),
            sender_id=str(sender),
            text=str(text),
            image_keys=tuple(orjson.loads(str(keys))),
            created_at=float(str(created)),
            received_at=float(str(received)),
            body=bytes(body) if isinstance(body, (bytes, bytearray, memoryview)) else b"",
            state=InboxState(str(state)),
            attempts=int(str(attempts)),
            reason=str(reason),
            updated_at=float(str(updated)),
            card_id=str(card),
            reply_id=str(reply),
            sequence=int(str(sequence)),
            receipt_id=str(receipt),
        )

    def as_json(self) -> dict[str, object]:
        """The admin view of a row (no raw event)."""
        return {
            "message_id": self.message_id,
            "chat_id": self.chat_id,
            "sender_id": self.sender_id,
            "state": self.state.value,
            "attempts": self.attempts,
            "reason": self.reason,
            "text": self.text,
            "pictures": len(self.image_keys),
            "created_at": self.created_at,
            "received_at": self.received_at,
            "updated_at": self.updated_at,
            "card_id": self.card_id,
            "reply_id": self.reply_id,
        }


def transition_error(
    message_id: str, expected: Iterable[InboxState], found: InboxState | None, new: InboxState
) -> TransitionError:
    """The one wording of a refused move, whatever the backend."""
    wanted = " or ".join(s.value for s in expected)
    got = found.value if found is not None else "nothing"
    return TransitionError(f"message {message_id}: expected {wanted}, got {got} (moving to {new.value})")


def check_final(message_id: str, state: InboxState) -> None:
    if state not in FINAL:
        raise TransitionError(f"message {message_id}: {state.value} is not a final state")


class InboxStore(Protocol):
    """What a store backend does. Every method may raise `StorageError` (the storage failed);
    the moves raise `TransitionError` when the message is not in a state they start from, and
    change nothing then. Messages are kept per *platform* (given at construction)."""

    def check(self) -> None:
        """Raise `StorageError` unless the store is whole and writable (at start-up)."""

    def close(self) -> None: ...

    def receive(
        self, message: InboundMessage, body: bytes, received_at: float, *, ordered: bool = True
    ) -> bool:
        """Persist a newly delivered message (durably, before the platform is acked); False when
        it was already there (a redelivery). An *ordered* message waits for the earlier ones of
        its conversation; one that is not (a command such as /cancel) is a conversation of its own."""

    def start(self, message_id: str, lease_until: float = math.inf) -> StoredMessage:
        """received -> running; counts an attempt. The caller holds the message until
        *lease_until* (``time.time()`` seconds), extended with `renew`; after it, `claim` lets
        another process take it over (the holder is taken for dead)."""

    def renew(self, message_ids: Sequence[str], lease_until: float) -> None:
        """Extend the leases of those of *message_ids* that are still running."""

    def claim(self, now: float, lease_until: float) -> list[StoredMessage]:
        """Take over the running messages whose lease ended before *now*: each is returned (still
        running, its lease now *lease_until*) to exactly one caller, which then recovers it (or
        gives up on it). ``now = math.inf`` takes every running message (a store that one
        service holds alone, at its start)."""

    def finish(self, message_id: str, state: InboxState, reason: str = "") -> StoredMessage:
        """running -> answered | failed(reason) | ignored."""

    def requeue(self, message_id: str) -> StoredMessage:
        """running -> received, not counted as an attempt."""

    def recover(self, message_id: str) -> StoredMessage:
        """running -> received after a death while answering (the attempt counts)."""

    def retry(self, message_id: str) -> StoredMessage:
        """failed -> received, attempts and reason reset (an admin asks for another try)."""

    def note_reply(self, message_id: str, *, card_id: str | None = None, reply_id: str | None = None) -> None:
        """Record the reply's card id and/or reply message id (nothing for an unknown message)."""

    def claim_receipt(self, message_id: str, receipt_id: str) -> str:
        """Record *receipt_id* (a reaction's id) as the message's receipt unless one is recorded
        (another service showed one first); returns the receipt recorded now, ``""`` for an
        unknown message."""

    def take_receipt(self, message_id: str, receipt_id: str) -> bool:
        """Clear the message's receipt if it is *receipt_id*: whether this call cleared it (of
        services racing to remove one receipt, exactly one is told to)."""

    def claim_card(self, message_id: str, card_id: str) -> tuple[str, int]:
        """Record *card_id* as the message's card unless one is recorded (another service opened
        one first: a queue place shown while this one starts the answer); returns the card
        recorded now and the highest sequence reserved on it. ``("", 0)`` for an unknown message."""

    def reserve_sequence(self, message_id: str, upto: int) -> None:
        """Record that CardKit sequences up to *upto* may have been used (the record only grows)."""

    def get(self, message_id: str) -> StoredMessage | None: ...

    def in_state(self, state: InboxState, limit: int = 1000, after_seq: int = 0) -> list[StoredMessage]:
        """Messages in *state* with `seq` above *after_seq*, in arrival order."""

    def heads(self, busy: tuple[str, ...], limit: int) -> list[StoredMessage]:
        """The oldest received message of each conversation that has nothing earlier pending and
        is not in *busy*, in arrival order: what may start now."""

    def running_of(self, sender_id: str) -> list[str]:
        """The running messages of *sender_id* (in any process sharing the store)."""

    def counts(self) -> dict[str, int]:
        """Messages per state, every state present."""

    def listing(
        self,
        *,
        states: Iterable[InboxState] = (),
        chat_id: str = "",
        since: float = 0.0,
        limit: int = 200,
    ) -> list[StoredMessage]:
        """The admin view: newest first, filtered by state, chat and arrival time."""

    def prune(self, now: float) -> int:
        """Forget finished messages received before the retention; pending ones are kept,
        however old. Returns how many were forgotten."""

    # -- conversation memory: what the next message of a chat needs, whichever process answers it

    def load_context(self, key: str, now: float) -> bytes | None:
        """The context saved for conversation *key* (`bot.memory.Context`, encoded), unless it
        expired before *now*."""

    def save_context(self, key: str, data: bytes, expires_at: float) -> None:
        """Replace the context of conversation *key*; it is forgotten at *expires_at*."""

    def drop_context(self, key: str) -> None: ...

    def take_turn(self, user: str, now: float, per_minute: int) -> float | None:
        """The rate limit: record a question of *user* at *now* unless *per_minute* of theirs
        were recorded in the 60 s before; None when recorded, else the seconds until one is
        allowed again. Atomic: processes sharing the store share each user's minute."""
