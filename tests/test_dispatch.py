"""The dispatcher: arrival order per conversation, room from the answer source, outcomes recorded."""

from __future__ import annotations

import asyncio
import threading
import time

from bot.conversation import NotNow
from bot.dispatch import Dispatcher, Outcome
from bot.inbox import Inbox, InboxState, StoredMessage
from tests.test_inbox import message
from tests.waiting import until


class Handler:
    """Holds each message until the test releases it; records starts in order."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release: dict[str, asyncio.Future[Outcome | BaseException]] = {}

    async def __call__(self, stored: StoredMessage) -> Outcome:
        self.started.append(stored.message_id)
        future = self.release.setdefault(stored.message_id, asyncio.get_running_loop().create_future())
        result = await future
        if isinstance(result, BaseException):
            raise result
        return result

    def finish(self, message_id: str, result: Outcome | BaseException = Outcome(InboxState.ANSWERED)) -> None:
        self.release.setdefault(message_id, asyncio.get_running_loop().create_future()).set_result(result)


async def put(inbox: Inbox, *messages: tuple[str, str]) -> None:
    for message_id, chat in messages:
        await inbox.receive(message(message_id, chat), b"{}", time.time())


async def state(inbox: Inbox, message_id: str) -> InboxState:
    stored = await inbox.run(inbox.db.get, message_id)
    assert stored is not None
    return stored.state


async def test_one_message_per_conversation_at_a_time_in_arrival_order(inbox: Inbox) -> None:
    handler = Handler()
    dispatcher = Dispatcher(inbox, handler, room=lambda: 10, max_running=10, poll=0.05)
    await put(inbox, ("a1", "A"), ("a2", "A"), ("b1", "B"), ("a3", "A"))
    dispatcher.start()
    await until(lambda: sorted(handler.started) == ["a1", "b1"], "a1 and b1 running together")
    handler.finish("b1")
    handler.finish("a1")
    await until(lambda: handler.started[2:] == ["a2"], "a2 after a1")
    assert await state(inbox, "a1") is InboxState.ANSWERED
    handler.finish("a2", Outcome(InboxState.IGNORED, "not for us"))
    await until(lambda: handler.started[3:] == ["a3"], "a3 after a2")
    handler.finish("a3")
    await until(lambda: dispatcher.idle, "everything answered")
    stored = await inbox.run(inbox.db.get, "a2")
    assert stored is not None and (stored.state, stored.reason) == (InboxState.IGNORED, "not for us")
    await dispatcher.stop()


async def test_without_room_messages_wait_on_disk(inbox: Inbox) -> None:
    handler = Handler()
    room = 0
    idle_calls = 0

    async def on_idle() -> None:
        nonlocal idle_calls
        idle_calls += 1

    dispatcher = Dispatcher(inbox, handler, room=lambda: room, max_running=2, poll=0.05, on_idle=on_idle)
    await put(inbox, ("a1", "A"), ("b1", "B"), ("c1", "C"))
    dispatcher.start()
    await until(lambda: idle_calls >= 2, "the waiting messages to be shown")
    assert handler.started == [] and await state(inbox, "a1") is InboxState.RECEIVED
    room = 5
    await until(lambda: handler.started == ["a1", "b1"], "two starts (max_running = 2)")
    handler.finish("a1")
    await until(lambda: handler.started[2:] == ["c1"], "the third once one ended")
    for mid in ("b1", "c1"):
        handler.finish(mid)
    await until(lambda: dispatcher.idle, "everything answered")
    await dispatcher.stop()


async def test_not_idle_while_a_pass_reads_the_inbox(inbox: Inbox) -> None:
    """A pass clears its wake-up before it reads the inbox: until it has read it, the dispatcher
    is not idle (tests and shutdown wait on `idle`; a stale "quiet" once ended a test early)."""
    handler = Handler()
    dispatcher = Dispatcher(inbox, handler, room=lambda: 5, max_running=5, poll=60.0)
    dispatcher.start()
    await until(lambda: dispatcher.idle, "the first pass to find nothing")
    await put(inbox, ("a1", "A"))
    gate = threading.Event()
    blocked = asyncio.ensure_future(inbox.run(gate.wait))  # the inbox's one thread, held
    dispatcher.wake()
    await until(lambda: not dispatcher._wake.is_set(), "the pass to begin")
    assert not dispatcher.idle
    gate.set()
    await blocked
    await until(lambda: handler.started == ["a1"], "the message to start")
    handler.finish("a1")
    await until(lambda: dispatcher.idle, "everything answered")
    assert await state(inbox, "a1") is InboxState.ANSWERED
    await dispatcher.stop()


async def test_requeue_failure_and_stop_each_leave_the_right_state(inbox: Inbox) -> None:
    handler = Handler()
    room = 10
    dispatcher = Dispatcher(inbox, handler, room=lambda: room, max_running=10, poll=0.05)
    await put(inbox, ("a1", "A"), ("b1", "B"), ("c1", "C"))
    dispatcher.start()
    await until(lambda: len(handler.started) == 3, "three starts")
    room = 0  # a requeued message waits for room again
    handler.finish("a1", NotNow("stopping"))
    handler.finish("b1", RuntimeError("a bug"))
    await until(lambda: dispatcher.running == 1, "two handlers ended")
    stored = await inbox.run(inbox.db.get, "a1")
    assert stored is not None and (stored.state, stored.attempts) == (InboxState.RECEIVED, 0)
    failed = await inbox.run(inbox.db.get, "b1")
    assert failed is not None and (failed.state, failed.reason) == (InboxState.FAILED, "RuntimeError: a bug")
    await dispatcher.stop()  # c1 is cut: kept for the next start, not counted as an attempt
    stopped = await inbox.run(inbox.db.get, "c1")
    assert stopped is not None and (stopped.state, stopped.attempts) == (InboxState.RECEIVED, 0)
    assert handler.started == ["a1", "b1", "c1"]
