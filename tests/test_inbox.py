"""The durable inbox: one claim per message id, surviving a reopen (a restart)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.inbox import Inbox, InboxState


async def test_claim_once_and_survive_restart(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox.sqlite3", platform="feishu", retention_hours=12)
    await inbox.open()
    results = await asyncio.gather(*(inbox.claim("om_1") for _ in range(5)))
    assert sorted(results) == [False, False, False, False, True]
    await inbox.mark("om_1", InboxState.ANSWERED)
    await inbox.close()

    again = Inbox(tmp_path / "inbox.sqlite3", platform="feishu", retention_hours=12)
    await again.open()
    assert await again.claim("om_1") is False
    assert await again.state("om_1") is InboxState.ANSWERED
    assert await again.claim("om_2") is True
    await again.close()


async def test_old_ids_are_forgotten(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox.sqlite3", platform="feishu", retention_hours=12)
    await inbox.open()
    assert await inbox.claim("om_old")
    inbox.retention = -1.0  # everything is older than the retention now
    await inbox._run(inbox._prune, 1e12)
    assert await inbox.state("om_old") is None
    await inbox.close()
