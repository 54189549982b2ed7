"""The queue position reaches the user's answer while it waits (real executor, echo engine)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from bot.conversation import Conversation, Decision, Settings
from bot.inbox import Inbox
from bot.memory import Memory
from bot.types import ChatType, InboundMessage, MessageKind, PictureRef, Referenced
from server.inference.echo import EchoEngine
from server.inference.executor import ExecutorLimits, InferenceExecutor


@dataclass
class Sink:
    shown: list[str] = field(default_factory=list)
    final: str = ""

    async def open(self, status: str) -> None:
        self.shown.append(status)

    def update(self, text: str) -> None:
        self.shown.append(text)

    async def close(self, text: str) -> None:
        self.final = text


@dataclass
class Channel:
    """A `ReplyChannel` that keeps what would have been shown."""

    sinks: dict[str, Sink] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)

    async def fetch_images(self, pictures: PictureRef) -> list[bytes]:
        return []

    async def reply_text(self, message: InboundMessage, text: str) -> None:
        self.texts.append(text)

    async def referenced(self, message: InboundMessage, *, max_pictures: int) -> Referenced:
        return Referenced()

    def answer_sink(self, message: InboundMessage) -> Sink:
        return self.sinks.setdefault(message.message_id, Sink())


async def test_queue_position_then_answer(tmp_path: Path) -> None:
    executor = InferenceExecutor(
        lambda progress: EchoEngine(step_delay=0.005),
        ExecutorLimits(max_batch=1, queue_size=8, request_timeout=30, max_new_tokens=64),
        model_name="echo",
    )
    await executor.start()
    await executor.wait_ready(10)
    inbox = Inbox.sqlite(tmp_path / "inbox.sqlite3", platform="feishu", retention_hours=1)
    await inbox.open()
    memory = Memory(inbox, context_hours=1, rate_per_minute=10)
    conversation = Conversation(executor, Settings(language="zh"), memory)
    channel = Channel()
    messages = [
        InboundMessage(
            f"om_{n}", f"oc_{n}", ChatType.PRIVATE, f"ou_{n}", MessageKind.TEXT, text=f"question {n}"
        )
        for n in range(3)
    ]
    try:
        decisions = await asyncio.gather(
            *(conversation.handle(m, channel, bot_id="", arrived_at=0.0) for m in messages)
        )
    finally:
        await executor.stop()
        await inbox.close()
    assert decisions == [Decision.ANSWER] * 3
    assert {n: channel.sinks[f"om_{n}"].final for n in range(3)} == {
        n: f"echo: question {n}" for n in range(3)
    }
    shown = [line for sink in channel.sinks.values() for line in sink.shown]
    assert any(line.startswith("排队中，前面还有") for line in shown), shown
