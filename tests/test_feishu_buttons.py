"""Buttons on answer cards (Stop, Try again), receipts, and the API calls an answer costs.

Fake platform, unmodified lark-oapi SDK (webhook and long connection), the real executor with
the echo engine slowed down per token, so an answer streams for as long as a test needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from bot import texts
from bot.feishu.adapter import FeishuAdapter
from bot.feishu.pacing import Pacing
from server.http.platform import mount
from server.inference.echo import EchoEngine
from server.inference.executor import ExecutorLimits, InferenceExecutor
from server.metrics import REGISTRY
from tests.conftest import make_png
from tests.fakefeishu import FakeFeishu, User
from tests.fakefeishu.records import ApiCall, CardRecord, SentMessage
from tests.feishu_helpers import RecordingExecutor, feishu_config, settle, started
from tests.waiting import DEADLINE, until

STOPPED = texts.text("cancelled_suffix", "zh")
TOKEN_ROUTES = ("auth.tenant_access_token", "bot.info")
DOCUMENTED_CALLS = 23  # README: an answer costs at most feishu.max_card_updates (20) + 3 calls
CARD_UPDATE_ROUTES = ("cardkit.card.update", "cardkit.card.settings", "cardkit.card_element.content")


def toast(key: str) -> str:
    return texts.text(key, "zh")


class Buttons:
    """A running adapter, its executor and the fake platform, with the moves of a chat user."""

    def __init__(
        self, fake: FakeFeishu, adapter: FeishuAdapter, executor: RecordingExecutor, client: httpx.AsyncClient
    ) -> None:
        self.fake, self.adapter, self.executor, self.client = fake, adapter, executor, client

    async def ask(self, question: str, **kw: Any) -> tuple[str, SentMessage]:
        """Send a question; returns its id and the card reply, once the card streams."""
        event = self.fake.events.text(question, **kw)
        message_id = str(event["event"]["message"]["message_id"])
        await self.deliver(event, register=True)
        reply = await self.fake.wait_for(lambda: self.cards_for(message_id)[:1], DEADLINE, "the card")
        return message_id, reply[0]

    async def deliver(self, event: dict[str, Any], *, register: bool = False) -> dict[str, Any]:
        """An event by webhook, or over the long connection; returns the callback's answer."""
        if register:
            self.fake.register_event(event, {})
        if self.adapter.config.feishu.mode == "webhook":
            request = self.fake.webhook_request(event)
            response = await self.client.post("/feishu/events", content=request.body, headers=request.headers)
            assert response.status_code == 200, response.text
            return dict(response.json())
        event_id = self.fake.push_event(event)
        (ack,) = await self.fake.wait_for_acks(1, event_id)
        assert ack.code == 200, ack
        return dict(ack.data or {})

    async def press(self, reply: SentMessage, button: str, *, by: User | None = None) -> dict[str, Any]:
        """Press a button of the card *reply* shows (its value as the card holds it now)."""
        value = button_value(self.card(reply), button)
        event = self.fake.events.card_action(
            value, operator=by, open_message_id=reply.message_id, open_chat_id=reply.chat_id
        )
        return await self.deliver(event)

    def cards_for(self, message_id: str) -> list[SentMessage]:
        return [m for m in self.fake.records.replies() if m.parent_id == message_id and m.card_id]

    def card(self, reply: SentMessage) -> CardRecord:
        assert reply.card_id
        return self.fake.records.card(reply.card_id)

    async def closed(self, reply: SentMessage, timeout: float = DEADLINE) -> CardRecord:
        return await self.fake.wait_for(
            lambda: (card := self.card(reply)).closed and card, timeout, f"card of {reply.message_id} closed"
        )

    async def streaming(self, reply: SentMessage) -> None:
        await self.fake.wait_for(
            lambda: any("echo:" in op.content for op in self.card(reply).content_updates),
            DEADLINE,
            "the answer streaming",
        )


def button_value(card: CardRecord, name: str) -> dict[str, Any]:
    for element in card.card["body"]["elements"]:
        if element.get("element_id") == f"btn_{name}":
            return dict(element["behaviors"][0]["value"])
    raise AssertionError(f"no {name} button on card {card.card_id}: {card.card['body']['elements']}")


def has_button(card: CardRecord, name: str) -> bool:
    return any(e.get("element_id") == f"btn_{name}" for e in card.card["body"]["elements"])


@asynccontextmanager
async def running(
    fake: FakeFeishu,
    tmp_path: Path,
    *,
    step_delay: float,
    mode: str = "webhook",
    max_batch: int = 8,
    queue_size: int = 8,
    picture_delay: float = 0.0,
    **feishu: Any,
) -> AsyncIterator[Buttons]:
    config = feishu_config(fake, tmp_path, model="builtin:echo", mode=mode, max_new_tokens=4096, **feishu)
    config = config.model_copy(
        update={
            "executor": config.executor.model_copy(update={"max_batch": max_batch, "queue_size": queue_size})
        }
    )
    inner = InferenceExecutor(
        lambda progress: EchoEngine(step_delay=step_delay, picture_delay=picture_delay),
        ExecutorLimits(max_batch=max_batch, queue_size=queue_size, max_new_tokens=4096),
        model_name="echo",
    )
    executor = RecordingExecutor(inner)
    await executor.start()
    adapter = await started(config, executor)
    app = Starlette(routes=[mount(route) for route in adapter.routes()])
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bot") as client:
            yield Buttons(fake, adapter, executor, client)
    finally:
        await adapter.stop()
        await executor.stop()


LONG = "tell me everything " * 60  # an echo of ~1,150 tokens: 23 s at 20 ms a token


@pytest.mark.parametrize("mode", ["webhook", "longconn"])
async def test_stop_frees_the_slot_and_try_again_answers_once_more(
    fake_feishu: FakeFeishu, tmp_path: Path, mode: str
) -> None:
    async with running(fake_feishu, tmp_path, step_delay=0.02, mode=mode) as bot:
        asked, reply = await bot.ask(LONG)
        assert has_button(bot.card(reply), "stop")
        await bot.streaming(reply)

        answer = await bot.press(reply, "stop")
        assert answer["toast"]["content"] == toast("toast_stopping")
        card = await bot.closed(reply)
        assert card.final_text.startswith("echo:") and card.final_text.endswith(STOPPED)
        assert len(card.final_text) < len("echo: " + LONG)  # cut short: it kept what was written
        assert card.closed_by == "update" and has_button(card, "retry") and not has_button(card, "stop")
        await until(lambda: bot.executor.stats().active == 0, "the executor slot freed")
        assert not bot.executor.done  # the model never finished that answer
        await settle(bot.adapter)

        # Twice, and after the end: nothing breaks, a toast says so.
        again = bot.fake.events.card_action(
            {"vlbridge": "stop", "answer": asked},
            open_message_id=reply.message_id,
            open_chat_id=reply.chat_id,
        )
        assert (await bot.deliver(again))["toast"]["content"] == toast("toast_finished")
        assert (await bot.deliver(again))["toast"]["content"] == toast("toast_finished")

        # Try again: one fresh answer to the same question, in a new card replying to the question.
        answer = await bot.press(reply, "retry")
        assert answer["toast"]["content"] == toast("toast_retrying")
        second = await bot.fake.wait_for(lambda: bot.cards_for(asked)[1:], DEADLINE, "a second card")
        await bot.streaming(second[0])
        assert (await bot.press(reply, "retry"))["toast"]["content"] == toast("toast_retried")
        await bot.press(second[0], "stop")  # no need to wait 23 s for it
        await bot.closed(second[0])
        await settle(bot.adapter)
        assert len(bot.cards_for(asked)) == 2
        first, retried = bot.executor.requests
        assert retried.messages == first.messages  # the same question


async def test_someone_else_cannot_stop_an_answer(fake_feishu: FakeFeishu, tmp_path: Path) -> None:
    question = "a short one " * 10
    async with running(fake_feishu, tmp_path, step_delay=0.02) as bot:
        _, reply = await bot.ask(question, chat_type="group", mentions=[bot.fake.events.bot])
        await bot.streaming(reply)
        answer = await bot.press(reply, "stop", by=User(name="Somebody Else"))
        assert answer["toast"] == {"type": "error", "content": toast("toast_not_allowed")}
        card = await bot.closed(reply)
        assert card.final_text == "echo: " + question.strip()  # the answer went on to its end
        assert len(bot.executor.done) == 1


async def test_anyone_in_the_chat_may_stop_with_card_actions_chat(
    fake_feishu: FakeFeishu, tmp_path: Path
) -> None:
    async with running(fake_feishu, tmp_path, step_delay=0.02, card_actions="chat") as bot:
        _, reply = await bot.ask(LONG, chat_type="group", mentions=[bot.fake.events.bot])
        await bot.streaming(reply)
        answer = await bot.press(reply, "stop", by=User(name="Somebody Else"))
        assert answer["toast"]["content"] == toast("toast_stopping")
        assert (await bot.closed(reply)).final_text.endswith(STOPPED)


async def test_a_forged_button_value_is_refused(fake_feishu: FakeFeishu, tmp_path: Path) -> None:
    """The value names an answer of another chat: not trusted, the answer goes on."""
    async with running(fake_feishu, tmp_path, step_delay=0.002) as bot:
        asked, reply = await bot.ask("mine")
        other = bot.fake.events.card_action(
            {"vlbridge": "stop", "answer": asked}, open_message_id="om_elsewhere", open_chat_id="oc_elsewhere"
        )
        assert (await bot.deliver(other))["toast"]["content"] == toast("toast_unknown")
        assert (await bot.closed(reply)).final_text == "echo: mine"


def test_pacing_bounds_the_updates_of_any_answer() -> None:
    pacing = Pacing()  # the defaults of feishu.stream_interval, stream_growth, max_card_updates
    assert pacing.delay(0) == pytest.approx(0.3)  # the first words as fast as before
    assert pacing.updates_within(2.4) == 4  # was 8
    assert pacing.updates_within(60.0) == 15  # was 200
    assert pacing.updates_within(3600.0) == pacing.max_updates == 20
    assert Pacing(max_updates=3).delay(3) is None


async def test_a_long_streaming_answer_makes_a_bounded_number_of_calls(
    fake_feishu: FakeFeishu, tmp_path: Path
) -> None:
    """A 60 s answer at the default pacing, 20 times faster: the intervals scaled by 1/20
    (0.015 s instead of 0.3 s) and an answer of ~3 s. README: at most max_card_updates + 3."""

    def calls() -> list[ApiCall]:
        return [c for c in bot.fake.records.api_calls() if c.route not in TOKEN_ROUTES]

    def counted(kind: str) -> float:
        return REGISTRY.get_sample_value("vlbridge_feishu_api_calls_total", {"kind": kind}) or 0.0

    async with running(fake_feishu, tmp_path, step_delay=0.01, stream_interval=0.015) as bot:
        await bot.adapter._own_id()
        before, updates_before = len(calls()), counted("card_update")
        question = "go on " * 50  # ~300 tokens: ~3 s
        _, reply = await bot.ask(question)
        card = await bot.closed(reply, 2 * DEADLINE)
        await settle(bot.adapter)
        assert card.final_text == "echo: " + question.strip()
        made = calls()[before:]
        assert len(made) <= DOCUMENTED_CALLS, [c.route for c in made]
        card_updates = [c for c in made if c.route in CARD_UPDATE_ROUTES]
        assert counted("card_update") - updates_before == len(card_updates)  # /metrics counts them


async def test_a_waiting_message_gets_a_receipt_removed_when_its_answer_starts(
    fake_feishu: FakeFeishu, tmp_path: Path
) -> None:
    """One answer runs, one waits in the executor's queue, the third waits for room in the
    inbox: it alone gets the reaction, once, removed once its answer started."""
    async with running(fake_feishu, tmp_path, step_delay=0.02, max_batch=1, queue_size=1) as bot:
        _, reply = await bot.ask("question zero " * 20)  # ~280 tokens: ~6 s
        await bot.streaming(reply)
        later = [bot.fake.events.text(f"question {n}") for n in (1, 2)]
        for event in later:
            await bot.deliver(event, register=True)
        waiting = str(later[1]["event"]["message"]["message_id"])
        (reaction,) = await bot.fake.wait_for(bot.fake.records.reactions, DEADLINE, "a receipt")
        assert reaction.message_id == waiting and reaction.emoji_type == "OnIt"
        await settle(bot.adapter, 3 * DEADLINE)
        (removed,) = bot.fake.records.reactions(include_deleted=True)
        assert removed.deleted_at is not None, "the receipt stayed"
        (card,) = [bot.card(m) for m in bot.cards_for(waiting)]
        answered_at = min(op.at for op in card.content_updates if "echo:" in op.content)
        assert removed.at < answered_at  # it was there while the message waited


async def test_try_again_asks_with_the_same_pictures(fake_feishu: FakeFeishu, tmp_path: Path) -> None:
    async with running(fake_feishu, tmp_path, step_delay=0.0) as bot:
        event = bot.fake.events.captioned_image("compare", ["img_a", "img_b"])
        asked = str(event["event"]["message"]["message_id"])
        bot.fake.register_event(event, {"img_a": make_png(32, 32), "img_b": make_png(48, 40)})
        await bot.deliver(event)
        (reply,) = await bot.fake.wait_for(lambda: bot.cards_for(asked), DEADLINE, "the card")
        assert (await bot.closed(reply)).final_text == "echo: compare [32x32, 48x40]"
        await settle(bot.adapter)
        assert (await bot.press(reply, "retry"))["toast"]["content"] == toast("toast_retrying")
        second = (await bot.fake.wait_for(lambda: bot.cards_for(asked)[1:], DEADLINE, "a second card"))[0]
        assert (await bot.closed(second)).final_text == "echo: compare [32x32, 48x40]"
        await settle(bot.adapter)
        first, retried = bot.executor.requests
        assert retried.messages == first.messages and retried.messages[-1].images  # the same pictures
        assert second.parent_id == asked and second.message_id != reply.message_id


async def test_the_card_says_the_picture_is_being_read(fake_feishu: FakeFeishu, tmp_path: Path) -> None:
    """A large picture takes seconds to read before the model starts: the card says so, instead
    of a queue place of 0 or nothing."""
    async with running(fake_feishu, tmp_path, step_delay=0.0, picture_delay=1.5) as bot:
        event = bot.fake.events.captioned_image("what is it", ["img_a"])
        asked = str(event["event"]["message"]["message_id"])
        bot.fake.register_event(event, {"img_a": make_png(32, 32)})
        await bot.deliver(event)
        (reply,) = await bot.fake.wait_for(lambda: bot.cards_for(asked), DEADLINE, "the card")
        card = await bot.closed(reply)
        assert card.final_text == "echo: what is it [32x32]"
        shown = [op.content for op in card.content_updates]
        assert texts.text("reading", "zh") in shown, shown


async def test_stop_on_a_waiting_message_ends_it_unasked(fake_feishu: FakeFeishu, tmp_path: Path) -> None:
    """The queue card of a message waiting for room has Stop too: the message is never asked."""
    async with running(fake_feishu, tmp_path, step_delay=0.02, max_batch=1, queue_size=1) as bot:
        _, running_reply = await bot.ask(LONG)
        await bot.streaming(running_reply)
        later = [bot.fake.events.text(f"question {n}") for n in (1, 2)]
        for event in later:
            await bot.deliver(event, register=True)
        waiting = str(later[1]["event"]["message"]["message_id"])
        (queue_card,) = await bot.fake.wait_for(lambda: bot.cards_for(waiting), DEADLINE, "its queue card")
        assert (await bot.press(queue_card, "stop"))["toast"]["content"] == toast("toast_stopping")
        await bot.press(running_reply, "stop")  # room for the others now
        assert (await bot.closed(queue_card)).final_text == toast("stopped")
        await settle(bot.adapter)
        assert [r.messages[-1].text for r in bot.executor.requests] == [LONG.strip(), "question 1"]
