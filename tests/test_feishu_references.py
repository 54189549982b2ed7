"""Quoted messages, forwarded bundles and cards: what a message refers to becomes its context.

End to end: the unmodified SDK against the fake platform (webhook mode), the echo engine through
the real executor; the echo answer lists the sizes of the pictures the request held, in order,
and the recording executor keeps the request itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import lark_oapi as lark
import pytest
from lark_oapi.api.im.v1 import GetMessageRequest

from bot.feishu.messages import card_text
from bot.feishu.references import read_bundle
from bot.types import PictureRef
from tests.conftest import make_png
from tests.fakefeishu import FakeFeishu, Route, User
from tests.feishu_helpers import RecordingExecutor
from tests.test_feishu_behaviour import Bot, running_bot


@pytest.fixture
async def bot(fake_feishu: FakeFeishu, tmp_path: Path) -> AsyncIterator[Bot]:
    async with running_bot(fake_feishu, tmp_path) as bot:
        yield bot


def request_pictures(bot: Bot) -> tuple[bytes, ...]:
    """The pictures of the last request the model was asked."""
    executor = bot.adapter.answers
    assert isinstance(executor, RecordingExecutor)
    return tuple(image for turn in executor.requests[-1].messages for image in turn.images)


def message_gets(fake: FakeFeishu) -> int:
    return len(fake.records.api_calls(Route.MESSAGE_GET.value))


# -- quoted messages ------------------------------------------------------------------------------


async def test_a_picture_quoted_in_a_group_by_another_user_is_the_question_s_context(bot: Bot) -> None:
    events, chat = bot.fake.events, "oc_group_quote"
    alice, bob = User(name="Alice"), User(name="Bob")
    picture = make_png(52, 36)
    posted = await bot.send(
        events.image("img_alice", chat_type="group", chat_id=chat, sender=alice), {"img_alice": picture}
    )
    assert bot.replies(posted) == []  # not for the bot: no @
    question = await bot.send(
        events.text(
            "what is this?", mention_bot=True, chat_type="group", chat_id=chat, sender=bob, parent_id=posted
        )
    )
    assert bot.answer(question) == "echo: what is this? [52x36]"
    assert request_pictures(bot) == (picture,)  # Alice's picture, downloaded with her message's id
    (reply,) = bot.replies(question)  # threaded as a reply to Bob's message, and to no other
    assert reply.parent_id == question and reply.chat_id == chat
    assert bot.replies(posted) == []


async def test_a_quoted_post_s_pictures_come_before_the_reply_s_own(bot: Bot) -> None:
    events = bot.fake.events
    first, second, own = make_png(32, 32), make_png(48, 40), make_png(56, 44)
    quoted = events.captioned_image("two shots", ["img_q1", "img_q2"])
    bot.fake.register_event(quoted, {"img_q1": first, "img_q2": second})
    quoted_id = str(quoted["event"]["message"]["message_id"])
    reply = await bot.send(
        events.captioned_image("and this one?", ["img_own"], parent_id=quoted_id), {"img_own": own}
    )
    assert bot.answer(reply) == "echo: 引用：two shots\n\nand this one? [32x32, 48x40, 56x44]"
    assert request_pictures(bot) == (first, second, own)


async def test_quoting_a_text_message_or_a_card_gives_its_words_as_context(bot: Bot) -> None:
    events = bot.fake.events
    said = events.text("the meeting moved to Friday")
    bot.fake.register_event(said)
    reply = await bot.send(events.text("when is it?", parent_id=str(said["event"]["message"]["message_id"])))
    assert bot.answer(reply) == "echo: 引用：the meeting moved to Friday\n\nwhen is it?"
    card = events.card("Build report", ["3 tests failed"])
    bot.fake.register_event(card)
    about = await bot.send(events.text("why?", parent_id=str(card["event"]["message"]["message_id"])))
    assert bot.answer(about) == "echo: 引用：Build report\n3 tests failed\n\nwhy?"


async def test_a_quoted_picture_in_a_thread_is_read_once_then_the_thread_remembers_it(bot: Bot) -> None:
    events, chat, thread = bot.fake.events, "oc_thread_quote", "omt_quote"
    root = await bot.send(
        events.image("img_root", chat_type="group", chat_id=chat, sender=User(name="Alice")),
        {"img_root": make_png(64, 48)},
    )
    in_thread: dict[str, Any] = {
        "chat_type": "group",
        "chat_id": chat,
        "thread_id": thread,
        "root_id": root,
        "parent_id": root,
    }
    first = await bot.send(events.text("what is it?", mention_bot=True, sender=User(name="Bob"), **in_thread))
    assert bot.answer(first) == "echo: what is it? [64x48]"
    (reply,) = bot.replies(first)
    assert reply.reply_in_thread and reply.thread_id == thread
    assert message_gets(bot.fake) == 1
    follow = await bot.send(events.text("and its colour?", mention_bot=True, **in_thread))
    assert bot.answer(follow) == "echo: and its colour? [64x48]"  # the thread's context
    assert message_gets(bot.fake) == 1  # its root is the thread's start: not read again


async def test_a_quoted_message_the_app_may_not_read_gets_a_sentence_naming_the_permission(bot: Bot) -> None:
    events, chat = bot.fake.events, "oc_no_scope"
    posted = await bot.send(events.image("img_secret", chat_type="group", chat_id=chat))
    bot.fake.revoke_scope("im:message.group_msg")
    question = await bot.send(
        events.text("what is this?", mention_bot=True, chat_type="group", chat_id=chat, parent_id=posted)
    )
    answer = bot.answer(question)
    assert answer.startswith("抱歉，我读不到你引用的消息") and "im:message.group_msg" in answer, answer
    for scope in ("im:message", "im:message:readonly"):
        bot.fake.revoke_scope(scope)
    mine = events.image("img_mine")
    bot.fake.register_event(mine)
    private = events.text("and this?", parent_id=str(mine["event"]["message"]["message_id"]))
    answer = bot.answer(await bot.send(private))
    assert "im:message / im:message:readonly" in answer, answer  # the scopes the platform named
    executor = bot.adapter.answers
    assert isinstance(executor, RecordingExecutor) and executor.requests == []  # the model was not asked


# -- forwarded bundles and cards ------------------------------------------------------------------


async def test_a_forwarded_bundle_of_two_pictures_and_a_text_is_one_question(bot: Bot) -> None:
    events = bot.fake.events
    one, two = make_png(32, 32), make_png(48, 40)
    bundle = bot.fake.forward(
        [events.image("img_f1"), events.text("which one is sharper?"), events.image("img_f2")],
        {"img_f1": one, "img_f2": two},
    )
    message_id = await bot.send(bundle)
    assert bot.answer(message_id) == (
        "echo: 转发的消息：\nwhich one is sharper?\n\n请看看这些转发的消息，说说你的看法。 [32x32, 48x40]"
    )
    assert request_pictures(bot) == (one, two)
    assert len(bot.replies(message_id)) == 1
    quoting = await bot.send(events.text("the first, surely?", parent_id=message_id))
    assert bot.answer(quoting).endswith("the first, surely? [32x32, 48x40]")  # a quoted bundle too


async def test_what_a_bundle_holds_beyond_the_bounds_is_left_out_and_said(bot: Bot) -> None:
    events = bot.fake.events
    pictures = [events.image(f"img_b{n}") for n in range(9)]
    texts = [events.text(f"line {n}") for n in range(13)]
    bundle = bot.fake.forward([*pictures, *texts], {f"img_b{n}": make_png(40 + n, 40) for n in range(9)})
    answer = bot.answer(await bot.send(bundle))
    # 20 messages read (9 pictures, 11 lines), 8 pictures at most: 2 lines and 1 picture left out
    assert answer.endswith("（内容较多，其中 2 条消息和 1 张图片我没有看。）"), answer
    assert "line 10" in answer and "line 11" not in answer
    assert len(request_pictures(bot)) == 8
    deep = bot.fake.forward(
        [
            events.text("outer"),
            bot.fake.forward([events.text("inner"), bot.fake.forward([events.text("deep")])]),
        ]
    )
    answer = bot.answer(await bot.send(deep))
    assert "outer\ninner" in answer and "deep" not in answer.split("（")[0]
    assert answer.endswith("（内容较多，其中 1 条消息我没有看。）"), answer


async def test_an_interactive_card_is_read_as_its_text(bot: Bot) -> None:
    card = bot.fake.events.card("Weekly report", ["Sales up 5%", "Costs flat"])
    assert bot.answer(await bot.send(card)) == "echo: Weekly report\nSales up 5%\nCosts flat"


# -- the fake platform, as the SDK reads it --------------------------------------------------------


def test_the_fake_answers_a_bundle_with_its_messages_as_the_sdk_models_them(fake_feishu: FakeFeishu) -> None:
    events = fake_feishu.events
    inner = fake_feishu.forward([events.text("deep")])
    bundle = fake_feishu.forward([events.image("img_x"), inner], {"img_x": make_png(32, 32)})
    fake_feishu.register_event(bundle)
    bundle_id = str(bundle["event"]["message"]["message_id"])
    inner_id = str(inner["event"]["message"]["message_id"])
    client = lark.Client.builder().app_id(fake_feishu.app_id).app_secret(fake_feishu.app_secret)
    client = client.domain(fake_feishu.url).log_level(lark.LogLevel.ERROR).build()
    response = client.im.v1.message.get(GetMessageRequest.builder().message_id(bundle_id).build())
    assert response.success(), response.msg
    items = response.data.items
    assert [(m.msg_type, m.upper_message_id) for m in items] == [
        ("merge_forward", None),
        ("image", bundle_id),
        ("merge_forward", bundle_id),
        ("text", inner_id),
    ]
    assert items[0].body.content == "Merged and Forwarded Message"
    fake_feishu.revoke_scope("im:message:readonly")
    fake_feishu.revoke_scope("im:message")
    refused = client.im.v1.message.get(GetMessageRequest.builder().message_id(bundle_id).build())
    assert refused.code == 99991672 and "im:message:readonly" in refused.msg


# -- pure pieces ----------------------------------------------------------------------------------


def test_card_text_reads_a_card_s_own_json_without_its_controls() -> None:
    v1 = {
        "header": {"title": {"tag": "plain_text", "content": "Deploy"}},
        "elements": [
            {"tag": "div", "text": {"tag": "lark_md", "content": "**prod** is green"}},
            {
                "tag": "action",
                "actions": [{"tag": "button", "text": {"tag": "plain_text", "content": "Roll back"}}],
            },
        ],
    }
    assert card_text(v1) == "Deploy\n**prod** is green"
    v2 = {"schema": "2.0", "body": {"elements": [{"tag": "markdown", "content": "answer"}]}}
    assert card_text(v2) == "answer"
    assert card_text({"type": "card", "data": {"card_id": "7xx"}}) == ""


def test_a_bundle_is_read_in_order_within_its_bounds() -> None:
    def item(message_id: str, kind: str, content: str, upper: str = "b", at: int = 0) -> dict[str, Any]:
        raw = {
            "message_id": message_id,
            "msg_type": kind,
            "create_time": str(at),
            "body": {"content": content},
        }
        return {**raw, "upper_message_id": upper} if upper else raw

    items = [
        item("b", "merge_forward", "Merged and Forwarded Message", upper=""),
        item("m2", "image", '{"image_key": "k2"}', at=2),
        item("m1", "text", '{"text": "first"}', at=1),
        item("m3", "file", '{"file_key": "f"}', at=3),
        item("n", "merge_forward", "Merged and Forwarded Message", at=4),
        item("n1", "image", '{"image_key": "k3"}', upper="n", at=5),
    ]
    read = read_bundle(items, "b", max_pictures=8)
    assert read.forwarded == ("first",)
    assert read.pictures == (PictureRef("m2", ("k2",)), PictureRef("n1", ("k3",)))
    assert (read.left_out_messages, read.left_out_pictures) == (1, 0)  # the file
    shallow = read_bundle(items, "b", max_pictures=1, max_depth=1, max_messages=2)
    assert shallow.pictures == (PictureRef("m2", ("k2",)),)
    assert (shallow.left_out_messages, shallow.left_out_pictures) == (2, 1)  # the file, the nested one
