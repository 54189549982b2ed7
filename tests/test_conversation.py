"""Platform-neutral conversation pieces: commands, policy, context, watchdog logic (the rate
limit is the store's: tests/test_inbox_contract.py)."""

from __future__ import annotations

import pytest

from bot.conversation import Command, Decision, Policy, parse_command
from bot.feishu.monitor import LinkState, Watchdog, WatchdogLimits, WorkerReport, restart_delay
from bot.memory import Context
from bot.texts import error_text, text
from bot.types import ChatType, InboundMessage, MessageKind, PictureRef


def msg(**kw: object) -> InboundMessage:
    base: dict[str, object] = {
        "message_id": "om_1",
        "chat_id": "oc_1",
        "chat_type": ChatType.PRIVATE,
        "sender_id": "ou_a",
        "kind": MessageKind.TEXT,
        "text": "hi",
        "created_at": 1000.0,
    }
    base.update(kw)
    return InboundMessage(**base)  # type: ignore[arg-type]


def test_commands() -> None:
    assert parse_command("/help") == (Command.HELP, "/help")
    assert parse_command("  /RESET now") == (Command.RESET, "/reset")
    assert parse_command("/nope") == (Command.UNKNOWN, "/nope")
    assert parse_command("what is /this") is None


def test_policy() -> None:
    policy = Policy(max_message_age=60)
    assert policy.decide(msg(), bot_id="ou_bot", arrived_at=1001) is Decision.ANSWER
    group = msg(chat_type=ChatType.GROUP)
    assert policy.decide(group, bot_id="ou_bot", arrived_at=1001) is Decision.IGNORE
    assert policy.decide(
        msg(chat_type=ChatType.GROUP, mentioned=("ou_bot",)), bot_id="ou_bot", arrived_at=1001
    ) is (Decision.ANSWER)
    assert policy.decide(msg(), bot_id="ou_bot", arrived_at=1061) is Decision.STALE
    limited = Policy(allowed_users=frozenset({"ou_b"}))
    assert limited.decide(msg(), bot_id="", arrived_at=1000) is Decision.NOT_ALLOWED
    assert (
        Policy(allowed_chats=frozenset({"oc_1"})).decide(msg(), bot_id="", arrived_at=1000) is Decision.ANSWER
    )


def test_a_context_keeps_its_picture_for_follow_ups() -> None:
    ref = PictureRef("om_pic", ("img_1",))
    context = Context(pictures=(ref,))
    first = context.prompt("what?", [b"png"])
    assert [(t.role, t.text, t.images) for t in first] == [("user", "what?", (b"png",))]
    context = context.then("what?", "a cat")
    follow = context.prompt("what colour?", [b"png"])
    assert [t.role for t in follow] == ["user", "assistant", "user"] and follow[0].images == (b"png",)
    for n in range(5):
        context = context.then(f"q{n}", f"a{n}", max_exchanges=2)
    assert [t.text for t in context.turns] == [
        "what?",
        "a cat",
        "q3",
        "a3",
        "q4",
        "a4",
    ]  # the picture's exchange stays
    assert Context.decode(context.encode()) == context  # what the store keeps is all of it, without the bytes
    assert len(context.encode()) < 200


def test_a_context_without_picture_keeps_the_last_exchanges() -> None:
    context = Context()
    prompt = context.prompt("hello")
    assert len(prompt) == 1 and not prompt[0].images
    for n in range(4):
        context = context.then(f"q{n}", f"a{n}", max_exchanges=2)
    assert [t.text for t in context.turns] == ["q2", "a2", "q3", "a3"]
    assert len(context.prompt("again")) == 5


def test_a_damaged_context_is_refused() -> None:
    for data in (b"", b"[]", b'{"turns": 3}', b'{"turns": [], "picture": [1]}'):
        with pytest.raises(ValueError, match="not a saved context"):
            Context.decode(data)


def test_a_context_saved_with_one_picture_reference_still_reads() -> None:
    """Contexts saved before a context could hold several messages' pictures (an upgrade)."""
    saved = b'{"turns": [["user", "what?"], ["assistant", "a cat"]], "picture": ["om_pic", ["img_1"]]}'
    context = Context.decode(saved)
    assert context.pictures == (PictureRef("om_pic", ("img_1",)),) and len(context.turns) == 2
    assert Context.decode(b'{"turns": [], "picture": null}') == Context()


def test_texts() -> None:
    assert text("queued", "zh", ahead=3) == "排队中，前面还有 3 个"
    assert text("queued", "en", ahead=3) == "Queued: 3 ahead of you"
    assert "7" in error_text("busy", "en", retry_after=6.6)
    assert error_text("no-such-code", "zh") == error_text("internal", "zh")


def test_watchdog_verdicts() -> None:
    limits = WatchdogLimits(startup=5, silence=3, disconnected=3, pong=2)
    dog = Watchdog(limits, spawned_at=0)
    assert dog.verdict(4) is None and dog.state is LinkState.STARTING
    assert dog.verdict(6) is not None  # no report within startup
    dog.observe(WorkerReport(at=6, connected=True))
    assert dog.state is LinkState.CONNECTED and dog.verdict(7) is None
    assert "silent" in (dog.verdict(10) or "")
    dog.observe(WorkerReport(at=10, connected=True, unanswered_since=9))
    assert dog.verdict(10) is None
    dog.observe(WorkerReport(at=12, connected=True, unanswered_since=9))
    assert "ping unanswered" in (dog.verdict(12) or "")
    dog.observe(WorkerReport(at=13, connected=False))
    assert dog.state is LinkState.RECONNECTING and dog.verdict(14) is None
    dog.observe(WorkerReport(at=16.5, connected=False))
    assert "no connection" in (dog.verdict(16.5) or "")


def test_a_worker_still_loading_the_sdk_is_alive_not_down() -> None:
    limits = WatchdogLimits(startup=5, silence=3, disconnected=3, pong=2, loading=60)
    dog = Watchdog(limits, spawned_at=0)
    for at in range(0, 40, 2):  # a slow import on a busy machine: "starting" reports every 2 s
        dog.observe(WorkerReport(at=at, connected=False, starting=True))
        assert dog.verdict(at + 1) is None, at  # neither "no report", nor "no connection"
    assert dog.state is LinkState.STARTING
    assert "silent" in (dog.verdict(43) or "")  # the reports stopped: hung after all
    dog.observe(WorkerReport(at=61, connected=False, starting=True))
    assert "still loading" in (dog.verdict(61.5) or "")
    dog = Watchdog(limits, spawned_at=0)
    dog.observe(WorkerReport(at=1, connected=False, starting=True))
    dog.observe(WorkerReport(at=2, connected=False))  # loaded, trying to connect: now it counts
    dog.observe(WorkerReport(at=5, connected=False))
    assert "no connection" in (dog.verdict(5.5) or "")


def test_restart_backoff() -> None:
    assert [restart_delay(n, 1.0, cap=5) for n in (1, 2, 3, 4, 5, 6)] == [0, 1, 2, 4, 5, 5]
