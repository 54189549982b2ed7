"""Two `vlbridge serve` instances on one Redis inbox and one Feishu app (scale-out).

Real processes: one redis-server, the fake Feishu platform in this process in cluster mode (each
delivery, copies and retries included, goes to one of the app's open long connections at
random), two services with both long connections up before anything is sent. Checked:

- 50 pictures from 10 chats, each delivered 3 times over the two connections: exactly 50
  answers, each a complete card about its own picture; per chat one answer at a time, in
  arrival order; both instances answered some;
- a text after a picture, answered by the instance that did not answer the picture: it sees
  the picture (the chat's context is the deployment's, not one process's);
- ``kill -9`` of one instance while it streams: the other finishes every message the dead one
  had started, in the same cards, each once, within the lease plus one answer time.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.inference.echo import ECHO_PATH
from tests.conftest import make_png
from tests.fakefeishu import FakeFeishu, User
from tests.fakefeishu.fixtures import FAST
from tests.fakefeishu.records import CardOpKind, CardRecord
from tests.feishu_service import Service, serving_together, write_config
from tests.test_feishu_recovery import answered_once, assert_complete, message_id
from tests.waiting import DEADLINE, until_blocking

CHATS = 10
ROUNDS = 5  # pictures per chat


def configs(folder: Path, fake: FakeFeishu, model_dir: Path, redis_url: str, **config: Any) -> list[Path]:
    """Two services' config files: one Redis inbox (one key prefix), a storage folder each."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return [
        write_config(
            folder / f"vlbridge-{name}.toml",
            fake,
            model_dir,
            folder / f"data-{name}",
            redis_url=redis_url,
            redis_prefix=prefix,
            **config,
        )
        for name in ("a", "b")
    ]


@pytest.fixture(scope="module")
def echo_pair(
    tmp_path_factory: pytest.TempPathFactory, redis_server: str
) -> Iterator[tuple[FakeFeishu, tuple[Service, Service]]]:
    """One fake app and two echo-engine services on it, shared by the tests that leave both
    running (starting two services costs more than everything they are asked here)."""
    folder = tmp_path_factory.mktemp("echo-pair")
    with FakeFeishu(client_config=FAST) as fake:
        paths = configs(
            folder,
            fake,
            folder,
            redis_server,
            max_new_tokens=64,
            model=ECHO_PATH,
            feishu="user_rate_per_minute = 1000",
        )
        with serving_together(fake, paths) as (a, b):
            models_ready((a, b))
            yield fake, (a, b)


def models_ready(services: tuple[Service, Service]) -> None:
    """Until both executors have loaded their model. Messages that arrive before wait for room,
    with a card showing their place; that path is not what these tests are about."""
    until_blocking(
        lambda: all(any("executor ready" in line for line in list(s.lines)) for s in services),
        "both models loaded",
        8 * DEADLINE,
        poll=0.1,
    )


def handled_by(services: tuple[Service, Service], mid: str) -> list[int]:
    """Which services (0, 1) began to handle message *mid* (the bot logs each message it takes)."""
    mark = f"message {mid} in "
    return [i for i, service in enumerate(services) if any(mark in line for line in list(service.lines))]


def closed_at(card: CardRecord) -> float:
    return card.history[-1].at


def answer_began(card: CardRecord) -> float:
    """When the card first showed answer text (echo answers start with ``echo:``)."""
    return next(
        op.at
        for op in card.history
        if op.kind in (CardOpKind.CONTENT, CardOpKind.UPDATE) and "echo:" in op.content  # or its final text
    )


def picture_size(chat: int, n: int) -> tuple[int, int]:
    return 40 + chat, 40 + n  # a size of its own per picture: each answer names its picture


def all_acked(fake: FakeFeishu, event_ids: list[str]) -> bool:
    return all(any(ack.code == 200 for ack in fake.records.acks(e)) for e in event_ids)


def duplicates(services: tuple[Service, Service]) -> int:
    """Redeliveries recognised by both services so far."""
    return sum(s.health()["platforms"]["feishu"]["counts"].get("duplicate", 0) for s in services)


@pytest.mark.timeout(600)
def test_fifty_pictures_delivered_three_times_each_get_fifty_answers_in_order(
    echo_pair: tuple[FakeFeishu, tuple[Service, Service]],
) -> None:
    fake, services = echo_pair
    users = [User(name=f"user {c}") for c in range(CHATS)]
    chats = [f"oc_two_{c}" for c in range(CHATS)]
    order: dict[str, list[str]] = {chat: [] for chat in chats}  # arrival order per chat
    size: dict[str, tuple[int, int]] = {}
    event_ids: list[str] = []
    already = duplicates(services)
    for n in range(ROUNDS):
        # A round is one picture per chat, each delivered 3 times at once over the two
        # connections; the next round once each is in the inbox (acked), so that the order of
        # arrival within a chat is the order sent here.
        round_ids = []
        for c, chat in enumerate(chats):
            event = fake.events.image(f"img_{c}_{n}", chat_id=chat, sender=users[c])
            mid = message_id(event)
            order[chat].append(mid)
            size[mid] = picture_size(c, n)
            resources = {f"img_{c}_{n}": make_png(*size[mid])}
            round_ids.append(fake.push_event(event, resources=resources, copies=3))
        until_blocking(lambda ids=round_ids: all_acked(fake, ids), f"round {n} in the inbox", poll=0.05)
        event_ids += round_ids
    ids = [mid for chat in chats for mid in order[chat]]
    cards = until_blocking(
        lambda: answered_once(fake, ids), "one complete card per picture", 8 * DEADLINE, poll=0.1
    )
    until_blocking(lambda: duplicates(services) - already == 100, "every redelivery recognised", poll=0.2)

    assert len([r for r in fake.records.replies() if r.parent_id in cards]) == 50
    for mid, card in cards.items():
        assert_complete(card)
        width, height = size[mid]
        assert card.final_text.endswith(f"[{width}x{height}]"), (mid, card.final_text)
    deliveries = [d for d in fake.records.deliveries() if d.event_id in event_ids]
    assert len(deliveries) == 150 and len({d.conn_id for d in deliveries}) >= 2
    by = {mid: handled_by(services, mid) for mid in ids}
    assert all(len(who) == 1 for who in by.values()), f"a message handled twice: {by}"
    share = [sum(who == [i] for who in by.values()) for i in (0, 1)]
    assert all(share), f"one instance answered everything: {share}"
    for chat in chats:
        for before, after in itertools.pairwise(cards[mid] for mid in order[chat]):
            assert answer_began(after) > closed_at(before), f"{chat}: an answer began before the last ended"


@pytest.mark.timeout(600)
def test_a_text_answered_by_the_other_instance_sees_the_picture(
    echo_pair: tuple[FakeFeishu, tuple[Service, Service]],
) -> None:
    """The chat's context (the last picture) belongs to the deployment: the instance that did
    not answer the picture answers the question about it as if it had."""
    fake, services = echo_pair
    chat, user = "oc_two_follow_up", User(name="asks twice")
    picture = fake.events.image("img_follow", chat_id=chat, sender=user)
    fake.push_event(picture, resources={"img_follow": make_png(52, 36)})
    until_blocking(lambda: answered_once(fake, [message_id(picture)]), "the picture's answer", 4 * DEADLINE)
    [first] = handled_by(services, message_id(picture))
    already = duplicates(services)
    # The instance that answered the picture stops (process group SIGSTOP): it takes nothing
    # from the inbox; a delivery to its connection goes unacknowledged and is retried until
    # it reaches the other instance.
    os.killpg(services[first].process.pid, signal.SIGSTOP)
    try:
        question = fake.events.text("and what is in it?", chat_id=chat, sender=user)
        event_id = fake.push_event(question, retry_unacked_after_s=0.5, max_retries=200)
        cards = until_blocking(
            lambda: answered_once(fake, [message_id(question)]), "the question's answer", 4 * DEADLINE
        )
    finally:
        os.killpg(services[first].process.pid, signal.SIGCONT)
    assert handled_by(services, message_id(question)) == [1 - first]
    # What the stopped instance read meanwhile is a redelivery once it runs again.
    until_blocking(
        lambda: len(fake.records.acks(event_id)) == len(fake.records.deliveries(event_id)),
        "every delivery acknowledged",
        poll=0.05,
    )
    unanswered = len(fake.records.deliveries(event_id)) - 1
    until_blocking(
        lambda: duplicates(services) - already == unanswered, "the redeliveries recognised", poll=0.1
    )
    answer = cards[message_id(question)].final_text
    assert answer == "echo: and what is in it? [52x36]", (
        f"the other instance did not see the picture: {answer!r}"
    )


@pytest.mark.timeout(600)
def test_kill_9_while_streaming_then_the_other_instance_finishes_every_answer_it_had_started(
    fake_feishu: FakeFeishu, demo_model_dir: Path, tmp_path: Path, redis_server: str
) -> None:
    lease = 3.0
    paths = configs(
        tmp_path,
        fake_feishu,
        demo_model_dir,
        redis_server,
        max_new_tokens=160,  # answers that take seconds: the kill comes mid-stream
        executor="max_batch = 8\nqueue_size = 8",
        feishu="user_rate_per_minute = 1000",
        storage_extra=f"lease_seconds = {lease}",
    )
    events = [fake_feishu.events.image(f"img_k{i}", chat_id=f"oc_kill_{i}") for i in range(6)]
    ids = [message_id(event) for event in events]

    def parent(card: CardRecord) -> str:
        return next(r.parent_id for r in fake_feishu.records.replies() if r.card_id == card.card_id)

    with serving_together(fake_feishu, paths) as (a, b):
        services = (a, b)
        models_ready(services)
        for i, event in enumerate(events):
            picture = {f"img_k{i}": make_png(color=(40 * i, 90, 200))}
            fake_feishu.push_event(event, resources=picture, retry_unacked_after_s=2.0, max_retries=100)

        def streaming() -> tuple[int, CardRecord] | None:
            for card in fake_feishu.records.cards():
                live = card.message_id and not card.closed and len(card.content_updates) >= 2
                if live and len(who := handled_by(services, parent(card))) == 1:
                    return who[0], card
            return None

        victim, cut = until_blocking(streaming, "an answer streaming", 8 * DEADLINE, poll=0.05)
        services[victim].kill_group()
        killed_at = time.monotonic()
        assert not fake_feishu.records.card(cut.card_id).closed, "the answer ended before the kill"
        cards = until_blocking(
            lambda: answered_once(fake_feishu, ids), "one complete card per picture", 8 * DEADLINE, poll=0.1
        )
        survivor = services[1 - victim]
        until_blocking(
            lambda: survivor.health()["platforms"]["feishu"]["inbox"]["answered"] == len(ids),
            "the inbox to count every answer",
            poll=0.2,
        )
    for card in cards.values():
        assert_complete(card)
    assert cards[parent(cut)].card_id == cut.card_id, "the cut answer must be finished in its card"
    assert len([r for r in fake_feishu.records.replies() if r.parent_id in cards]) == len(ids)
    taken = [mid for mid in ids if set(handled_by(services, mid)) == {0, 1}]
    assert parent(cut) in taken
    for mid in ids:
        assert handled_by(services, mid) in ([victim], [1 - victim], [0, 1]), mid
    # The survivor took the dead one's answers over once their lease ended (it looks every
    # third of a lease), then answered each once: within the lease plus one answer time.
    resumed = min(next(op.at for op in cards[mid].history if op.at > killed_at) for mid in taken)
    finished = max(closed_at(cards[mid]) for mid in taken)
    whole = [c for mid, c in cards.items() if mid not in taken]  # answered without a takeover
    answer_time = max(closed_at(c) - c.content_updates[0].at for c in (whole or cards.values()))
    print(
        f"TAKEOVER after {resumed - killed_at:.2f} s, finished {finished - killed_at:.2f} s after the kill; "
        f"lease {lease} s, longest whole answer {answer_time:.2f} s; taken {len(taken)}, whole {len(whole)}"
    )
    margin = 5.0  # for a busy machine
    assert resumed - killed_at < lease * 4 / 3 + margin, (
        f"taken over {resumed - killed_at:.1f} s after the kill"
    )
    assert finished - killed_at < lease * 4 / 3 + answer_time + margin, f"{finished - killed_at:.1f} s"
