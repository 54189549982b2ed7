"""Two services sharing one Redis inbox: each message answered once, one at a time per
conversation across both, in arrival order."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict

from bot.dispatch import Dispatcher, Outcome
from bot.inbox import InboxState, StoredMessage
from bot.inbox_factory import StoreSpec
from tests.test_inbox_contract import message
from tests.waiting import until


class Recorder:
    """The handlers of both services: who answered what, and how many ran per chat at once."""

    def __init__(self) -> None:
        self.answered: dict[str, list[str]] = defaultdict(list)  # chat -> message ids, in order
        self.by: dict[str, list[str]] = defaultdict(list)  # service -> message ids
        self.running: dict[str, int] = defaultdict(int)
        self.most_at_once = 0

    def handler(self, name: str):  # type: ignore[no-untyped-def]
        async def handle(stored: StoredMessage) -> Outcome:
            self.running[stored.chat_id] += 1
            self.most_at_once = max(self.most_at_once, self.running[stored.chat_id])
            await asyncio.sleep(0.02)  # some work, so that the other service could interleave
            self.answered[stored.chat_id].append(stored.message_id)
            self.by[name].append(stored.message_id)
            self.running[stored.chat_id] -= 1
            return Outcome(InboxState.ANSWERED)

        return handle


async def test_two_services_share_the_work_one_answer_at_a_time_per_chat(redis_server: str) -> None:
    spec = StoreSpec(
        backend="redis",
        where=redis_server,
        platform="feishu",
        retention_hours=12,
        prefix=f"test-{uuid.uuid4().hex[:12]}",
    )
    inboxes = [spec.inbox(), spec.inbox()]
    for inbox in inboxes:
        await inbox.open()
    # One chat's burst first (its next message is always the oldest waiting one, the one the
    # other service would take if a running message did not hold its chat), then five chats.
    sent = {"oc_burst": [f"burst_m{i}" for i in range(10)]}
    sent.update({f"oc_{n}": [f"oc_{n}_m{i}" for i in range(4)] for n in range(5)})
    arrivals = [("oc_burst", mid) for mid in sent["oc_burst"]]
    arrivals += [(f"oc_{n}", f"oc_{n}_m{i}") for i in range(4) for n in range(5)]
    for i, (chat, mid) in enumerate(arrivals):  # half of them through each service's receiver
        await inboxes[i % 2].receive(message(mid, chat), b"{}", time.time())
    recorder = Recorder()
    dispatchers = [
        Dispatcher(inbox, recorder.handler(name), room=lambda: 2, max_running=2, poll=0.01, lease=30.0)
        for name, inbox in zip(("one", "two"), inboxes, strict=True)
    ]
    for dispatcher in dispatchers:
        dispatcher.start()
    await until(
        lambda: sum(len(v) for v in recorder.answered.values()) == 30 and all(d.idle for d in dispatchers),
        "30 answers",
    )
    assert dict(recorder.answered) == sent  # each once, in arrival order per chat
    assert recorder.most_at_once == 1
    assert recorder.by["one"] and recorder.by["two"], dict(recorder.by)  # both did some of the work
    counts = await inboxes[0].run(inboxes[0].db.counts)
    assert counts == {"received": 0, "running": 0, "answered": 30, "failed": 0, "ignored": 0}
    for dispatcher in dispatchers:
        await dispatcher.stop()
    for inbox in inboxes:
        await inbox.close()
