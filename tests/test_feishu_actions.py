"""`bot.feishu.actions` with plain values: a press in, a verdict (and what it recorded) out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from bot.feishu.actions import ActionKind, ActionPolicy, Verdict, act, button_value, parse_action, stop_key
from bot.feishu.ids import reply_target, retry_of
from bot.feishu.messages import MalformedEvent, parse_event
from bot.inbox import InboxDb, InboxState
from tests.fakefeishu.events import EventFactory, User

ASKER, OTHER = User(name="asker"), User(name="other")
EVENTS = EventFactory(sender=ASKER)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[InboxDb]:
    store = InboxDb(tmp_path / "inbox.sqlite3", platform="feishu")
    yield store
    store.close()


def asked(db: InboxDb, *, state: InboxState = InboxState.ANSWERED) -> tuple[str, str]:
    """A stored question whose card is the message "om_card"; returns its id and chat."""
    event = EVENTS.text("what is this?", chat_type="group", mentions=[EVENTS.bot])
    message = parse_event(event)
    db.receive(message, orjson.dumps(event), time.time())
    db.note_reply(message.message_id, card_id="card_1", reply_id="om_card")
    if state is not InboxState.RECEIVED:
        db.start(message.message_id)
    if state in (InboxState.ANSWERED, InboxState.FAILED, InboxState.IGNORED):
        db.finish(message.message_id, state)
    return message.message_id, message.chat_id


def press(kind: ActionKind, answer: str, chat: str, *, by: User = ASKER, card: str = "om_card") -> dict:
    return EVENTS.card_action(
        button_value(kind, answer), operator=by, open_message_id=card, open_chat_id=chat
    )


def test_ids() -> None:
    assert retry_of("om_1") == "om_1~2" and retry_of("om_1~2") == "om_1~3"
    assert reply_target("om_1~3") == reply_target("om_1") == "om_1"


def test_presses_of_other_buttons_are_not_ours() -> None:
    body = EVENTS.card_action({"something": "else"}, open_message_id="om_card", open_chat_id="oc_1")
    with pytest.raises(MalformedEvent):
        parse_action(body)


@pytest.mark.parametrize(
    ("who", "by", "chat", "card", "verdict"),
    [
        ("asker", ASKER, None, "om_card", Verdict.STOPPING),
        ("asker", OTHER, None, "om_card", Verdict.NOT_ALLOWED),
        ("chat", OTHER, None, "om_card", Verdict.STOPPING),
        ("chat", OTHER, "oc_elsewhere", "om_card", Verdict.UNKNOWN),  # a value copied to another chat
        ("asker", ASKER, None, "om_other_card", Verdict.UNKNOWN),  # not the card that shows it
    ],
)
def test_stop_is_checked_against_the_inbox(
    db: InboxDb, who: str, by: User, chat: str | None, card: str, verdict: Verdict
) -> None:
    answer, its_chat = asked(db, state=InboxState.RUNNING)
    action = parse_action(press(ActionKind.STOP, answer, chat or its_chat, by=by, card=card))
    policy = ActionPolicy(who="chat" if who == "chat" else "asker")
    decision = act(db, action, policy, time.time())
    assert decision.verdict is verdict
    assert (db.load_context(stop_key(answer), time.time()) is not None) == (verdict is Verdict.STOPPING)
    assert decision.stop == (answer if verdict is Verdict.STOPPING else "")


def test_allowed_users_apply_to_buttons_too(db: InboxDb) -> None:
    answer, chat = asked(db, state=InboxState.RUNNING)
    policy = ActionPolicy(who="chat", allowed_users=frozenset({"ou_nobody"}))
    assert act(db, parse_action(press(ActionKind.STOP, answer, chat)), policy, time.time()).verdict is (
        Verdict.NOT_ALLOWED
    )


def test_try_again_adds_one_row_per_card(db: InboxDb) -> None:
    answer, chat = asked(db)
    first = act(db, parse_action(press(ActionKind.RETRY, answer, chat)), ActionPolicy(), time.time())
    assert first.verdict is Verdict.RETRYING and first.new_answer == f"{answer}~2"
    again = act(db, parse_action(press(ActionKind.RETRY, answer, chat)), ActionPolicy(), time.time())
    assert again.verdict is Verdict.RETRIED and not again.new_answer
    row = db.get(f"{answer}~2")
    assert row is not None and row.state is InboxState.RECEIVED and row.text == "what is this?"
    assert act(
        db, parse_action(press(ActionKind.STOP, answer, chat)), ActionPolicy(), time.time()
    ).verdict is (Verdict.FINISHED)


def test_try_again_while_it_runs_is_refused(db: InboxDb) -> None:
    answer, chat = asked(db, state=InboxState.RUNNING)
    decision = act(db, parse_action(press(ActionKind.RETRY, answer, chat)), ActionPolicy(), time.time())
    assert decision.verdict is Verdict.RUNNING and db.get(f"{answer}~2") is None
    assert decision.response("en")["toast"]["type"] == "warning"
