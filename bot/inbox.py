"""The durable inbox: every accepted platform message, what became of it, and its reply.

A message is acknowledged to the platform only after `InboxDb.receive` committed it: from then
on the inbox, not the platform, is responsible for it. Each row holds everything needed to
answer without the platform's help (chat, thread, sender, text, picture keys, the raw event)
and moves through a checked state machine::

    received -> running -> answered | failed(reason) | ignored
        ^          |                   |
        +----------+ (requeue)         +-- (admin retry) -> received

`attempts` counts the starts of a message; a message found `running` at start-up was being
answered when the process died. The reply it produced (card id, reply message id, the highest
CardKit `sequence` reserved) is recorded as it happens, so a recovered message finishes the
same card instead of sending a second one.

Storage: one SQLite file in WAL mode, ``synchronous=NORMAL`` plus a group sync (`WalSync`): a
commit is in the log at once, so it survives a killed process (kill -9, OOM) immediately; the
log is fsynced within `SYNC_WITHIN` (1 s) of a commit, so it survives a power cut or a kernel
crash from then on (as Redis' ``appendfsync everysec``). ``synchronous=FULL`` (an fsync inside
every commit) would close that window, but an ack waits for its commit and the SDK handles
events one after the other: on a loaded machine an fsync takes 3-5 ms with spikes of 100+ ms,
and acks of a 500-event burst queued behind them for up to 0.9 s (docs/feishu.md has the
measurements). Several processes may use the file at once (the
long-connection worker inserts, the service moves states, `vlbridge inbox retry` re-queues),
each with a generous busy timeout; one *service* per file is enforced with a lock file
(`Inbox.open`).

`InboxDb` is the SQLite store (one connection, one thread); the contract it shares with the
Redis store (`bot.inbox_redis`) is `bot.store.InboxStore`. `Inbox` is the service's asynchronous
face over either: every call runs on its own thread, so the event loop never waits on storage.
"""

from __future__ import annotations

__all__ = [
    "FINAL",
    "PENDING",
    "Inbox",
    "InboxDb",
    "InboxState",
    "InboxStore",
    "StorageError",
    "StoredMessage",
    "TransitionError",
]

import asyncio
import fcntl
import functools
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TypeVar

import orjson

from bot.store import (
    FINAL,
    PENDING,
    RATE_WINDOW,
    InboxState,
    InboxStore,
    StorageError,
    StoredMessage,
    TransitionError,
    check_final,
    transition_error,
)
from bot.types import InboundMessage

log = logging.getLogger("vlbridge.inbox")

T = TypeVar("T")

SCHEMA_VERSION = 5
BUSY_TIMEOUT_MS = 10_000
SYNC_WITHIN = 1.0  # seconds from a commit to its fsync (durable against a power cut from then on)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
    platform     TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    chat_id      TEXT NOT NULL DEFAULT '',
    context_key  TEXT NOT NULL DEFAULT '',           -- chat, or chat/thread
    sender_id    TEXT NOT NULL DEFAULT '',
    text         TEXT NOT NULL DEFAULT '',
    image_keys   TEXT NOT NULL DEFAULT '[]',         -- JSON list
    created_at   REAL NOT NULL DEFAULT 0,            -- when the user sent it (platform clock)
    received_at  REAL NOT NULL,                      -- when it was persisted (and then acked)
    body         BLOB,                               -- the platform's event, as received
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    reason       TEXT NOT NULL DEFAULT '',
    updated_at   REAL NOT NULL,
    card_id      TEXT NOT NULL DEFAULT '',
    reply_id     TEXT NOT NULL DEFAULT '',
    sequence     INTEGER NOT NULL DEFAULT 0,         -- highest CardKit sequence reserved
    lease_until  REAL NOT NULL DEFAULT 0,            -- running: held by its process until then
    receipt_id   TEXT NOT NULL DEFAULT '',           -- version 5: the reaction shown while it waits
    UNIQUE (platform, message_id)
);
CREATE INDEX IF NOT EXISTS messages_state ON messages (platform, state, seq);
CREATE INDEX IF NOT EXISTS messages_chat ON messages (platform, chat_id, seq);
CREATE INDEX IF NOT EXISTS messages_context ON messages (platform, context_key, seq);
CREATE TABLE IF NOT EXISTS contexts (                -- version 4: chat memory survives restarts
    platform     TEXT NOT NULL,
    key          TEXT NOT NULL,
    data         BLOB NOT NULL,
    expires_at   REAL NOT NULL,
    PRIMARY KEY (platform, key)
);
CREATE TABLE IF NOT EXISTS questions (               -- version 4: rate limits survive restarts
    platform     TEXT NOT NULL,
    user         TEXT NOT NULL,
    at           REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS questions_user ON questions (platform, user, at);
"""

_COLUMNS = (
    "seq, message_id, chat_id, context_key, sender_id, text, image_keys, created_at, received_at,"
    " body, state, attempts, reason, updated_at, card_id, reply_id, sequence, receipt_id"
)


def _describe(path: Path, exc: BaseException) -> StorageError:
    """One line naming the file, what is wrong and what to do."""
    text = str(exc)
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        advice = (
            "the file is damaged; stop the service, move the file aside (keep it for inspection) "
            "and start again with a fresh one"
        )
    elif "locked" in text or "busy" in text:
        advice = "another process holds a lock on it; stop that process or wait, then start again"
    elif "readonly" in text or "unable to open" in text or isinstance(exc, OSError):
        advice = (
            "the service cannot write there; fix the permissions or set [storage] path to a writable folder"
        )
    else:
        advice = "check the file and the folder it is in"
    return StorageError(f"inbox {path}: {text}; {advice}")


class WalSync:
    """Group commit for power cuts: fsync the write-ahead log once per `SYNC_WITHIN` window in
    which something was committed (a daemon thread; `touch()` after a commit)."""

    def __init__(self, path: Path) -> None:
        self.wal = path.with_name(path.name + "-wal")
        self._dirty = threading.Event()
        self._stopped = False
        threading.Thread(target=self._run, name="inbox-wal-sync", daemon=True).start()

    def touch(self) -> None:
        self._dirty.set()

    def stop(self) -> None:
        self._stopped = True
        self._dirty.set()

    def _run(self) -> None:
        while not self._stopped:
            self._dirty.wait()
            time.sleep(SYNC_WITHIN)  # gather the window's commits into one fsync
            self._dirty.clear()
            self.sync()

    def sync(self) -> None:
        try:
            fd = os.open(self.wal, os.O_RDONLY)
        except FileNotFoundError:
            return  # checkpointed and removed: the database file itself was synced
        try:
            os.fsync(fd)
        except OSError as exc:
            log.error("inbox: the log %s could not be synced to disk: %s", self.wal, exc)
        finally:
            os.close(fd)


class InboxDb:
    """The SQLite store (`bot.store.InboxStore`); one connection, used from one thread at a time."""

    def __init__(self, path: Path, *, platform: str, retention_hours: float = 24.0) -> None:
        self.path = path
        self.platform = platform
        self.retention = retention_hours * 3600.0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Opened on one thread and used on another (the service's inbox thread), never two at once.
            self._db = sqlite3.connect(
                path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # and `WalSync`
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise _describe(path, exc) from None
        self._sync = WalSync(path)

    def close(self) -> None:
        self._sync.stop()
        self._sync.sync()
        self._db.close()

    def _migrate(self) -> None:
        db = self._db
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version >= SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in db.execute("PRAGMA table_info(messages)").fetchall()}
            if columns and "lease_until" not in columns:  # version 2: leases came with version 3
                db.execute("ALTER TABLE messages ADD COLUMN lease_until REAL NOT NULL DEFAULT 0")
            if columns and "receipt_id" not in columns:  # receipts were kept in memory before 5
                db.execute("ALTER TABLE messages ADD COLUMN receipt_id TEXT NOT NULL DEFAULT ''")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            old = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'inbox'").fetchone()
            if old:
                # Version 1 kept message ids only (dedup). Their messages cannot be answered now: an
                # id still "accepted" was lost by the old version; it is recorded as failed.
                db.execute(
                    "INSERT OR IGNORE INTO messages (platform, message_id, received_at, state, reason,"
                    " updated_at) SELECT platform, message_id, received_at,"
                    " CASE state WHEN 'accepted' THEN 'failed' ELSE state END,"
                    " CASE state WHEN 'accepted' THEN 'accepted before an upgrade' ELSE '' END,"
                    " received_at FROM inbox"
                )
                db.execute("DROP TABLE inbox")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def check(self) -> None:
        """Raise `StorageError` unless the file is whole and writable."""
        try:
            result = str(self._db.execute("PRAGMA quick_check").fetchone()[0])
            if result != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed ({result})")
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise _describe(self.path, exc) from None

    # -- arrivals ---------------------------------------------------------------------------------

    def receive(
        self, message: InboundMessage, body: bytes, received_at: float, *, ordered: bool = True
    ) -> bool:
        """Persist a newly delivered message; False when it was already there (a redelivery).
        An *ordered* message waits for the earlier ones of its conversation; one that is not (a
        command such as /cancel) is a conversation of its own."""
        key = message.context_key if ordered else f"{message.context_key}#{message.message_id}"
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO messages (platform, message_id, chat_id, context_key, sender_id,"
            " text, image_keys, created_at, received_at, body, state, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self.platform,
                message.message_id,
                message.chat_id,
                key,
                message.sender_id,
                message.text,
                orjson.dumps(list(message.image_keys)).decode(),
                message.created_at,
                received_at,
                body,
                InboxState.RECEIVED.value,
                received_at,
            ),
        )
        self._sync.touch()
        return cursor.rowcount == 1

    # -- the state machine ------------------------------------------------------------------------

    def _move(
        self,
        message_id: str,
        expected: Iterable[InboxState],
        new: InboxState,
        *,
        sets: str = "",
        values: tuple[object, ...] = (),
    ) -> StoredMessage:
        expected = tuple(expected)
        marks = ", ".join("?" for _ in expected)
        cursor = self._db.execute(
            f"UPDATE messages SET state = ?, updated_at = ?{sets} WHERE platform = ? AND message_id = ?"
            f" AND state IN ({marks}) RETURNING {_COLUMNS}",
            (new.value, time.time(), *values, self.platform, message_id, *(s.value for s in expected)),
        )
        row = cursor.fetchone()
        self._sync.touch()
        if row is None:
            current = self.get(message_id)
            raise transition_error(message_id, expected, current.state if current else None, new)
        return StoredMessage.from_row(row)

    def start(self, message_id: str, lease_until: float = math.inf) -> StoredMessage:
        """received -> running; counts an attempt; leased until *lease_until*."""
        return self._move(
            message_id,
            [InboxState.RECEIVED],
            InboxState.RUNNING,
            sets=", attempts = attempts + 1, lease_until = ?",
            values=(lease_until,),
        )

    def renew(self, message_ids: Sequence[str], lease_until: float) -> None:
        self._db.executemany(
            "UPDATE messages SET lease_until = ? WHERE platform = ? AND message_id = ? AND state = ?",
            [(lease_until, self.platform, mid, InboxState.RUNNING.value) for mid in message_ids],
        )
        self._sync.touch()

    def claim(self, now: float, lease_until: float) -> list[StoredMessage]:
        ended = "1" if math.isinf(now) else "lease_until < ?"  # inf < inf is false
        rows = self._db.execute(
            f"UPDATE messages SET lease_until = ? WHERE platform = ? AND state = ? AND {ended}"
            f" RETURNING {_COLUMNS}",
            (lease_until, self.platform, InboxState.RUNNING.value, *(() if math.isinf(now) else (now,))),
        ).fetchall()
        self._sync.touch()
        return sorted((StoredMessage.from_row(row) for row in rows), key=lambda m: m.seq)

    def finish(self, message_id: str, state: InboxState, reason: str = "") -> StoredMessage:
        """running -> answered | failed(reason) | ignored."""
        check_final(message_id, state)
        return self._move(message_id, [InboxState.RUNNING], state, sets=", reason = ?", values=(reason,))

    def requeue(self, message_id: str) -> StoredMessage:
        """running -> received, not counted as an attempt (the executor was full, or the service
        stopped before the answer could finish)."""
        return self._move(
            message_id, [InboxState.RUNNING], InboxState.RECEIVED, sets=", attempts = MAX(0, attempts - 1)"
        )

    def recover(self, message_id: str) -> StoredMessage:
        """running -> received at start-up: the process died while answering (the attempt counts)."""
        return self._move(message_id, [InboxState.RUNNING], InboxState.RECEIVED)

    def retry(self, message_id: str) -> StoredMessage:
        """failed -> received, attempts reset: an admin asks for another try."""
        return self._move(
            message_id, [InboxState.FAILED], InboxState.RECEIVED, sets=", attempts = 0, reason = ''"
        )

    # -- the reply --------------------------------------------------------------------------------

    def note_reply(self, message_id: str, *, card_id: str | None = None, reply_id: str | None = None) -> None:
        if card_id is not None:
            self._set(message_id, "card_id = ?", card_id)
        if reply_id is not None:
            self._set(message_id, "reply_id = ?", reply_id)

    def claim_receipt(self, message_id: str, receipt_id: str) -> str:
        row = self._db.execute(
            "UPDATE messages SET receipt_id = CASE receipt_id WHEN '' THEN ? ELSE receipt_id END"
            " WHERE platform = ? AND message_id = ? RETURNING receipt_id",
            (receipt_id, self.platform, message_id),
        ).fetchone()
        self._sync.touch()
        return str(row[0]) if row else ""

    def take_receipt(self, message_id: str, receipt_id: str) -> bool:
        cursor = self._db.execute(
            "UPDATE messages SET receipt_id = '' WHERE platform = ? AND message_id = ? AND receipt_id = ?"
            " AND receipt_id != ''",
            (self.platform, message_id, receipt_id),
        )
        self._sync.touch()
        return cursor.rowcount == 1

    def claim_card(self, message_id: str, card_id: str) -> tuple[str, int]:
        row = self._db.execute(
            "UPDATE messages SET card_id = CASE card_id WHEN '' THEN ? ELSE card_id END"
            " WHERE platform = ? AND message_id = ? RETURNING card_id, sequence",
            (card_id, self.platform, message_id),
        ).fetchone()
        self._sync.touch()
        return (str(row[0]), int(row[1])) if row else ("", 0)

    def reserve_sequence(self, message_id: str, upto: int) -> None:
        """Record that CardKit sequences up to *upto* may have been used on this message's card."""
        self._set(message_id, "sequence = MAX(sequence, ?)", upto)

    def _set(self, message_id: str, assignment: str, value: object) -> None:
        self._db.execute(
            f"UPDATE messages SET {assignment} WHERE platform = ? AND message_id = ?",
            (value, self.platform, message_id),
        )
        self._sync.touch()

    # -- reading ----------------------------------------------------------------------------------

    def get(self, message_id: str) -> StoredMessage | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE platform = ? AND message_id = ?",
            (self.platform, message_id),
        ).fetchone()
        return StoredMessage.from_row(row) if row else None

    def in_state(self, state: InboxState, limit: int = 1000, after_seq: int = 0) -> list[StoredMessage]:
        """Messages in *state*, in arrival order."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE platform = ? AND state = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (self.platform, state.value, after_seq, limit),
        ).fetchall()
        return [StoredMessage.from_row(row) for row in rows]

    def heads(self, busy: tuple[str, ...], limit: int) -> list[StoredMessage]:
        """The oldest received message of each conversation that has nothing earlier pending and
        is not in *busy*, in arrival order: what may start now."""
        marks = ", ".join("?" for _ in busy)
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages m WHERE platform = ? AND state = ?"
            f" AND context_key NOT IN ({marks}) AND NOT EXISTS (SELECT 1 FROM messages e"
            " WHERE e.platform = m.platform AND e.context_key = m.context_key AND e.seq < m.seq"
            " AND e.state IN (?, ?)) ORDER BY seq LIMIT ?",
            (self.platform, InboxState.RECEIVED.value, *busy, *(s.value for s in PENDING), limit),
        ).fetchall()
        return [StoredMessage.from_row(row) for row in rows]

    def running_of(self, sender_id: str) -> list[str]:
        rows = self._db.execute(
            "SELECT message_id FROM messages WHERE platform = ? AND state = ? AND sender_id = ? ORDER BY seq",
            (self.platform, InboxState.RUNNING.value, sender_id),
        ).fetchall()
        return [str(row[0]) for row in rows]

    def counts(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT state, COUNT(*) FROM messages WHERE platform = ? GROUP BY state", (self.platform,)
        ).fetchall()
        found = {str(state): int(n) for state, n in rows}
        return {state.value: found.get(state.value, 0) for state in InboxState}

    def listing(
        self,
        *,
        states: Iterable[InboxState] = (),
        chat_id: str = "",
        since: float = 0.0,
        limit: int = 200,
    ) -> list[StoredMessage]:
        """The admin view: newest first, filtered by state, chat and arrival time."""
        where, values = ["platform = ?", "received_at >= ?"], [self.platform, since]
        chosen = [s.value for s in states]
        if chosen:
            where.append(f"state IN ({', '.join('?' for _ in chosen)})")
            values.extend(chosen)
        if chat_id:
            where.append("chat_id = ?")
            values.append(chat_id)
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
            (*values, limit),
        ).fetchall()
        return [StoredMessage.from_row(row) for row in rows]

    def prune(self, now: float) -> int:
        """Forget finished messages older than the retention (pending ones are kept, however old),
        expired contexts and questions older than the rate window."""
        cursor = self._db.execute(
            "DELETE FROM messages WHERE platform = ? AND received_at < ? AND state IN (?, ?, ?)",
            (self.platform, now - self.retention, *(s.value for s in FINAL)),
        )
        self._db.execute("DELETE FROM contexts WHERE platform = ? AND expires_at <= ?", (self.platform, now))
        self._db.execute(
            "DELETE FROM questions WHERE platform = ? AND at <= ?", (self.platform, now - RATE_WINDOW)
        )
        return cursor.rowcount

    # -- conversation memory ----------------------------------------------------------------------

    def load_context(self, key: str, now: float) -> bytes | None:
        row = self._db.execute(
            "SELECT data FROM contexts WHERE platform = ? AND key = ? AND expires_at > ?",
            (self.platform, key, now),
        ).fetchone()
        return bytes(row[0]) if row else None

    def save_context(self, key: str, data: bytes, expires_at: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO contexts (platform, key, data, expires_at) VALUES (?, ?, ?, ?)",
            (self.platform, key, data, expires_at),
        )
        self._sync.touch()

    def drop_context(self, key: str) -> None:
        self._db.execute("DELETE FROM contexts WHERE platform = ? AND key = ?", (self.platform, key))
        self._sync.touch()

    def take_turn(self, user: str, now: float, per_minute: int) -> float | None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "DELETE FROM questions WHERE platform = ? AND user = ? AND at <= ?",
                (self.platform, user, now - RATE_WINDOW),
            )
            count, first = db.execute(
                "SELECT COUNT(*), MIN(at) FROM questions WHERE platform = ? AND user = ?",
                (self.platform, user),
            ).fetchone()
            if count >= per_minute:
                db.execute("COMMIT")
                return RATE_WINDOW - (now - float(first))
            db.execute(
                "INSERT INTO questions (platform, user, at) VALUES (?, ?, ?)", (self.platform, user, now)
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._sync.touch()
        return None


class Inbox:
    """The service's inbox over a store backend: `open()` before use, `close()` at the end; safe
    to share across tasks. Every store call runs on the inbox's own thread.

    *opener* makes the store (`bot.inbox_factory` picks the backend); *name* says where it is in
    log lines (the file, or the Redis address without its password). With *lock_beside* (the
    SQLite file), `open()` takes an exclusive lock on ``<file>.lock`` for the life of the service:
    two services answering from one file would answer every message twice.
    """

    def __init__(
        self,
        opener: Callable[[], InboxStore],
        *,
        name: str,
        retention_hours: float,
        lock_beside: Path | None = None,
    ) -> None:
        self.opener = opener
        self.name = name
        self.retention_hours = retention_hours
        self.lock_beside = lock_beside
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inbox")
        self._db: InboxStore | None = None
        self._lock: IO[str] | None = None
        self._last_prune = 0.0

    @classmethod
    def sqlite(cls, path: Path, *, platform: str, retention_hours: float) -> Inbox:
        return cls(
            lambda: InboxDb(path, platform=platform, retention_hours=retention_hours),
            name=str(path),
            retention_hours=retention_hours,
            lock_beside=path,
        )

    @property
    def is_open(self) -> bool:
        return self._db is not None

    @property
    def db(self) -> InboxStore:
        if self._db is None:
            raise RuntimeError("expected an open inbox, got a closed one")
        return self._db

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the inbox thread (for store methods: ``inbox.run(inbox.db.get, id)``)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def open(self) -> None:
        await self.run(self.open_now)

    def open_now(self) -> None:
        """Open synchronously (start-up, before anything else runs); raises `StorageError`."""
        if self.lock_beside is not None:
            self._lock = _lock_file(self.lock_beside)
        try:
            db = self.opener()
            try:
                db.check()
            except StorageError:
                db.close()
                raise
        except BaseException:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            raise
        self._db = db
        log.info("inbox %s open: %s", self.name, db.counts())

    async def close(self) -> None:
        await self.run(self._close)
        self._pool.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    async def receive(
        self, message: InboundMessage, body: bytes, received_at: float, *, ordered: bool = True
    ) -> bool:
        return await self.run(functools.partial(self.db.receive, ordered=ordered), message, body, received_at)

    async def prune_now_and_then(self, now: float) -> None:
        if now - self._last_prune > 600:
            self._last_prune = now
            forgotten = await self.run(self.db.prune, now)
            if forgotten:
                log.info(
                    "inbox: forgot %d answered messages older than %.0f h", forgotten, self.retention_hours
                )


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def lock_holder(path: Path) -> str | None:
    """The pid (as written in the lock file) of the service holding the inbox *path*, or None when no
    process holds it. Creates nothing and leaves the lock as it found it; raises `StorageError` when
    the lock file exists and cannot be read."""
    try:
        handle = open(_lock_path(path))  # noqa: SIM115 - closed below, whatever flock says
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _describe(path, exc) from None
    try:
        # A shared lock conflicts only with the service's exclusive one, and is dropped at close.
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return handle.read().strip() or "?"
    finally:
        handle.close()
    return None


def _lock_file(path: Path) -> IO[str]:
    lock_path = _lock_path(path)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")  # noqa: SIM115 - held open for the life of the service
    except OSError as exc:
        raise _describe(path, exc) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise StorageError(
            f"inbox {path}: in use by another vlbridge service (pid {holder}); one inbox serves one "
            "service: stop the other one or give this one its own [storage] path"
        ) from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
