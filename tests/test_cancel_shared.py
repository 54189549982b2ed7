"""`/cancel` taken by one service stops the answer another service streams (one Redis, real
pub/sub, the echo engine through the real executor)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from bot import texts
from bot.conversation import Conversation, Settings
from bot.inbox import Inbox
from bot.inbox_factory import StoreSpec
from bot.memory import Memory
from bot.store import InboxState
from bot.types import ChatType, InboundMessage, MessageKind
from server.inference.echo import EchoEngine
from server.inference.executor import ExecutorLimits, InferenceExecutor
from tests.test_conversation_queue import Channel
from tests.waiting import until


@dataclass
class Service:
    inbox: Inbox
    conversation: Conversation
    channel: Channel


def message(message_id: str, text: str, chat: str) -> InboundMessage:
    return InboundMessage(message_id, chat, ChatType.PRIVATE, "ou_1", MessageKind.TEXT, text=text)


@pytest.fixture
async def services(redis_server: str) -> AsyncIterator[list[Service]]:
    executor = InferenceExecutor(
        lambda progress: EchoEngine(
            step_delay=0.05
        ),  # 20 characters a second: a long answer streams for a while
        ExecutorLimits(max_batch=4, queue_size=8, request_timeout=60, max_new_tokens=1024),
        model_name="echo",
    )
    await executor.start()
    await executor.wait_ready(30)
    spec = StoreSpec("redis", redis_server, "feishu", 12, prefix=f"test-{uuid.uuid4().hex[:8]}")
    made: list[Service] = []
    for _ in range(2):
        inbox = spec.inbox()
        await inbox.open()
        memory = Memory(inbox, context_hours=1, rate_per_minute=100)
        conversation = Conversation(executor, Settings(language="zh"), memory, cancels=spec.cancels())
        conversation.cancels.start(conversation.cancel_local)
        made.append(Service(inbox, conversation, Channel()))
    for service in made:
        await asyncio.wait_for(service.conversation.cancels.subscribed.wait(), 30)  # type: ignore[attr-defined]
    yield made
    for service in made:
        await service.conversation.cancels.stop()
        await service.inbox.close()
    await executor.stop()


async def test_a_cancel_taken_by_one_service_stops_the_answer_of_another(services: list[Service]) -> None:
    a, b = services
    question = message("om_long", "x" * 400, "oc_1")
    await a.inbox.receive(question, b"{}", time.time())
    await a.inbox.run(a.inbox.db.start, "om_long")  # running, as the dispatcher of service A does
    answer = asyncio.ensure_future(
        a.conversation.handle(question, a.channel, bot_id="", arrived_at=time.time())
    )

    def streaming() -> bool:
        sink = a.channel.sinks.get("om_long")
        return sink is not None and any(line.startswith("echo: x") for line in sink.shown)

    await until(streaming, "service A streaming its answer")
    cancel = message("om_cancel", "/cancel", "oc_1")
    await b.conversation.handle(cancel, b.channel, bot_id="", arrived_at=time.time())
    assert b.channel.texts == [texts.text("cancelled", "zh")]
    await asyncio.wait_for(answer, 30)
    final = a.channel.sinks["om_long"].final
    assert final.endswith(texts.text("cancelled_suffix", "zh")) and len(final) < 400

    await a.inbox.run(a.inbox.db.finish, "om_long", InboxState.ANSWERED)
    again = message("om_cancel_2", "/cancel", "oc_1")
    await b.conversation.handle(again, b.channel, bot_id="", arrived_at=time.time())
    assert b.channel.texts[-1] == texts.text("nothing_to_cancel", "zh")
