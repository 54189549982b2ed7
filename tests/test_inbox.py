"""The durable inbox: one row per message, a checked state machine, kept across reopens."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from bot.inbox import Inbox, InboxDb, InboxState, StorageError, TransitionError
from bot.inbox_admin import age, parse_age
from bot.types import ChatType, InboundMessage, MessageKind
from server.errors import ConfigError


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


def db_at(tmp_path: Path) -> InboxDb:
    return InboxDb(tmp_path / "inbox.sqlite3", platform="feishu", retention_hours=12)


def test_a_message_is_received_once_and_kept_with_what_answers_it(tmp_path: Path) -> None:
    db = db_at(tmp_path)
    assert db.receive(message("om_1", images=("img_a", "img_b")), b'{"raw": 1}', 2000.0) is True
    assert db.receive(message("om_1"), b"{}", 2001.0) is False  # a redelivery
    db.close()
    again = db_at(tmp_path)  # a restart
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
    again.close()


def test_transitions_are_checked(tmp_path: Path) -> None:
    db = db_at(tmp_path)
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
    db.close()


def test_attempts_count_deaths_not_requeues_and_an_admin_retry_starts_afresh(tmp_path: Path) -> None:
    db = db_at(tmp_path)
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
    db.close()


def test_the_reply_is_recorded_and_sequences_only_grow(tmp_path: Path) -> None:
    db = db_at(tmp_path)
    db.receive(message("om_1"), b"{}", 1.0)
    db.note_reply("om_1", card_id="card_1")
    db.note_reply("om_1", reply_id="om_reply")
    db.reserve_sequence("om_1", 64)
    db.reserve_sequence("om_1", 10)  # an older reservation arriving late changes nothing
    stored = db.get("om_1")
    assert stored is not None and (stored.card_id, stored.reply_id, stored.sequence) == (
        "card_1",
        "om_reply",
        64,
    )
    db.close()


def test_heads_are_the_oldest_message_of_each_idle_conversation(tmp_path: Path) -> None:
    db = db_at(tmp_path)
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
    db.close()


def test_pruning_forgets_finished_messages_only(tmp_path: Path) -> None:
    db = db_at(tmp_path)
    for mid in ("old_done", "old_waiting"):
        db.receive(message(mid), b"{}", 1.0)
    db.start("old_done")
    db.finish("old_done", InboxState.ANSWERED)
    assert db.prune(now=1e9) == 1
    assert db.get("old_done") is None and db.get("old_waiting") is not None
    db.close()


def test_a_version_1_inbox_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite3"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE inbox (platform TEXT NOT NULL, message_id TEXT NOT NULL, received_at REAL NOT NULL,"
        " state TEXT NOT NULL, PRIMARY KEY (platform, message_id))"
    )
    old.executemany(
        "INSERT INTO inbox VALUES ('feishu', ?, ?, ?)",
        [("om_done", 5.0, "answered"), ("om_lost", 6.0, "accepted")],
    )
    old.commit()
    old.close()
    db = InboxDb(path, platform="feishu")
    assert db.receive(message("om_done"), b"{}", 7.0) is False  # still deduplicated
    lost = db.get("om_lost")
    assert lost is not None and lost.state is InboxState.FAILED and "upgrade" in lost.reason
    db.close()


def test_a_damaged_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite3"
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(StorageError) as caught:
        Inbox(path, platform="feishu", retention_hours=12).open_now()
    text = str(caught.value)
    assert str(path) in text and "damaged" in text and "\n" not in text


async def test_one_inbox_serves_one_service(tmp_path: Path) -> None:
    first = Inbox(tmp_path / "inbox.sqlite3", platform="feishu", retention_hours=12)
    await first.open()
    second = Inbox(tmp_path / "inbox.sqlite3", platform="feishu", retention_hours=12)
    with pytest.raises(StorageError, match=r"in use by another vlbridge service \(pid \d+\)"):
        await second.open()
    await first.close()
    await second.open()  # free again once the first one closed
    assert await second.receive(message("om_1"), b"{}", 1.0) is True
    await second.close()


def test_a_held_write_lock_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "inbox.sqlite3"
    InboxDb(path, platform="feishu").close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr("bot.inbox.BUSY_TIMEOUT_MS", 100)
    try:
        with pytest.raises(StorageError, match=r"locked.*another process holds a lock"):
            Inbox(path, platform="feishu", retention_hours=12).open_now()
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_admin_ages_read_and_print_as_people_write_them() -> None:
    assert [parse_age(t) for t in ("90s", "15m", "1h", "2d", "30", "1.5h")] == [
        90,
        900,
        3600,
        172800,
        30,
        5400,
    ]
    for bad in ("", "1w", "h", "-1h", "1 hour"):
        with pytest.raises(ConfigError, match="expected a number with s, m, h or d"):
            parse_age(bad)
    assert [age(s) for s in (5, 90, 3600 * 5, 86400 * 30)] == ["5s", "1.5m", "5.0h", "30d"]
