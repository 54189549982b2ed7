"""The inbox store contract (`bot.store.InboxStore`), run against every backend: SQLite and Redis.

A "restart" reopens the store on the same file, or the same Redis prefix. Tests of one backend
only (SQLite's migration and file errors, Redis' connection errors) are in test_inbox.py and
test_inbox_redis.py.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bot.inbox import InboxDb
from bot.inbox_redis import RedisInboxDb
from bot.store import InboxState, InboxStore, TransitionError
from bot.types import ChatType, InboundMessage, MessageKind

Opener = Callable[[], InboxStore]


def message(
    message_id: str, chat: str = "oc_1", thread: str = "", *, images: tuple[str, ...] = ()
) -> InboundMessage:
    return InboundMessage(
        message_id=message_id,
        chat_id=chat,
        chat_type=ChatType.PRIVATE,
        sender_id="ou_1",
        kind=MessageKind.IMAGE if images else MessageKind.TEXT,
        text=f"text of {message_id}",
        image_keys=images,
        thread_id=thread,
        created_at=1000.0,
    )


@pytest.fixture(params=["sqlite", "redis"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store of the backend under test; every call is a fresh connection to the same
    inbox (a restart, or another process). Stores are closed at the end."""
    opened: list[InboxStore] = []
    if request.param == "redis":
        url = request.getfixturevalue("redis_server")
        prefix = f"test-{uuid.uuid4().hex[:12]}"

        def open_store() -> InboxStore:
            return RedisInboxDb(url, platform="feishu", retention_hours=12, prefix=prefix)
    else:

        def open_store() -> InboxStore:
            return InboxDb(tmp_path / "inbox.sqlite3", platform="feishu", retention_hours=12)

    def tracked() -> InboxStore:
        store = open_store()
        store.check()
        opened.append(store)
        return store

    yield tracked
    for store in opened:
        store.close()


def test_a_message_is_received_once_and_kept_with_what_answers_it(opener: Opener) -> None:
    db = opener()
    assert db.receive(message("om_1", images=("img_a", "img_b")), b'{"raw": 1}', 2000.0) is True
    assert db.receive(message("om_1"), b"{}", 2001.0) is False  # a redelivery
    db.close()
    again = opener()  # a restart
    assert again.receive(message("om_1"), b"{}", 2002.0) is False
    stored = again.get("om_1")
    assert stored is not None
    assert (stored.chat_id, stored.sender_id, stored.text, stored.image_keys) == (
        "oc_1",
        "ou_1",
        "text of om_1",
        ("img_a", "img_b"),
    )
    assert (stored.body, stored.received_at, stored.created_at) == (b'{"raw": 1}', 2000.0, 1000.0)
    assert stored.state is InboxState.RECEIVED and stored.attempts == 0
    assert again.get("om_unknown") is None


def test_transitions_are_checked(opener: Opener) -> None:
    db = opener()
    db.receive(message("om_1"), b"{}", 1.0)
    with pytest.raises(TransitionError, match="om_1: expected running, got received"):
        db.finish("om_1", InboxState.ANSWERED)
    assert db.start("om_1").attempts == 1
    with pytest.raises(TransitionError, match="expected received, got running"):
        db.start("om_1")
    assert db.finish("om_1", InboxState.ANSWERED).state is InboxState.ANSWERED
    with pytest.raises(TransitionError, match="expected running, got answered"):
        db.finish("om_1", InboxState.FAILED, "late")
    with pytest.raises(TransitionError, match="expected failed, got answered"):
        db.retry("om_1")
    with pytest.raises(TransitionError, match="expected received, got nothing"):
        db.start("om_unknown")
    with pytest.raises(TransitionError, match="not a final state"):
        db.finish("om_1", InboxState.RUNNING)
    stored = db.get("om_1")
    assert stored is not None and stored.state is InboxState.ANSWERED  # a refused move changes nothing


def test_attempts_count_deaths_not_requeues_and_an_admin_retry_starts_afresh(opener: Opener) -> None:
    db = opener()
    db.receive(message("om_1"), b"{}", 1.0)
    db.start("om_1")
    assert db.requeue("om_1").attempts == 0  # the executor was full: not an attempt
    db.start("om_1")
    recovered = db.recover("om_1")  # the process died while answering: it counts
    assert (recovered.state, recovered.attempts) == (InboxState.RECEIVED, 1)
    db.start("om_1")
    failed = db.finish("om_1", InboxState.FAILED, "the service ended 2 times")
    assert (failed.attempts, failed.reason) == (2, "the service ended 2 times")
    retried = db.retry("om_1")
    assert (retried.state, retried.attempts, retried.reason) == (InboxState.RECEIVED, 0, "")


def test_the_reply_is_recorded_and_sequences_only_grow(opener: Opener) -> None:
    db = opener()
    db.receive(message("om_1"), b"{}", 1.0)
    db.note_reply("om_1", card_id="card_1")
    db.note_reply("om_1", reply_id="om_reply")
    db.reserve_sequence("om_1", 64)
    db.reserve_sequence("om_1", 10)  # an older reservation arriving late changes nothing
    db.note_reply("om_gone", card_id="card_x")  # a forgotten message: nothing happens
    db.reserve_sequence("om_gone", 64)
    stored = opener().get("om_1")  # seen from another connection
    assert stored is not None and (stored.card_id, stored.reply_id, stored.sequence) == (
        "card_1",
        "om_reply",
        64,
    )
    assert db.get("om_gone") is None


def test_a_receipt_is_the_first_recorded_and_taken_once_whichever_connection_asks(opener: Opener) -> None:
    """The reaction a waiting message got: the first service to record one shows the message's
    receipt; any service sharing the store may remove it once the message starts, and of
    several that try, one is told to."""
    db, other = opener(), opener()
    db.receive(message("om_1"), b"{}", 1.0)
    stored = db.get("om_1")
    assert stored is not None and stored.receipt_id == ""
    assert not db.take_receipt("om_1", "")  # none shown
    assert db.claim_receipt("om_1", "r_1") == "r_1"
    assert other.claim_receipt("om_1", "r_2") == "r_1"  # shown elsewhere first: r_2 goes
    stored = other.get("om_1")
    assert stored is not None and stored.receipt_id == "r_1"
    assert not other.take_receipt("om_1", "r_2")
    assert other.take_receipt("om_1", "r_1")
    assert not db.take_receipt("om_1", "r_1")  # taken already
    stored = db.get("om_1")
    assert stored is not None and stored.receipt_id == ""
    assert db.claim_receipt("om_gone", "r_1") == ""
    assert not db.take_receipt("om_gone", "r_1")
    assert db.get("om_gone") is None


def test_heads_are_the_oldest_message_of_each_idle_conversation(opener: Opener) -> None:
    db = opener()
    for mid, chat, thread in [
        ("a1", "A", ""),
        ("b1", "B", ""),
        ("a2", "A", ""),
        ("t1", "A", "th"),  # a thread is its own conversation
        ("c1", "C", ""),
        ("b2", "B", ""),
    ]:
        db.receive(message(mid, chat, thread), b"{}", time.time())
    heads = db.heads((), 10)
    assert [m.message_id for m in heads] == ["a1", "b1", "t1", "c1"]
    assert [m.message_id for m in db.heads((), 2)] == ["a1", "b1"]
    db.start("a1")  # a running message holds its conversation back
    assert [m.message_id for m in db.heads((), 10)] == ["b1", "t1", "c1"]
    assert [m.message_id for m in db.heads(("B",), 10)] == ["t1", "c1"]
    db.finish("a1", InboxState.ANSWERED)
    assert [m.message_id for m in db.heads((), 10)] == ["b1", "a2", "t1", "c1"]  # arrival order
    assert db.counts() == {"received": 5, "running": 0, "answered": 1, "failed": 0, "ignored": 0}


def test_a_retried_message_is_its_conversations_head_again(opener: Opener) -> None:
    db = opener()
    db.receive(message("a1", "A"), b"{}", 1.0)
    db.receive(message("a2", "A"), b"{}", 2.0)
    db.start("a1")
    db.finish("a1", InboxState.FAILED, "broken")
    assert [m.message_id for m in db.heads((), 10)] == ["a2"]
    db.retry("a1")  # it arrived first: it goes first again
    assert [m.message_id for m in db.heads((), 10)] == ["a1"]


def test_a_command_is_a_conversation_of_its_own(opener: Opener) -> None:
    db = opener()
    db.receive(message("q1", "A"), b"{}", 1.0)
    db.start("q1")
    db.receive(message("cancel", "A"), b"{}", 2.0, ordered=False)
    assert [m.message_id for m in db.heads((), 10)] == ["cancel"]  # not behind the running answer


def test_in_state_lists_in_arrival_order_page_by_page(opener: Opener) -> None:
    db = opener()
    for n in range(5):
        db.receive(message(f"m{n}", f"chat{n}"), b"{}", float(n))
    db.start("m1")
    first = db.in_state(InboxState.RECEIVED, limit=2)
    assert [m.message_id for m in first] == ["m0", "m2"]
    rest = db.in_state(InboxState.RECEIVED, limit=10, after_seq=first[-1].seq)
    assert [m.message_id for m in rest] == ["m3", "m4"]
    assert [m.message_id for m in db.in_state(InboxState.RUNNING)] == ["m1"]


def test_the_listing_filters_by_state_chat_and_age_newest_first(opener: Opener) -> None:
    db = opener()
    for n, chat in enumerate(["A", "B", "A", "A"]):
        db.receive(message(f"m{n}", chat), b"{}", 100.0 + n)
    db.start("m2")
    db.finish("m2", InboxState.FAILED, "why")
    assert [m.message_id for m in db.listing()] == ["m3", "m2", "m1", "m0"]
    assert [m.message_id for m in db.listing(chat_id="A", limit=2)] == ["m3", "m2"]
    assert [m.message_id for m in db.listing(states=[InboxState.FAILED])] == ["m2"]
    assert [m.message_id for m in db.listing(since=101.0)] == ["m3", "m2", "m1"]


def test_pruning_forgets_finished_messages_only(opener: Opener) -> None:
    db = opener()
    for mid in ("old_done", "old_waiting"):
        db.receive(message(mid), b"{}", 1.0)
    db.receive(message("new_done", "oc_2"), b"{}", time.time())
    for mid in ("old_done", "new_done"):
        db.start(mid)
        db.finish(mid, InboxState.ANSWERED)
    assert db.prune(now=time.time()) == 1
    assert db.get("old_done") is None and db.get("old_waiting") is not None
    assert db.get("new_done") is not None  # within the retention: still deduplicated
    assert db.counts()["answered"] == 1
    assert db.receive(message("new_done", "oc_2"), b"{}", time.time()) is False


def test_racing_starts_from_two_connections_start_each_message_once(opener: Opener) -> None:
    """Two processes (here: two connections on two threads) taking the same messages: every
    move is atomic, so each message is started by exactly one of them."""
    seed = opener()
    ids = [f"m{n}" for n in range(60)]
    for mid in ids:
        seed.receive(message(mid, f"chat{mid}"), b"{}", 1.0)
    stores = [opener(), opener()]
    won: list[list[str]] = [[], []]
    go = threading.Barrier(2)

    def take(n: int) -> None:
        go.wait()
        for mid in ids:
            try:
                stores[n].start(mid)
            except TransitionError:
                continue
            won[n].append(mid)

    threads = [threading.Thread(target=take, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(won[0] + won[1]) == sorted(ids)
    assert all(m.attempts == 1 for m in seed.in_state(InboxState.RUNNING))
    assert seed.counts()["running"] == len(ids)


def test_a_running_message_whose_lease_ended_is_claimed_by_one_taker(opener: Opener) -> None:
    """A process that died holds its running messages only until their leases end; then exactly
    one other process takes each over (and recovers it, the attempt counted)."""
    mine, other = opener(), opener()
    for mid, chat in [("a1", "A"), ("b1", "B"), ("c1", "C")]:
        mine.receive(message(mid, chat), b"{}", 1.0)
    mine.start("a1", lease_until=100.0)
    mine.start("b1", lease_until=200.0)
    mine.start("c1")  # no end given: held until someone takes everything (math.inf)
    assert [m.message_id for m in other.claim(now=150.0, lease_until=1000.0)] == ["a1"]
    assert mine.claim(now=150.0, lease_until=1000.0) == []  # already taken, and renewed
    mine.renew(["b1", "om_unknown"], 500.0)  # b1's holder is alive
    assert other.claim(now=300.0, lease_until=1000.0) == []
    taken = other.claim(now=math.inf, lease_until=2000.0)  # a store held alone, at its start
    assert [(m.message_id, m.state, m.attempts) for m in taken] == [
        ("a1", InboxState.RUNNING, 1),
        ("b1", InboxState.RUNNING, 1),
        ("c1", InboxState.RUNNING, 1),
    ]
    recovered = other.recover("a1")
    assert (recovered.state, recovered.attempts) == (InboxState.RECEIVED, 1)
    other.renew(["a1"], 5000.0)  # no longer running: no lease to extend
    assert "a1" not in [m.message_id for m in other.claim(now=math.inf, lease_until=1.0)]
    other.start("a1", lease_until=10.0)
    other.finish("a1", InboxState.ANSWERED)
    assert "a1" not in [m.message_id for m in mine.claim(now=math.inf, lease_until=1.0)]


def test_a_conversations_context_is_shared_replaced_dropped_and_expires(opener: Opener) -> None:
    now = time.time()
    db, other = opener(), opener()  # two processes, or one before and after a restart
    assert db.load_context("oc_1", now) is None
    db.save_context("oc_1", b'{"turns": 1}', now + 3600)
    db.save_context("oc_1/omt_1", b'{"thread": 1}', now + 3600)
    assert other.load_context("oc_1", now) == b'{"turns": 1}'
    other.save_context("oc_1", b'{"turns": 2}', now + 3600)
    assert db.load_context("oc_1", now) == b'{"turns": 2}'
    db.drop_context("oc_1")
    assert other.load_context("oc_1", now) is None
    assert other.load_context("oc_1/omt_1", now) == b'{"thread": 1}'  # a thread is its own conversation
    other.save_context("oc_2", b"old", now - 1)
    assert db.load_context("oc_2", now) is None
    db.prune(now)
    assert db.load_context("oc_1/omt_1", now) == b'{"thread": 1}'


def test_a_users_questions_are_counted_over_a_sliding_minute(opener: Opener) -> None:
    db, other = opener(), opener()
    t = 10_000.0
    assert db.take_turn("ou_1", t, 2) is None
    assert other.take_turn("ou_1", t + 10, 2) is None
    assert db.take_turn("ou_2", t + 10, 2) is None  # each user their own minute
    assert other.take_turn("ou_1", t + 20, 2) == pytest.approx(40.0)
    assert db.take_turn("ou_1", t + 59, 2) == pytest.approx(1.0)  # refusals are not counted
    assert db.take_turn("ou_1", t + 60, 2) is None  # the first left the window
    assert db.take_turn("ou_1", t + 61, 2) == pytest.approx(9.0)
    db.prune(t + 200)
    assert other.take_turn("ou_1", t + 200, 2) is None


def test_racing_questions_from_two_connections_are_each_counted(opener: Opener) -> None:
    stores = [opener(), opener()]
    results: list[float | None] = []
    lock = threading.Lock()

    def ask(store: InboxStore) -> None:
        for _ in range(6):
            wait = store.take_turn("ou_race", 5_000.0, 5)
            with lock:
                results.append(wait)

    threads = [threading.Thread(target=ask, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(None) == 5 and len(results) == 12


def test_the_running_messages_of_a_sender_are_found_from_any_connection(opener: Opener) -> None:
    db, other = opener(), opener()
    for mid in ("om_1", "om_2", "om_3"):
        db.receive(message(mid, chat=f"oc_{mid}"), b"{}", 2000.0)
    db.start("om_1")
    other.start("om_3")
    assert other.running_of("ou_1") == ["om_1", "om_3"]
    assert db.running_of("ou_other") == []
    db.finish("om_1", InboxState.ANSWERED)
    assert other.running_of("ou_1") == ["om_3"]


def test_the_first_card_recorded_for_a_message_is_its_card(opener: Opener) -> None:
    db, other = opener(), opener()
    db.receive(message("om_1"), b"{}", 1.0)
    assert db.claim_card("om_1", "card_a") == ("card_a", 0)
    other.reserve_sequence("om_1", 64)
    assert other.claim_card("om_1", "card_b") == ("card_a", 64)  # opened elsewhere first: use it
    assert db.claim_card("om_gone", "card_x") == ("", 0)
    assert db.get("om_gone") is None
