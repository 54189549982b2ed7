"""A waiting message's receipt (a reaction) is removed by whichever service starts the message:
another one sharing the inbox, or this one after a restart; exactly once when several try; one
receipt when several services show the message waiting (real reaction calls against the fake
platform, one shared inbox)."""

from __future__ import annotations

import asyncio
import dataclasses

from bot.feishu.openapi import FeishuApi
from bot.feishu.receipts import Receipts
from bot.inbox import Inbox, InboxState
from tests.fakefeishu import FakeFeishu
from tests.test_feishu_cards_shared import stored_message
from tests.waiting import until


def deletes(fake: FakeFeishu) -> int:
    """Reaction deletes the fake was asked for (also failed ones)."""
    return sum(1 for c in fake.records.api_calls() if c.method == "DELETE" and "/reactions/" in c.path)


async def test_a_receipt_shown_by_one_service_is_removed_by_the_one_that_starts_the_message(
    fake_feishu: FakeFeishu, inbox: Inbox
) -> None:
    """The starter knows nothing of the reaction but what the inbox says: another service
    sharing it, or the one that showed it, restarted."""
    api = FeishuApi(fake_feishu.app_id, fake_feishu.app_secret, fake_feishu.url)
    try:
        message_id = await stored_message(fake_feishu, inbox)
        await Receipts(api, "OnIt", inbox).show(message_id)  # waits for room: the reaction
        (reaction,) = fake_feishu.records.reactions()
        assert reaction.message_id == message_id
        stored = await inbox.run(inbox.db.start, message_id)  # elsewhere, or after a restart
        assert stored.receipt_id == reaction.reaction_id
        starter = Receipts(api, "OnIt", inbox)  # nothing in memory of the reaction
        assert starter.owed(stored)
        await starter.clear(stored)
        assert fake_feishu.records.reactions() == [], "the receipt stayed"
        assert deletes(fake_feishu) == 1
        await starter.clear(stored)  # again (a second service with the same snapshot): nothing
        assert deletes(fake_feishu) == 1
    finally:
        api.close()


async def test_a_message_started_while_its_receipt_was_added_loses_it(
    fake_feishu: FakeFeishu, inbox: Inbox
) -> None:
    """Another service started the message before this one recorded the reaction it was adding
    (its snapshot has no receipt): the service that added it sees the start and removes it."""
    api = FeishuApi(fake_feishu.app_id, fake_feishu.app_secret, fake_feishu.url)
    try:
        message_id = await stored_message(fake_feishu, inbox)
        stored = await inbox.run(inbox.db.start, message_id)
        starter = Receipts(api, "OnIt", inbox)
        assert not starter.owed(stored)
        await Receipts(api, "OnIt", inbox).show(message_id)
        assert fake_feishu.records.reactions() == []
        (reaction,) = fake_feishu.records.reactions(include_deleted=True)
        assert reaction.deleted_at is not None and deletes(fake_feishu) == 1
        now = await inbox.run(inbox.db.get, message_id)
        assert now is not None and (now.state, now.receipt_id) == (InboxState.RUNNING, "")
    finally:
        api.close()


async def test_services_showing_one_waiting_message_leave_one_receipt(
    fake_feishu: FakeFeishu, inbox: Inbox
) -> None:
    """Every service whose executor is full shows the waiting messages: the first reaction
    recorded stays, the others are removed at once; the starter removes that one."""
    api = FeishuApi(fake_feishu.app_id, fake_feishu.app_secret, fake_feishu.url)
    try:
        message_id = await stored_message(fake_feishu, inbox)
        await Receipts(api, "OnIt", inbox).show(message_id)
        await Receipts(api, "OnIt", inbox).show(message_id)
        (kept,) = fake_feishu.records.reactions()
        assert len(fake_feishu.records.reactions(include_deleted=True)) == 2
        stored = await inbox.run(inbox.db.start, message_id)
        assert stored.receipt_id == kept.reaction_id
        await Receipts(api, "OnIt", inbox).clear(stored)
        assert fake_feishu.records.reactions() == [] and deletes(fake_feishu) == 2
    finally:
        api.close()


async def test_a_message_started_here_while_adding_a_second_receipt_loses_both(
    fake_feishu: FakeFeishu, inbox: Inbox
) -> None:
    """Another service's receipt is recorded; this one is adding its own (its call held until
    the message starts here): starting removes the recorded one, the add removes its own."""
    api, held_api = (FeishuApi(fake_feishu.app_id, fake_feishu.app_secret, fake_feishu.url) for _ in range(2))
    try:
        message_id = await stored_message(fake_feishu, inbox)
        await Receipts(api, "OnIt", inbox).show(message_id)
        release = asyncio.Event()
        add = held_api.add_reaction

        async def held(target: str, emoji: str) -> str:
            await release.wait()
            return await add(target, emoji)

        held_api.add_reaction = held  # type: ignore[method-assign]
        here = Receipts(held_api, "OnIt", inbox)
        adding = asyncio.create_task(here.show(message_id))
        waiting = await inbox.run(inbox.db.get, message_id)
        assert waiting is not None
        await until(lambda: here.owed(dataclasses.replace(waiting, receipt_id="")), "the add under way")
        stored = await inbox.run(inbox.db.start, message_id)
        await here.clear(stored)
        release.set()
        await adding
        assert fake_feishu.records.reactions() == [], "a receipt stayed"
        assert len(fake_feishu.records.reactions(include_deleted=True)) == 2 and deletes(fake_feishu) == 2
    finally:
        api.close()
        held_api.close()
