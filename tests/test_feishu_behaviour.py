"""Conversation behaviour through the Feishu adapter (webhook mode, echo engine: fast).

The fake platform records what the bot did; the real SDK decrypts and dispatches.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette

from bot import texts
from bot.feishu.adapter import FeishuAdapter
from bot.feishu.messages import parse_event
from bot.inbox import InboxDb
from server.backend import build_executor
from server.http.platform import mount
from tests.conftest import make_png
from tests.fakefeishu import RATE_LIMITED, TOKEN_INVALID, FakeFeishu, Fault, Route
from tests.feishu_helpers import RecordingExecutor, feishu_config, settle, started
from tests.redisserver import RedisServer
from tests.waiting import until


class Bot:
    def __init__(self, fake: FakeFeishu, adapter: FeishuAdapter, client: httpx.AsyncClient) -> None:
        self.fake, self.adapter, self.client = fake, adapter, client

    async def send(self, event: dict[str, Any], resources: dict[str, bytes] | None = None) -> str:
        self.fake.register_event(event, resources or {})
        request = self.fake.webhook_request(event)
        response = await self.client.post("/feishu/events", content=request.body, headers=request.headers)
        assert response.status_code == 200, response.text
        await settle(self.adapter)
        return str(event["event"]["message"]["message_id"])

    def replies(self, message_id: str) -> list[Any]:
        return [m for m in self.fake.records.replies() if m.parent_id == message_id]

    def answer(self, message_id: str) -> str:
        (reply,) = self.replies(message_id)
        if reply.card_id:
            card = self.fake.records.card(reply.card_id)
            assert card.closed
            return card.final_text
        return str(reply.text)


@asynccontextmanager
async def running_bot(
    fake: FakeFeishu, tmp_path: Path, *, storage: dict[str, Any] | None = None, **overrides: Any
) -> AsyncIterator[Bot]:
    config = feishu_config(
        fake, tmp_path, model="builtin:echo", mode="webhook", max_new_tokens=256, **overrides
    )
    if storage:
        config = config.model_copy(update={"storage": config.storage.model_copy(update=storage)})
    executor = RecordingExecutor(build_executor(config))
    await executor.start()
    adapter = await started(config, executor)
    app = Starlette(routes=[mount(route) for route in adapter.routes()])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bot") as client:
        yield Bot(fake, adapter, client)
    await adapter.stop()
    await executor.stop()


@pytest.fixture
async def bot(fake_feishu: FakeFeishu, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Bot]:
    async with running_bot(fake_feishu, tmp_path, **getattr(request, "param", {})) as bot:
        yield bot


async def test_commands(bot: Bot) -> None:
    events = bot.fake.events
    assert "/reset" in bot.answer(await bot.send(events.text("/help")))
    status = bot.answer(await bot.send(events.text("/status")))
    assert "builtin:echo" in status and "队列" in status
    assert bot.answer(await bot.send(events.text("/cancel"))) == "你现在没有正在生成的回答。"
    assert "/nope" in bot.answer(await bot.send(events.text("/nope")))
    chat = "oc_reset"
    await bot.send(events.image("img_r"), {"img_r": make_png()})
    picture = await bot.send(events.image("img_r2", chat_id=chat), {"img_r2": make_png()})
    assert "96x64" in bot.answer(picture)
    assert bot.answer(await bot.send(events.text("/reset", chat_id=chat))).startswith("好的")
    after = await bot.send(events.text("and now?", chat_id=chat))
    assert bot.answer(after) == "echo: and now?"  # no picture any more


async def test_unsupported_types_get_a_polite_reply(bot: Bot) -> None:
    for event in (bot.fake.events.file(), bot.fake.events.audio(), bot.fake.events.sticker()):
        answer = bot.answer(await bot.send(event))
        assert "看不懂" in answer and event["event"]["message"]["message_type"] in answer


async def test_stale_message_not_answered_as_fresh(bot: Bot) -> None:
    old = bot.fake.events.image("img_old", create_time_ms=int((time.time() - 3600) * 1000))
    answer = bot.answer(await bot.send(old, {"img_old": make_png()}))
    assert "60 分钟前" in answer


async def test_thread_replies_stay_in_thread(bot: Bot) -> None:
    event = bot.fake.events.text("hi there", thread_id="omt_thread_1", root_id="om_root")
    message_id = await bot.send(event)
    (reply,) = bot.replies(message_id)
    assert reply.reply_in_thread


async def test_several_pictures_in_one_post(bot: Bot) -> None:
    event = bot.fake.events.captioned_image("compare", ["img_x", "img_y"])
    answer = bot.answer(await bot.send(event, {"img_x": make_png(32, 32), "img_y": make_png(48, 40)}))
    assert answer == "echo: compare [32x32, 48x40]"


async def test_cardkit_failure_falls_back_to_one_plain_reply(bot: Bot) -> None:
    bot.fake.faults.inject(Route.CARD_CREATE, Fault.error(200001, 400, "card create failed"), times=1)
    message_id = await bot.send(bot.fake.events.text("plain please"))
    (reply,) = bot.replies(message_id)
    assert reply.msg_type == "text" and reply.text == "echo: plain please"


async def test_rate_limits_retried_and_invalid_token_refreshed(bot: Bot) -> None:
    bot.fake.faults.inject(Route.MESSAGE_REPLY, RATE_LIMITED, times=1)
    bot.fake.faults.inject(Route.CARD_UPDATE, TOKEN_INVALID, times=1)  # the close: every answer makes it
    assert await bot.adapter._own_id()  # the first token is fetched by now
    tokens = bot.fake.records.token_fetches
    message_id = await bot.send(bot.fake.events.text("still answered?"))
    assert bot.answer(message_id) == "echo: still answered?"
    assert bot.fake.records.token_fetches == tokens + 1


async def test_a_chat_remembers_its_picture_and_its_minute_across_a_restart(
    fake_feishu: FakeFeishu, tmp_path: Path
) -> None:
    """Context and rate limit live in the store, pictures by reference: a follow-up answered by
    this process uses the picture it downloaded; after a restart it is downloaded again."""
    events = fake_feishu.events

    def downloads() -> int:
        return len(fake_feishu.records.api_calls(Route.MESSAGE_RESOURCE.value))

    async with running_bot(fake_feishu, tmp_path, user_rate_per_minute=3) as bot:
        picture = await bot.send(events.image("img_m", chat_id="oc_mem"), {"img_m": make_png(48, 32)})
        assert bot.answer(picture) == "echo: 请描述这张图片。 [48x32]"
        follow = await bot.send(events.text("and the colour?", chat_id="oc_mem"))
        assert bot.answer(follow) == "echo: and the colour? [48x32]"
        assert downloads() == 1
    async with running_bot(fake_feishu, tmp_path, user_rate_per_minute=3) as bot:
        after = await bot.send(events.text("still there?", chat_id="oc_mem"))
        assert bot.answer(after) == "echo: still there? [48x32]"
        assert downloads() == 2
        limited = await bot.send(events.text("one more", chat_id="oc_mem"))  # the 4th in a minute
        assert bot.answer(limited).startswith("你发得有点快了")
        assert bot.adapter.counts["rate_limited"] == 1


@pytest.mark.parametrize("bot", [{"user_rate_per_minute": 1}], indirect=True)
async def test_per_user_rate_limit(bot: Bot) -> None:
    assert bot.answer(await bot.send(bot.fake.events.text("one"))) == "echo: one"
    assert bot.answer(await bot.send(bot.fake.events.text("two"))).startswith("你发得有点快了")
    assert bot.adapter.counts["rate_limited"] == 1


@pytest.mark.parametrize("bot", [{"allowed_users": ("ou_someone_else",), "language": "en"}], indirect=True)
async def test_allowed_users(bot: Bot) -> None:
    assert "not enabled" in bot.answer(await bot.send(bot.fake.events.text("let me in")))


async def test_a_webhook_event_that_cannot_be_stored_is_refused_then_answered_when_it_comes_again(
    fake_feishu: FakeFeishu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bot.inbox.BUSY_TIMEOUT_MS", 200)  # a locked inbox fails fast
    async with running_bot(fake_feishu, tmp_path) as bot:
        event = bot.fake.events.text("are you there?")
        bot.fake.register_event(event, {})
        request = bot.fake.webhook_request(event)
        holder = sqlite3.connect(bot.adapter.store.where, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # e.g. an admin's long transaction
        try:
            refused = await bot.client.post("/feishu/events", content=request.body, headers=request.headers)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert refused.status_code == 503, refused.text  # not 200: the platform will deliver it again
        assert "deliver it again" in refused.json()["msg"]
        await settle(bot.adapter)
        assert bot.replies(str(event["event"]["message"]["message_id"])) == []
        again = bot.fake.webhook_request(event)  # the platform's retry
        response = await bot.client.post("/feishu/events", content=again.body, headers=again.headers)
        assert response.status_code == 200, response.text
        await settle(bot.adapter)
        assert bot.answer(str(event["event"]["message"]["message_id"])) == "echo: are you there?"


async def test_while_redis_is_down_the_service_is_unhealthy_and_refuses_events_then_recovers(
    fake_feishu: FakeFeishu, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.folder.mkdir()
    server.start()
    try:
        storage = {"backend": "redis", "redis_url": server.url, "lease_seconds": 1.0}
        async with running_bot(fake_feishu, tmp_path, storage=storage) as bot:
            first = await bot.send(bot.fake.events.text("before"))
            assert bot.answer(first) == "echo: before"
            assert bot.adapter.healthy()
            server.stop()
            await until(lambda: not bot.adapter.healthy(), "the service to see Redis gone")
            event = bot.fake.events.text("while it is down")
            bot.fake.register_event(event, {})
            request = bot.fake.webhook_request(event)
            refused = await bot.client.post("/feishu/events", content=request.body, headers=request.headers)
            assert refused.status_code == 503, refused.text  # not acked: the platform delivers it again
            server.start()  # with its data: the append-only file
            await until(bot.adapter.healthy, "the service to see Redis back")
            again = bot.fake.webhook_request(event)
            response = await bot.client.post("/feishu/events", content=again.body, headers=again.headers)
            assert response.status_code == 200, response.text
            await settle(bot.adapter)
            assert bot.answer(str(event["event"]["message"]["message_id"])) == "echo: while it is down"
            assert len(bot.replies(first)) == 1  # the earlier answer was kept, not repeated
    finally:
        server.stop()


async def test_messages_kept_over_a_restart_are_answered_or_get_a_note_when_too_old(
    fake_feishu: FakeFeishu, tmp_path: Path
) -> None:
    """What a dead process left in the inbox: a fresh question is answered at the next start; one
    older than `max_message_age` gets one short note; one whose answer was cut is answered again."""
    now_ms = int(time.time() * 1000)
    fresh = fake_feishu.events.text("still wanted", create_time_ms=now_ms - 5_000)
    old = fake_feishu.events.text("from long ago", create_time_ms=now_ms - 3_600_000)
    cut = fake_feishu.events.text("cut by the crash", create_time_ms=now_ms - 10_000)
    db = InboxDb(tmp_path / "feishu-inbox.sqlite3", platform="feishu")
    for event in (old, fresh, cut):
        fake_feishu.register_event(event, {})
        db.receive(parse_event(event), orjson.dumps(event), time.time() - 3)
    db.start(str(cut["event"]["message"]["message_id"]))  # it was running when the process died
    db.close()
    async with running_bot(fake_feishu, tmp_path, max_message_age=600.0) as bot:
        await settle(bot.adapter)
        assert bot.answer(str(fresh["event"]["message"]["message_id"])) == "echo: still wanted"
        assert bot.answer(str(cut["event"]["message"]["message_id"])) == "echo: cut by the crash"
        assert bot.answer(str(old["event"]["message"]["message_id"])) == texts.text("restarted_too_old", "zh")
        counts = bot.adapter.dispatcher.counts
        assert (counts["answered"], counts["ignored"], counts["received"], counts["running"]) == (2, 1, 0, 0)
