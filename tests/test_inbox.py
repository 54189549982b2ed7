"""The SQLite inbox: its migration, file errors and one-service lock (the store contract that
every backend passes is tests/test_inbox_contract.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bot.inbox import Inbox, InboxDb, InboxState, StorageError
from bot.inbox_admin import age, parse_age
from server.errors import ConfigError
from tests.test_inbox_contract import message


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
        Inbox.sqlite(path, platform="feishu", retention_hours=12).open_now()
    text = str(caught.value)
    assert str(path) in text and "damaged" in text and "\n" not in text


async def test_one_inbox_serves_one_service(tmp_path: Path) -> None:
    first = Inbox.sqlite(tmp_path / "inbox.sqlite3", platform="feishu", retention_hours=12)
    await first.open()
    second = Inbox.sqlite(tmp_path / "inbox.sqlite3", platform="feishu", retention_hours=12)
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
            Inbox.sqlite(path, platform="feishu", retention_hours=12).open_now()
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


def test_a_version_2_inbox_gets_leases(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite3"
    db = InboxDb(path, platform="feishu")
    db.receive(message("om_running"), b"{}", 1.0)
    db.start("om_running")
    db.close()
    old = sqlite3.connect(path)  # as version 2 left it: no lease column
    old.execute("ALTER TABLE messages DROP COLUMN lease_until")
    old.execute("ALTER TABLE messages DROP COLUMN receipt_id")
    old.execute("PRAGMA user_version = 2")
    old.commit()
    old.close()
    db = InboxDb(path, platform="feishu")
    [taken] = db.claim(now=2.0, lease_until=100.0)  # a version 2 lease: ended long ago
    assert (taken.message_id, taken.state, taken.attempts) == ("om_running", InboxState.RUNNING, 1)
    db.close()


def test_a_version_4_inbox_gets_receipts(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite3"
    InboxDb(path, platform="feishu").close()
    old = sqlite3.connect(path)  # as version 4 left it: receipts were kept in memory
    old.execute("ALTER TABLE messages DROP COLUMN receipt_id")
    old.execute("PRAGMA user_version = 4")
    old.commit()
    old.close()
    db = InboxDb(path, platform="feishu")
    db.receive(message("om_waiting"), b"{}", 1.0)
    assert db.claim_receipt("om_waiting", "r_1") == "r_1"
    assert db.take_receipt("om_waiting", "r_1")
    db.close()
