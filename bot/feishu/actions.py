"""Buttons on answer cards: "Stop" while an answer streams, "Try again" once it ended.

A press arrives as a ``card.action.trigger`` callback (over the long connection: a data frame
of type ``event``, its answer carried in the ack; by webhook: a POST whose response body is the
answer). lark-oapi 1.7.5 drops frames of type ``card`` (the old card callback) without any ack,
so only the new callback works over the long connection. The platform waits 3 s for the answer:
`act` decides from the inbox alone (a few ms of storage) and returns the toast at once; what
takes longer (cancelling an answer, answering again) happens after, from what `act` recorded.

The button's value names the answer (``{"vlbridge": "stop"|"retry", "answer": <answer id>}``,
see `bot.feishu.ids`), but it is not trusted: the answer must be in the inbox, in the chat the
press came from, shown by the card that was pressed; and the presser must be allowed to act on
it (`feishu.card_actions`: the asker only, or anyone in the chat; `feishu.allowed_users`
applies either way). A refusal is a toast; the answer goes on.

- Stop: idempotent. A running (or waiting) answer is marked stopped in the store (`stop_key`,
  found by an answer about to start) and the caller publishes the cancel to every service
  (`bot.cancels`); an answer that already ended gets "already finished".
- Try again: the inbox gets the row `bot.feishu.ids.retry_of(answer)` holding the same event,
  answered like any message (same question, same pictures, in order in its chat) with a NEW
  card replying to the user's message. A new card, not the same one: the first answer stays
  readable beside the second, each card keeps its own buttons and its own CardKit sequence, and
  a finished card never has to be reopened. The row id derives from the pressed card, so the
  inbox's insert-if-absent deduplicates double presses, redeliveries and several services.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import orjson

from bot import texts
from bot.feishu.ids import retry_of
from bot.feishu.messages import MalformedEvent, parse_event
from bot.store import FINAL, InboxStore

log = logging.getLogger("vlbridge.feishu.actions")

EVENT_TYPE = "card.action.trigger"
VALUE_TAG = "vlbridge"  # the key of our buttons' values (other cards' buttons are not ours)
STOP_MARK_SECONDS = 24 * 3600.0

Who = Literal["asker", "chat"]


class ActionKind(StrEnum):
    STOP = "stop"
    RETRY = "retry"


class Verdict(StrEnum):
    STOPPING = "stopping"
    FINISHED = "finished"  # Stop on an answer that already ended
    RETRYING = "retrying"
    RETRIED = "retried"  # Try again on a card that already has its new answer
    RUNNING = "running"  # Try again on an answer still being written
    NOT_ALLOWED = "not_allowed"
    UNKNOWN = "unknown"  # no such answer here, or not the card that shows it


_TOASTS: dict[Verdict, tuple[str, str]] = {  # verdict -> (toast type, text key)
    Verdict.STOPPING: ("info", "toast_stopping"),
    Verdict.FINISHED: ("info", "toast_finished"),
    Verdict.RETRYING: ("success", "toast_retrying"),
    Verdict.RETRIED: ("info", "toast_retried"),
    Verdict.RUNNING: ("warning", "toast_running"),
    Verdict.NOT_ALLOWED: ("error", "toast_not_allowed"),
    Verdict.UNKNOWN: ("error", "toast_unknown"),
}


@dataclass(frozen=True, slots=True)
class CardAction:
    event_id: str
    kind: ActionKind
    answer_id: str
    operator_id: str
    chat_id: str  # the chat of the card that was pressed
    card_message_id: str  # the message that shows that card


@dataclass(frozen=True, slots=True)
class ActionPolicy:
    who: Who = "asker"
    allowed_users: frozenset[str] = frozenset()  # empty = everyone
    language: texts.Language = "zh"

    def as_dict(self) -> dict[str, Any]:
        return {"who": self.who, "allowed_users": sorted(self.allowed_users), "language": self.language}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActionPolicy:
        return cls(
            who="chat" if data.get("who") == "chat" else "asker",
            allowed_users=frozenset(data.get("allowed_users") or ()),
            language="en" if data.get("language") == "en" else "zh",
        )


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    stop: str = ""  # the answer to cancel everywhere (Stop accepted)
    new_answer: str = ""  # the inbox row added (Try again accepted): wake the dispatcher

    def response(self, language: texts.Language) -> dict[str, Any]:
        """The callback's answer: a toast (the card itself changes through CardKit)."""
        kind, key = _TOASTS[self.verdict]
        return {"toast": {"type": kind, "content": texts.text(key, language)}}


def button_value(kind: ActionKind, answer_id: str) -> dict[str, str]:
    return {VALUE_TAG: kind.value, "answer": answer_id}


def stop_key(answer_id: str) -> str:
    """The store key (`InboxStore.save_context`) that marks an answer stopped."""
    return f"stop:{answer_id}"


def is_action(body: Mapping[str, Any]) -> bool:
    return (body.get("header") or {}).get("event_type") == EVENT_TYPE


def parse_action(body: Mapping[str, Any]) -> CardAction:
    """A ``card.action.trigger`` callback body (schema 2.0) -> `CardAction`; raises
    `MalformedEvent` for anything that is not a press of one of our buttons."""
    header = body.get("header") or {}
    event = body.get("event")
    if not isinstance(event, Mapping):
        raise MalformedEvent("card action without event")
    action = event.get("action") or {}
    value = action.get("value") if isinstance(action, Mapping) else None
    if not isinstance(value, Mapping) or VALUE_TAG not in value:
        raise MalformedEvent("not a vlbridge button")
    try:
        kind = ActionKind(str(value[VALUE_TAG]))
    except ValueError:
        raise MalformedEvent(f"unknown button {value[VALUE_TAG]!r}") from None
    answer_id = str(value.get("answer") or "")
    operator = event.get("operator") or {}
    context = event.get("context") or {}
    operator_id = str(operator.get("open_id") or "") if isinstance(operator, Mapping) else ""
    if not answer_id or not operator_id or not isinstance(context, Mapping):
        raise MalformedEvent("card action without answer or operator")
    return CardAction(
        event_id=str(header.get("event_id") or ""),
        kind=kind,
        answer_id=answer_id,
        operator_id=operator_id,
        chat_id=str(context.get("open_chat_id") or ""),
        card_message_id=str(context.get("open_message_id") or ""),
    )


def act(store: InboxStore, action: CardAction, policy: ActionPolicy, now: float) -> Decision:
    """Check a press against the inbox and record what it asks for (on the store's thread;
    raises `bot.store.StorageError`: then the press is not acknowledged and comes again)."""
    stored = store.get(action.answer_id)
    if (
        stored is None
        or stored.chat_id != action.chat_id
        or (stored.reply_id and action.card_message_id and stored.reply_id != action.card_message_id)
    ):
        return Decision(Verdict.UNKNOWN)
    allowed_user = not policy.allowed_users or action.operator_id in policy.allowed_users
    if not allowed_user or (policy.who == "asker" and action.operator_id != stored.sender_id):
        return Decision(Verdict.NOT_ALLOWED)
    if action.kind is ActionKind.STOP:
        if stored.state in FINAL:
            return Decision(Verdict.FINISHED)
        store.save_context(stop_key(stored.message_id), b"1", now + STOP_MARK_SECONDS)
        return Decision(Verdict.STOPPING, stop=stored.message_id)
    if stored.state not in FINAL:
        return Decision(Verdict.RUNNING)
    new_id = retry_of(stored.message_id)
    # The same event, as a message of its own (created now: it is not stale however old the
    # question is); answered in order in its chat like any other.
    try:
        asked = parse_event(orjson.loads(stored.body))
    except (MalformedEvent, orjson.JSONDecodeError):  # it was read once; an unreadable row is no answer
        return Decision(Verdict.UNKNOWN)
    message = dataclasses.replace(asked, message_id=new_id, created_at=now)
    if not store.receive(message, stored.body, now, ordered=True):
        return Decision(Verdict.RETRIED)
    return Decision(Verdict.RETRYING, new_answer=new_id)
