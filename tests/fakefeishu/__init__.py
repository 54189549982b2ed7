"""A fake Feishu Open Platform for tests, spoken to by the unmodified lark-oapi SDK over loopback.

Start one with ``FakeFeishu().start()`` (or ``with FakeFeishu() as fake``, or the ``fake_feishu``
fixture) and point the SDK's ``domain`` at ``fake.url``; use ``fake.app_id`` / ``fake.app_secret``.
``fake.events`` builds inbound events, ``fake.push_event`` delivers them over the long connection,
``fake.webhook_request`` wraps them for webhook mode, ``fake.records`` says what the bot did,
``fake.faults`` makes routes fail or stall, and ``await fake.wait_for(...)`` waits on any of it::

    async def test_bot_answers_a_captioned_picture(fake_feishu):
        start_my_bot(domain=fake_feishu.url, app_id=fake_feishu.app_id, app_secret=fake_feishu.app_secret)
        await fake_feishu.wait_for_connections(1)
        event = fake_feishu.events.captioned_image("what is this?", ["img_1"], mention_bot=True)
        event_id = fake_feishu.push_event(event, resources={"img_1": png_bytes})
        [ack] = await fake_feishu.wait_for_acks(1, event_id)
        [card] = await fake_feishu.wait_for_closed_cards(1, timeout=10)
        assert ack.code == 200 and ack.latency_s < 0.1
        assert "cat" in card.final_text

Modules by role: ``fake`` (facade), ``server`` (uvicorn thread), ``routing`` (faults, auth, envelopes),
``openapi`` (auth, bot, IM), ``content`` (message content rules), ``cardkit`` (card entities),
``longconn`` (discovery + WebSocket), ``frames`` (sans-I/O pbbp2 codec), ``records`` (observations),
``state`` (tokens, messages, resources), ``faults``, ``codes``, ``events``, ``webhook``, ``sdkthread``
(the SDK's ws client in a thread), ``fixtures`` (pytest fixtures).
"""

from .codes import ApiError
from .events import EventFactory, User, post_at, post_img, post_text
from .fake import FakeFeishu
from .faults import (
    CHAT_RATE_LIMITED,
    MESSAGE_RATE_LIMITED,
    RATE_LIMITED,
    TOKEN_INVALID,
    Fault,
    FaultPlan,
    Route,
)
from .frames import ClientConfig
from .records import (
    Ack,
    ApiCall,
    CardOp,
    CardOpKind,
    CardRecord,
    ConnectionRecord,
    Delivery,
    MessagePatch,
    Reaction,
    Records,
    SendKind,
    SentMessage,
)
from .sdkthread import LarkWsThread
from .webhook import WebhookRequest, build_request

__all__ = [
    "CHAT_RATE_LIMITED",
    "MESSAGE_RATE_LIMITED",
    "RATE_LIMITED",
    "TOKEN_INVALID",
    "Ack",
    "ApiCall",
    "ApiError",
    "CardOp",
    "CardOpKind",
    "CardRecord",
    "ClientConfig",
    "ConnectionRecord",
    "Delivery",
    "EventFactory",
    "FakeFeishu",
    "Fault",
    "FaultPlan",
    "LarkWsThread",
    "MessagePatch",
    "Reaction",
    "Records",
    "Route",
    "SendKind",
    "SentMessage",
    "User",
    "WebhookRequest",
    "build_request",
    "post_at",
    "post_img",
    "post_text",
]
