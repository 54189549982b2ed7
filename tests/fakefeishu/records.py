"""What the bot did to the fake platform, recorded for assertions.

``Records`` is the one thread-safe store: the server thread writes through ``mutate()``, tests read
snapshots (copies, safe to keep) from any thread and wait on changes with ``wait_until`` (blocking)
or the facade's async ``wait_for``. Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

T = TypeVar("T")


class SendKind(StrEnum):
    REPLY = "reply"
    CREATE = "create"


@dataclass(frozen=True)
class SentMessage:
    """A message the bot sent (``im.v1.message.reply`` or ``create``), as the platform stored it."""

    message_id: str
    kind: SendKind
    msg_type: str
    content: str  # the JSON string exactly as sent
    chat_id: str
    parent_id: str = ""  # the message replied to; "" for create
    root_id: str = ""
    thread_id: str = ""  # non-empty when the message landed in a thread
    reply_in_thread: bool = False  # what the request asked for
    receive_id: str = ""
    receive_id_type: str = ""
    uuid: str = ""
    at: float = field(default_factory=time.monotonic)

    def body(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        """Plain text of a ``text`` or ``post`` message ("" for other types)."""
        body = self.body()
        if self.msg_type == "text":
            return str(body.get("text", ""))
        if self.msg_type == "post":
            return post_plain_text(body)
        return ""

    @property
    def card_id(self) -> str | None:
        """The CardKit card this ``interactive`` message shows, if it references one."""
        if self.msg_type != "interactive":
            return None
        body = self.body()
        if body.get("type") == "card":
            return str(body.get("data", {}).get("card_id", "")) or None
        return None


def post_plain_text(body: Any) -> str:
    """Text elements of a post, in order; accepts the locale-keyed and the flat shape."""
    if isinstance(body, dict) and "content" not in body:
        body = next((v for v in body.values() if isinstance(v, dict)), {})
    lines = []
    for paragraph in body.get("content", []) if isinstance(body, dict) else []:
        lines.append(
            "".join(str(el.get("text", "")) for el in paragraph if el.get("tag") in ("text", "md", "a"))
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class MessagePatch:
    message_id: str
    content: str
    at: float = field(default_factory=time.monotonic)


@dataclass
class Reaction:
    reaction_id: str
    message_id: str
    emoji_type: str
    at: float = field(default_factory=time.monotonic)
    deleted_at: float | None = None


class CardOpKind(StrEnum):
    CONTENT = "content"
    SETTINGS = "settings"
    UPDATE = "update"


@dataclass(frozen=True)
class CardOp:
    kind: CardOpKind
    sequence: int
    element_id: str = ""
    content: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)


@dataclass
class CardRecord:
    """One CardKit card entity and everything done to it.

    ``closed`` is True once ``streaming_mode`` went from true to false (by ``settings`` or by a full
    update) or the platform's streaming lifetime ran out (``closed_by`` says which).
    """

    card_id: str
    card: dict[str, Any]
    streaming: bool
    element_texts: dict[str, str]
    history: list[CardOp] = field(default_factory=list)
    message_id: str | None = None  # the interactive message that shows it
    last_sequence: int = 0
    last_element_id: str | None = None
    closed_by: str | None = None
    created_at: float = field(default_factory=time.monotonic)
    streaming_since: float | None = None

    @property
    def closed(self) -> bool:
        return self.closed_by is not None

    @property
    def final_text(self) -> str:
        """Text of the element streamed last (or the only text element when none was streamed)."""
        if self.last_element_id is not None:
            return self.element_texts.get(self.last_element_id, "")
        if len(self.element_texts) == 1:
            return next(iter(self.element_texts.values()))
        return ""

    @property
    def content_updates(self) -> list[CardOp]:
        return [op for op in self.history if op.kind is CardOpKind.CONTENT]


@dataclass(frozen=True)
class Delivery:
    """One push of an event over the long connection (one attempt; possibly several frames)."""

    event_id: str
    frame_message_id: str
    conn_id: str
    attempt: int  # 1 for the first delivery of this event
    parts: int
    sent_at: float  # when its first frame was written


@dataclass(frozen=True)
class Ack:
    """An acknowledgement frame the SDK sent back for a delivery."""

    event_id: str
    frame_message_id: str
    conn_id: str
    code: int  # 200 ok, 500 handler failed / no handler registered
    biz_rt_ms: int | None  # the SDK's own measure of its handler time
    latency_s: float  # from the delivery's first frame written to the ack read
    at: float = field(default_factory=time.monotonic)
    data: Any = None  # the handler's answer carried by the ack (a card callback's toast)


@dataclass
class ConnectionRecord:
    conn_id: str
    device_id: str
    opened_at: float = field(default_factory=time.monotonic)
    closed_at: float | None = None
    close_code: int | None = None
    pings: int = 0
    last_ping_at: float | None = None

    @property
    def open(self) -> bool:
        return self.closed_at is None


@dataclass(frozen=True)
class ApiCall:
    route: str
    method: str
    path: str
    status: int
    code: int
    at: float = field(default_factory=time.monotonic)


@dataclass
class Tables:
    """The raw containers; only touched inside ``Records.mutate()`` / ``Records.read()``."""

    sent: list[SentMessage] = field(default_factory=list)
    patches: list[MessagePatch] = field(default_factory=list)
    reactions: dict[str, Reaction] = field(default_factory=dict)
    cards: dict[str, CardRecord] = field(default_factory=dict)
    deliveries: list[Delivery] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)
    connections: dict[str, ConnectionRecord] = field(default_factory=dict)
    api_calls: list[ApiCall] = field(default_factory=list)
    token_grants: list[str] = field(default_factory=list)
    deduped_sends: int = 0  # sends answered from the ``uuid`` idempotency cache


class Records:
    """Thread-safe record store with change notification."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._tables = Tables()

    @contextmanager
    def mutate(self) -> Iterator[Tables]:
        """Hold the lock to change tables; waiters are woken on exit."""
        with self._cond:
            yield self._tables
            self._cond.notify_all()

    @contextmanager
    def read(self) -> Iterator[Tables]:
        with self._cond:
            yield self._tables

    def wait_until(self, predicate: Callable[[], T | None], timeout: float, what: str = "condition") -> T:
        """Block until ``predicate()`` is truthy and return it; ``TimeoutError`` after ``timeout`` s.

        Re-checked on every record change and at least every 20 ms, so predicates over state outside
        the records (a thread ending, an SDK attribute) work too.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; {self.summary()}")
                self._cond.wait(min(remaining, 0.02))

    # -- snapshots -------------------------------------------------------------------------------

    def sent(self) -> list[SentMessage]:
        with self.read() as t:
            return list(t.sent)

    def replies(self) -> list[SentMessage]:
        return [m for m in self.sent() if m.kind is SendKind.REPLY]

    def created(self) -> list[SentMessage]:
        return [m for m in self.sent() if m.kind is SendKind.CREATE]

    def patches(self) -> list[MessagePatch]:
        with self.read() as t:
            return list(t.patches)

    def reactions(self, include_deleted: bool = False) -> list[Reaction]:
        with self.read() as t:
            return [copy.copy(r) for r in t.reactions.values() if include_deleted or r.deleted_at is None]

    def cards(self) -> list[CardRecord]:
        with self.read() as t:
            return [copy.deepcopy(c) for c in t.cards.values()]

    def card(self, card_id: str) -> CardRecord:
        with self.read() as t:
            return copy.deepcopy(t.cards[card_id])

    def deliveries(self, event_id: str | None = None) -> list[Delivery]:
        with self.read() as t:
            return [d for d in t.deliveries if event_id is None or d.event_id == event_id]

    def acks(self, event_id: str | None = None) -> list[Ack]:
        with self.read() as t:
            return [a for a in t.acks if event_id is None or a.event_id == event_id]

    def connections(self) -> list[ConnectionRecord]:
        with self.read() as t:
            return [copy.copy(c) for c in t.connections.values()]

    def open_connections(self) -> list[ConnectionRecord]:
        return [c for c in self.connections() if c.open]

    def api_calls(self, route: str | None = None) -> list[ApiCall]:
        with self.read() as t:
            return [c for c in t.api_calls if route is None or c.route == route]

    @property
    def token_fetches(self) -> int:
        """Tenant tokens issued (successful fetches)."""
        with self.read() as t:
            return len(t.token_grants)

    @property
    def discoveries(self) -> int:
        """Long-connection discovery calls, refused ones included."""
        return len(self.api_calls("ws.endpoint"))

    @property
    def deduped_sends(self) -> int:
        with self.read() as t:
            return t.deduped_sends

    def summary(self) -> str:
        """One line for timeout messages."""
        with self.read() as t:
            return (
                f"sent={len(t.sent)} patches={len(t.patches)} reactions={len(t.reactions)} "
                f"cards={len(t.cards)} deliveries={len(t.deliveries)} acks={len(t.acks)} "
                f"connections={len(t.connections)} (open {sum(c.open for c in t.connections.values())}) "
                f"discoveries={sum(c.route == 'ws.endpoint' for c in t.api_calls)} "
                f"tokens={len(t.token_grants)} api_calls={len(t.api_calls)}"
            )
