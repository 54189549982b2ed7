"""A durable inbox: which platform messages were already accepted, kept across restarts.

Feishu redelivers an event it thinks was not acknowledged (after ~15 s, 5 min, 1 h, 6 h) and
may deliver one event to a client twice; `claim(message_id)` answers True exactly once per
message id within `retention` (>= 12 h), also across process restarts, so every message is
answered at most once. The accepted row records what became of it (`mark`).

Storage is one SQLite file (stdlib ``sqlite3``) owned by one worker thread: every call is
handed to that thread, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("vlbridge.inbox")

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    platform    TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    received_at REAL NOT NULL,
    state       TEXT NOT NULL,
    PRIMARY KEY (platform, message_id)
)"""


class InboxState(StrEnum):
    ACCEPTED = "accepted"  # claimed, being handled
    ANSWERED = "answered"
    IGNORED = "ignored"  # deliberately not answered (not for us, stale, ...)
    FAILED = "failed"  # handling raised; the user got an error sentence if at all possible


class Inbox:
    """Call `open()` before use and `close()` at the end; safe to share across tasks."""

    def __init__(self, path: Path, *, platform: str, retention_hours: float) -> None:
        self.path = path
        self.platform = platform
        self.retention = retention_hours * 3600.0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inbox")
        self._db: sqlite3.Connection | None = None
        self._last_prune = 0.0

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def open(self) -> None:
        await self._run(self._open)

    async def close(self) -> None:
        await self._run(self._close)
        self._pool.shutdown(wait=True)

    async def claim(self, message_id: str) -> bool:
        """True the first time *message_id* is seen (it is then recorded as accepted)."""
        result: bool = await self._run(self._claim, message_id, time.time())
        return result

    async def mark(self, message_id: str, state: InboxState) -> None:
        await self._run(self._mark, message_id, state.value)

    async def state(self, message_id: str) -> InboxState | None:
        value: str | None = await self._run(self._state, message_id)
        return InboxState(value) if value else None

    # -- on the inbox thread ----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("expected an open inbox, got a closed one")
        return self._db

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(_SCHEMA)
        self._db = db
        self._prune(time.time())
        log.info("inbox %s open", self.path)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _prune(self, now: float) -> None:
        self._last_prune = now
        cursor = self._conn().execute(
            "DELETE FROM inbox WHERE platform = ? AND received_at < ?", (self.platform, now - self.retention)
        )
        if cursor.rowcount:
            log.info("inbox: forgot %d message ids older than %.0f h", cursor.rowcount, self.retention / 3600)

    def _claim(self, message_id: str, now: float) -> bool:
        if now - self._last_prune > 600:
            self._prune(now)
        cursor = self._conn().execute(
            "INSERT OR IGNORE INTO inbox (platform, message_id, received_at, state) VALUES (?, ?, ?, ?)",
            (self.platform, message_id, now, InboxState.ACCEPTED.value),
        )
        return cursor.rowcount == 1

    def _mark(self, message_id: str, state: str) -> None:
        self._conn().execute(
            "UPDATE inbox SET state = ? WHERE platform = ? AND message_id = ?",
            (state, self.platform, message_id),
        )

    def _state(self, message_id: str) -> str | None:
        row = (
            self._conn()
            .execute(
                "SELECT state FROM inbox WHERE platform = ? AND message_id = ?", (self.platform, message_id)
            )
            .fetchone()
        )
        return str(row[0]) if row else None
