"""Nothing lost, nothing twice: `vlbridge serve` killed with ``kill -9`` and started again.

Real processes: the service (demo model, CPU) and its long-connection worker in one process
group, the unmodified lark-oapi SDK, the fake Feishu platform in this process. Checked:

- killed while 20 answers stream: after the restart each of the 20 messages has exactly one
  reply, a card closed by the bot with a complete answer; a card cut mid-answer is the one
  finished (CardKit's sequence check would refuse a restart that reused numbers);
- killed between the platform's delivery and the ack: the platform delivers again and each
  message is answered once; a message answered before the restart and delivered again gets
  no second reply;
- a burst of 200 messages with an executor queue of 2: all answered, in arrival order per
  chat, waiting cards show their queue place, every ack under 500 ms, memory bounded;
- an answer that ends the process `max_attempts` times is set aside and the user told on its
  card; `vlbridge inbox` lists it and `vlbridge inbox retry` has the running service answer it
  into the same card;
- a damaged or already used inbox, or an unreachable Redis, stops `vlbridge serve` at once with
  one clear line.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from bot import texts
from tests.conftest import make_png
from tests.fakefeishu import FakeFeishu, User
from tests.fakefeishu.records import CardOpKind, CardRecord
from tests.feishu_service import Service, env_for, serving, write_config
from tests.waiting import DEADLINE, until_blocking

# What a card may end with that is not a complete answer (the demo model's random words include
# some of the bot's own, so a card is checked against whole sentences, not words).
NOT_AN_ANSWER = [
    *(
        texts.text(key, "zh", ahead=n, attempts=n)
        for key in ("thinking", "queued", "kept", "gave_up")
        for n in (0, 1)
    ),
    *(texts.error_text(code, "zh") for code in ("timeout", "unavailable", "internal", "busy")),
    texts.text("cancelled_suffix", "zh"),
]


def answered_once(fake: FakeFeishu, message_ids: list[str]) -> dict[str, CardRecord] | None:
    """Each message's one reply, a closed card, by message id; None while any is missing or
    open. Fails at once when a message has a second reply (that never goes away)."""
    replies = fake.records.replies()
    cards = {card.card_id: card for card in fake.records.cards()}
    found: dict[str, CardRecord] = {}
    for message_id in message_ids:
        mine = [reply for reply in replies if reply.parent_id == message_id]
        assert len(mine) <= 1, f"message {message_id} got {len(mine)} replies: {mine}"
        if not mine:
            return None
        assert mine[0].card_id, f"message {message_id} got a plain reply: {mine[0].text!r}"
        card = cards[mine[0].card_id]
        if not card.closed:
            return None
        found[message_id] = card
    return found


def assert_complete(card: CardRecord) -> None:
    # Closed by the bot (an answer card is replaced whole at the end), not by a timeout.
    assert card.closed_by == "update", f"card {card.card_id} closed by {card.closed_by}"
    assert card.final_text, card.card_id
    assert not any(card.final_text.endswith(sentence) for sentence in NOT_AN_ANSWER), card.final_text
    last = card.history[-1]
    assert last.kind is CardOpKind.UPDATE, "the last operation must close the answer"
    summary = orjson.loads(last.content)["config"]["summary"]["content"]
    assert summary == " ".join(card.final_text.split())[:60], "the last operation must close the answer"


def no_connection(fake: FakeFeishu) -> None:
    until_blocking(lambda: not fake.records.open_connections(), "the dead service's connection to close")


def message_id(event: dict[str, Any]) -> str:
    return str(event["event"]["message"]["message_id"])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_kill_9_while_answers_stream_then_each_message_is_answered_once(
    fake_feishu: FakeFeishu,
    demo_model_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    """With either inbox backend: the worker commits arrivals to it (a file, or Redis), the
    restarted service finds there what the killed one accepted and finishes the same cards.

    A file inbox is the restarted service's alone (its lock proves the killed one gone): it
    takes every running answer over at start-up. A Redis inbox may be shared with live
    services: the answers are taken over once the killed one's leases end, so the lease is
    short here (3 s instead of 30 s: the same takeover, without half a minute of waiting)."""
    config = write_config(
        tmp_path / "vlbridge.toml",
        fake_feishu,
        demo_model_dir,
        tmp_path / "data",
        max_new_tokens=160,
        executor="max_batch = 32\nqueue_size = 32",
        redis_url=request.getfixturevalue("redis_server") if backend == "redis" else "",
        storage_extra="lease_seconds = 3.0" if backend == "redis" else "",
    )
    events = [fake_feishu.events.image(f"img_{i}", sender=User(name=f"user {i}")) for i in range(20)]
    ids = [message_id(event) for event in events]
    with serving(fake_feishu, config) as service:
        for i, event in enumerate(events):
            fake_feishu.push_event(event, resources={f"img_{i}": make_png(color=(10 * i, 90, 200 - 5 * i))})

        def streaming() -> list[CardRecord]:
            cards = [c for c in fake_feishu.records.cards() if c.message_id and len(c.content_updates) >= 2]
            return [c for c in cards if not c.closed]

        cut = until_blocking(streaming, "answers streaming into their cards", 8 * DEADLINE, poll=0.05)
        service.kill_group()
    assert any(not card.closed for card in cut), "every answer ended before the kill: nothing was tested"
    no_connection(fake_feishu)

    with serving(fake_feishu, config) as service:
        cards = until_blocking(
            lambda: answered_once(fake_feishu, ids), "one complete card per message", 16 * DEADLINE, poll=0.2
        )
        for card in cards.values():
            assert_complete(card)
        finished = {card.card_id for card in cards.values()}
        assert {card.card_id for card in cut} <= finished, "a card cut by the kill was not the one finished"
        counts = until_blocking(
            lambda: (c := service.health()["platforms"]["feishu"]["inbox"])["answered"] == 20 and c,
            "the inbox to count 20 answered",
            poll=0.2,
        )
        assert counts["received"] == counts["running"] == counts["failed"] == 0, counts


@pytest.mark.timeout(900)
def test_kill_between_delivery_and_ack_then_the_platform_delivers_again(
    fake_feishu: FakeFeishu, demo_model_dir: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "vlbridge.toml", fake_feishu, demo_model_dir, tmp_path / "data", max_new_tokens=8
    )
    before = fake_feishu.events.text("answered before the restart")
    events = [fake_feishu.events.text(f"question {i}") for i in range(5)]
    with serving(fake_feishu, config) as service:
        fake_feishu.push_event(before)
        until_blocking(
            lambda: answered_once(fake_feishu, [message_id(before)]), "the first answer", 4 * DEADLINE
        )
        worker = service.health()["platforms"]["feishu"]["worker_pid"]
        os.kill(worker, signal.SIGSTOP)  # it reads nothing more: deliveries stay unacknowledged
        event_ids = [
            fake_feishu.push_event(event, retry_unacked_after_s=3.0, max_retries=200) for event in events
        ]
        until_blocking(
            lambda: all(fake_feishu.records.deliveries(e) for e in event_ids), "the deliveries", poll=0.05
        )
        assert not any(fake_feishu.records.acks(e) for e in event_ids), "acked by a stopped worker?"
        service.kill_group()
    no_connection(fake_feishu)

    with serving(fake_feishu, config) as service:
        cards = until_blocking(
            lambda: answered_once(fake_feishu, [message_id(e) for e in events]),
            "one answer per redelivered message",
            8 * DEADLINE,
            poll=0.1,
        )
        for card in cards.values():
            assert_complete(card)
        for event_id in event_ids:
            assert any(ack.code == 200 for ack in fake_feishu.records.acks(event_id)), event_id
        # The message answered before the restart, delivered again: acked, not answered again.
        redelivery = fake_feishu.push_event(before)
        until_blocking(lambda: fake_feishu.records.acks(redelivery)[1:], "the redelivery's ack", poll=0.05)
        until_blocking(
            lambda: service.health()["platforms"]["feishu"]["counts"].get("duplicate"),
            "the redelivery to be recognised",
            poll=0.1,
        )
        assert len([r for r in fake_feishu.records.replies() if r.parent_id == message_id(before)]) == 1


@pytest.mark.timeout(900)
def test_a_burst_of_200_waits_on_disk_and_is_answered_in_order(
    fake_feishu: FakeFeishu, demo_model_dir: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "vlbridge.toml",
        fake_feishu,
        demo_model_dir,
        tmp_path / "data",
        max_new_tokens=3,
        executor="max_batch = 16\nqueue_size = 2",
        feishu="user_rate_per_minute = 1000",
    )
    # 25 chats (more than the 16 batch rows and 2 queue places: heads of chats wait on disk
    # too) of 8 messages each (each chat's own queue on disk, answered in order).
    chats = [f"oc_burst_{c:02d}" for c in range(25)]
    events = [
        fake_feishu.events.text(f"question {i} in {chat}", chat_id=chat) for i in range(8) for chat in chats
    ]
    ids = [message_id(event) for event in events]
    warm_up = [fake_feishu.events.text(f"warm-up {i}", sender=User()) for i in range(8)]
    with serving(fake_feishu, config) as service:
        # The first answers allocate what every later one reuses (two at a time, as they come
        # in a chat).
        for pair in (warm_up[i : i + 2] for i in range(0, len(warm_up), 2)):
            for event in pair:
                fake_feishu.push_event(event)
            until_blocking(
                lambda pair=pair: answered_once(fake_feishu, [message_id(e) for e in pair]),
                "warm-up",
                8 * DEADLINE,
            )
        memory_before = service.peak_rss()
        for event in events:  # 200 messages within 1.2 s (the pace of the load, not a wait)
            fake_feishu.push_event(event)
            time.sleep(0.006)
        cards = until_blocking(
            lambda: answered_once(fake_feishu, ids), "200 answers", 20 * DEADLINE, poll=0.5
        )
        for card in cards.values():
            assert_complete(card)
        acks = fake_feishu.records.acks()
        assert len(acks) >= 200 and all(ack.code == 200 for ack in acks)
        latencies = sorted(ack.latency_s for ack in acks)
        p50, p99, slowest = (
            latencies[len(latencies) // 2],
            latencies[int(len(latencies) * 0.99)],
            latencies[-1],
        )
        print(f"ACKS p50 {p50:.3f} p99 {p99:.3f} max {slowest:.3f}")
        assert slowest < 0.5, f"an ack took {slowest:.3f} s (p50 {p50:.3f} s, p99 {p99:.3f} s)"
        growth = service.peak_rss() - memory_before
        print(f"MEMORY grew {growth / 2**20:.1f} MB")  # 9 MB on the 2-core VM
        assert growth < 60 * 2**20, f"the burst grew the service by {growth / 2**20:.0f} MB"
        place = re.compile(texts.text("queued", "zh", ahead=999).replace("999", r"\d+"))
        queued = [c for c in cards.values() if any(place.fullmatch(op.content) for op in c.content_updates)]
        assert queued, "no waiting message was shown its place in the queue"
    # Per chat, answers ended in arrival order (the service logs each request's end).
    burst = set(ids)
    done = [m.group(1) for line in service.lines if (m := re.search(r"request feishu-(\S+)-\d+ done", line))]
    done = [mid for mid in done if mid in burst]
    assert sorted(done) == sorted(ids), "every message answered exactly once, by the log too"
    position = {mid: i for i, mid in enumerate(done)}
    for chat in chats:
        mine = [message_id(e) for e in events if e["event"]["message"]["chat_id"] == chat]
        assert [position[m] for m in mine] == sorted(position[m] for m in mine), f"out of order in {chat}"
    # Handed over only as many as the executor takes (free rows + queue places): none refused
    # `busy`, which would have made its message wait up to 5 s before asking again.
    refused = [line for line in service.lines if re.search(r"request feishu-\S+ failed: busy", line)]
    assert not refused, refused[:3]


def inbox_cli(config: Path, fake: FakeFeishu, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "inbox", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env_for(fake),
        timeout=4 * DEADLINE,
        check=False,
    )


@pytest.mark.timeout(900)
def test_an_answer_that_kills_the_service_is_set_aside_then_retried_by_the_admin(
    fake_feishu: FakeFeishu, demo_model_dir: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "vlbridge.toml",
        fake_feishu,
        demo_model_dir,
        tmp_path / "data",
        max_new_tokens=200,
        feishu="max_attempts = 1",
    )
    event = fake_feishu.events.image("img_fatal")
    mid = message_id(event)

    def card_of(service: Service) -> CardRecord | None:
        replies = [r for r in fake_feishu.records.replies() if r.parent_id == mid]
        return fake_feishu.records.card(replies[0].card_id) if replies and replies[0].card_id else None

    with serving(fake_feishu, config) as service:
        fake_feishu.push_event(event, resources={"img_fatal": make_png()})
        until_blocking(
            lambda: (c := card_of(service)) and len(c.content_updates) >= 2 and not c.closed,
            "the answer streaming",
            8 * DEADLINE,
            poll=0.05,
        )
        service.kill_group()
    no_connection(fake_feishu)

    with serving(fake_feishu, config) as service:
        told = until_blocking(
            lambda: (c := card_of(service)) and c.closed and c, "the user to be told", poll=0.1
        )
        assert told.final_text == texts.text("gave_up", "zh", attempts=1), told.final_text
        listing = inbox_cli(config, fake_feishu, "--state", "failed", "--json")
        assert listing.returncode == 0, listing.stderr
        [row] = [orjson.loads(line) for line in listing.stdout.splitlines()]
        assert row["message_id"] == mid and row["attempts"] == 1 and "ended 1 times" in row["reason"], row
        table = inbox_cli(config, fake_feishu)
        assert mid in table.stdout and "failed" in table.stdout, table.stdout

        retried = inbox_cli(config, fake_feishu, "retry", mid)
        assert retried.returncode == 0, retried.stderr
        card = until_blocking(
            lambda: (c := card_of(service)) and c.closed and c.final_text != told.final_text and c,
            "the running service to answer it again",
            8 * DEADLINE,
            poll=0.1,
        )
        assert card.card_id == told.card_id, "the retry must finish the same card"
        assert_complete(card)
        assert len([r for r in fake_feishu.records.replies() if r.parent_id == mid]) == 1
        again = inbox_cli(config, fake_feishu, "retry", mid)
        assert again.returncode == 1 and "only a failed message can be retried" in again.stderr, again.stderr


def serve_once(fake: FakeFeishu, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env_for(fake),
        timeout=4 * DEADLINE,
        check=False,
    )


def test_a_damaged_inbox_stops_the_service_with_one_clear_line(
    fake_feishu: FakeFeishu, demo_model_dir: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "data"
    storage.mkdir()
    inbox = storage / "feishu-inbox.sqlite3"
    inbox.write_bytes(b"this is not a database, it was damaged by a disk failure" * 100)
    config = write_config(tmp_path / "vlbridge.toml", fake_feishu, demo_model_dir, storage, max_new_tokens=8)
    result = serve_once(fake_feishu, config)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "storage error" in line]
    assert str(inbox) in line and "damaged" in line and "move the file aside" in line, line
    assert "Uvicorn running" not in result.stderr and "executor ready" not in result.stderr


def test_an_unreachable_redis_stops_the_service_with_one_clear_line(
    fake_feishu: FakeFeishu, demo_model_dir: Path, tmp_path: Path
) -> None:
    nothing = tmp_path / "no-redis-here.sock"
    config = write_config(
        tmp_path / "vlbridge.toml",
        fake_feishu,
        demo_model_dir,
        tmp_path / "data",
        max_new_tokens=8,
        redis_url=f"unix://:s3cret@{nothing}",
    )
    result = serve_once(fake_feishu, config)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "storage error" in line]
    assert f"inbox redis unix://:***@{nothing}" in line and "is Redis running" in line, line
    assert "s3cret" not in result.stderr
    assert "Uvicorn running" not in result.stderr and "executor ready" not in result.stderr


def test_an_inbox_in_use_by_another_service_stops_the_second_one(
    fake_feishu: FakeFeishu, demo_model_dir: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "data"
    storage.mkdir()
    config = write_config(tmp_path / "vlbridge.toml", fake_feishu, demo_model_dir, storage, max_new_tokens=8)
    with open(storage / "feishu-inbox.sqlite3.lock", "w") as held:  # what a running service holds
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = serve_once(fake_feishu, config)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "storage error" in line]
    assert "in use by another vlbridge service (pid 4242)" in line, line
