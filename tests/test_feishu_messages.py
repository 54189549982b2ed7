"""Pure parsing of Feishu message events into platform-neutral messages."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bot.feishu.messages import MalformedEvent, parse_event, parse_post
from bot.types import ChatType, MessageKind

BOT = "ou_bot"


def event(message_type: str, content: dict[str, Any], **message: Any) -> dict[str, Any]:
    return {
        "schema": "2.0",
        "header": {"event_id": "ev1", "event_type": "im.message.receive_v1"},
        "event": {
            "sender": {"sender_id": {"open_id": "ou_alice"}, "sender_type": "user"},
            "message": {
                "message_id": "om_1",
                "chat_id": "oc_1",
                "chat_type": "p2p",
                "create_time": "1700000000123",
                "message_type": message_type,
                "content": json.dumps(content, ensure_ascii=False),
                **message,
            },
        },
    }


MENTION_BOT = [{"key": "@_user_1", "id": {"open_id": BOT}, "name": "vlbot"}]
MENTION_BOB = [{"key": "@_user_2", "id": {"open_id": "ou_bob"}, "name": "Bob"}]


def test_text_with_mentions() -> None:
    msg = parse_event(
        event(
            "text",
            {"text": "@_user_1  what did @_user_2 send?"},
            chat_type="group",
            mentions=MENTION_BOT + MENTION_BOB,
        ),
        bot_id=BOT,
    )
    assert msg.kind is MessageKind.TEXT
    assert msg.text == "what did @Bob send?"
    assert msg.mentioned == (BOT, "ou_bob")
    assert msg.chat_type is ChatType.GROUP
    assert msg.sender_id == "ou_alice"
    assert msg.created_at == pytest.approx(1700000000.123)


def test_image() -> None:
    msg = parse_event(event("image", {"image_key": "img_1"}))
    assert (msg.kind, msg.image_keys, msg.text) == (MessageKind.IMAGE, ("img_1",), "")


def test_flat_post_with_caption_at_and_several_pictures() -> None:
    content = {
        "title": "",
        "content": [
            [
                {"tag": "at", "user_id": "@_user_1", "user_name": "vlbot"},
                {"tag": "text", "text": " what is this?"},
            ],
            [{"tag": "img", "image_key": "img_a"}],
            [{"tag": "img", "image_key": "img_b"}, {"tag": "text", "text": "and this"}],
        ],
    }
    msg = parse_event(event("post", content, chat_type="group", mentions=MENTION_BOT), bot_id=BOT)
    assert msg.kind is MessageKind.IMAGE
    assert msg.image_keys == ("img_a", "img_b")
    assert msg.text == "what is this?\nand this"
    assert BOT in msg.mentioned


def test_locale_keyed_post_and_pasted_screenshot() -> None:
    content = {"zh_cn": {"title": "截图", "content": [[{"tag": "img", "image_key": "img_s"}]]}}
    text, images = parse_post(content)
    assert (text, images) == ("截图", ("img_s",))
    assert parse_post({"post": {"en_us": {"content": [[{"tag": "text", "text": "hi"}]]}}}) == ("hi", ())


def test_post_without_pictures_is_text() -> None:
    msg = parse_event(event("post", {"title": "T", "content": [[{"tag": "text", "text": "hello"}]]}))
    assert (msg.kind, msg.text) == (MessageKind.TEXT, "T\nhello")


@pytest.mark.parametrize("kind", ["file", "audio", "sticker", "media"])
def test_unsupported(kind: str) -> None:
    msg = parse_event(event(kind, {"file_key": "f"}))
    assert msg.kind is MessageKind.UNSUPPORTED
    assert msg.raw_type == kind


def test_thread_keys_context() -> None:
    msg = parse_event(event("text", {"text": "hi"}, thread_id="omt_1", root_id="om_0"))
    assert msg.in_thread
    assert msg.context_key == "oc_1/omt_1"
    assert parse_event(event("text", {"text": "hi"})).context_key == "oc_1"


def test_malformed() -> None:
    with pytest.raises(MalformedEvent):
        parse_event({"header": {}})
    with pytest.raises(MalformedEvent):
        parse_event(event("text", {"text": "x"}, message_id=""))
    bad = event("text", {})
    bad["event"]["message"]["content"] = "{not json"
    with pytest.raises(MalformedEvent):
        parse_event(bad)
