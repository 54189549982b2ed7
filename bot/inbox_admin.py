"""`vlbridge inbox`: the admin's view of the Feishu inbox, and re-queuing a failed message.

Works beside a running service (SQLite allows other processes to read, and to write briefly;
Redis serves them all):
`retry` moves a failed message back to `received`; the service finds it within its poll
interval (2 s) and answers it into the same card, if it had one. The table is drawn with
`rich` (column widths, wrapping and colour when stdout is a terminal, plain text otherwise).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TextIO

import orjson
from rich.console import Console
from rich.table import Table

from bot.inbox_factory import StoreSpec
from bot.store import InboxState, InboxStore, StorageError, StoredMessage, TransitionError
from server.config import Config
from server.errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_age(text: str) -> float:
    """``"90s"``, ``"15m"``, ``"1h"``, ``"2d"`` (a bare number is seconds) -> seconds."""
    match = _AGE.match(text)
    if not match:
        raise ConfigError(f"--since {text!r}: expected a number with s, m, h or d (e.g. 1h)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}" if seconds >= 10 * size else f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _open(config: Config) -> InboxStore:
    spec = StoreSpec.from_config(config, "feishu")
    if spec.backend == "sqlite" and not Path(spec.where).exists():
        raise StorageError(
            f"no inbox at {spec.where}: the service has not run with Feishu enabled here, or [storage] "
            "path differs (pass the service's --config)"
        )
    db = spec.open()
    try:
        db.check()
    except StorageError:
        db.close()
        raise
    return db


def show(
    config: Config,
    out: TextIO,
    *,
    states: list[str],
    chat_id: str,
    since: str | None,
    limit: int,
    as_json: bool,
) -> int:
    db = _open(config)
    try:
        now = time.time()
        rows = db.listing(
            states=[InboxState(s) for s in states],
            chat_id=chat_id,
            since=now - parse_age(since) if since else 0.0,
            limit=limit,
        )
        counts = db.counts()
    finally:
        db.close()
    if as_json:
        for row in rows:
            out.write(orjson.dumps(row.as_json()).decode() + "\n")
        return 0
    console = Console(file=out, width=None if out.isatty() else 160)
    console.print(_table(rows, now))
    console.print("inbox: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    return 0


def _table(rows: list[StoredMessage], now: float) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("message", "chat", "state", "age", "attempts", "reason / text"):
        table.add_column(column, overflow="fold" if column == "reason / text" else "ellipsis")
    styles = {InboxState.FAILED: "red", InboxState.RUNNING: "yellow", InboxState.RECEIVED: "cyan"}
    for row in rows:
        detail = row.reason or row.text.replace("\n", " ")
        if row.image_keys:
            detail = f"[{len(row.image_keys)} picture(s)] {detail}".strip()
        table.add_row(
            row.message_id,
            row.chat_id,
            row.state.value,
            age(now - row.received_at),
            str(row.attempts),
            detail[:120],
            style=styles.get(row.state),
        )
    return table


def retry(config: Config, message_id: str, out: TextIO, err: TextIO) -> int:
    db = _open(config)
    try:
        before = db.get(message_id)
        db.retry(message_id)
    except TransitionError:
        state = f"is {before.state.value}" if before else "is not in the inbox"
        err.write(f"vlbridge inbox: message {message_id} {state}; only a failed message can be retried\n")
        return 1
    finally:
        db.close()
    reason = before.reason if before else ""
    out.write(
        f"message {message_id} queued again (it had failed: {reason or 'no reason recorded'}); "
        "the running service answers it within a few seconds\n"
    )
    return 0
