"""One message, one card, when two services race to open it: a queue place shown by one while
the other starts the answer (real CardKit calls against the fake platform, one shared inbox)."""

from __future__ import annotations

import time

import pytest

from bot.feishu.adapter import InboxJournal
from bot.feishu.cards import CardStream
from bot.feishu.openapi import FeishuApi
from bot.inbox import Inbox
from bot.types import ChatType, InboundMessage, MessageKind
from tests.fakefeishu import FakeFeishu


async def stored_message(fake: FakeFeishu, inbox: Inbox) -> str:
    event = fake.events.text("what is this?")
    fake.register_event(event, {})
    message_id = str(event["event"]["message"]["message_id"])
    message = InboundMessage(
        message_id, "oc_1", ChatType.PRIVATE, "ou_1", MessageKind.TEXT, text="what is this?"
    )
    await inbox.receive(message, b"{}", time.time())
    return message_id


def stream(api: FeishuApi, inbox: Inbox, message_id: str) -> CardStream:
    """A card stream as a service makes it from a snapshot of the row taken before the other
    service recorded its card (card_id still empty)."""
    return CardStream(api, message_id, in_thread=False, interval=0.0, journal=InboxJournal(inbox, message_id))


@pytest.mark.parametrize("placeholder_first", [True, False], ids=["queue-place-first", "answer-first"])
async def test_two_services_opening_one_messages_card_share_it(
    fake_feishu: FakeFeishu, inbox: Inbox, placeholder_first: bool
) -> None:
    api = FeishuApi(fake_feishu.app_id, fake_feishu.app_secret, fake_feishu.url)
    try:
        message_id = await stored_message(fake_feishu, inbox)
        place, answer = stream(api, inbox, message_id), stream(api, inbox, message_id)
        if placeholder_first:
            await place.open("排队中，前面还有 3 个", placeholder=True)
            await place.detach()
            await answer.open("思考中…")
        else:
            await answer.open("思考中…")
            await place.open("排队中，前面还有 3 个", placeholder=True)
            await place.detach()
        answer.update("a cat on a mat")
        await answer.close("a cat on a mat")
        assert not answer.fallback
        replies = [m for m in fake_feishu.records.replies() if m.parent_id == message_id]
        assert len(replies) == 1 and replies[0].card_id == answer.card_id
        card = fake_feishu.records.card(answer.card_id)
        assert card.closed and card.final_text == "a cat on a mat"
        stored = await inbox.run(inbox.db.get, message_id)
        assert stored is not None and stored.card_id == answer.card_id
    finally:
        api.close()
