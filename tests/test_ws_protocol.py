"""The sans-I/O core of protocol v1 with plain values; time is passed in (ms-scale steps)."""

from __future__ import annotations

import base64
import random

import orjson
import psutil
import pytest

from protocol.v1 import CloseCode
from server.inference.api import SamplingParams, Turn
from server.ws.frames import Ask, FrameLimits, InvalidFrame, Ping, Pong, Reset, parse_client_frame
from server.ws.keepalive import PingManager
from server.ws.sessions import SessionLimits, SessionRegistry
from server.ws.state import Beat, FloodGate, FrameLog, History, Keepalive

MS = 0.001
LIMITS = FrameLimits(max_images=2, max_image_bytes=100)


def test_parse_ask_with_base64_and_data_url_pictures() -> None:
    raw = base64.b64encode(b"\x89PNG...").decode()
    frame = parse_client_frame(
        orjson.dumps(
            {"type": "ask", "id": "1", "text": "hi", "images": [raw, "data:image/png;base64," + raw]}
        ),
        LIMITS,
    )
    assert frame == Ask("1", Turn.user("hi", [b"\x89PNG...", b"\x89PNG..."]))
    tuned = parse_client_frame('{"type":"ask","id":"2","text":"hi","max_tokens":5,"temperature":0.5}', LIMITS)
    assert tuned == Ask("2", Turn.user("hi"), SamplingParams(max_new_tokens=5, temperature=0.5))
    assert parse_client_frame('{"type":"reset"}', LIMITS) == Reset()
    assert parse_client_frame('{"type":"ping"}', LIMITS) == Ping(None)
    assert parse_client_frame('{"type":"pong","ts":12}', LIMITS) == Pong(12.0)


def test_parse_refuses_with_codes_and_the_ask_id() -> None:
    too_big = base64.b64encode(b"x" * 200).decode()
    with pytest.raises(InvalidFrame) as caught:
        parse_client_frame(orjson.dumps({"type": "ask", "id": "7", "images": [too_big]}), LIMITS)
    assert (caught.value.code, caught.value.ask_id) == ("too_large", "7")
    with pytest.raises(InvalidFrame) as caught:
        parse_client_frame('{"type":"ask","id":"8","text":"x","temperature":5}', LIMITS)
    assert caught.value.code == "bad_request" and "temperature" in caught.value.message
    with pytest.raises(InvalidFrame) as caught:
        parse_client_frame('{"type":"pong","ts":"soon"}', LIMITS)
    assert caught.value.code == "bad_request"


def test_frame_log_numbers_keeps_acks_and_reports_losses() -> None:
    log = FrameLog(limit=3)
    assert len(log) == 0 and log.since(0) == ([], 0)
    for n in range(1, 6):
        data = log.append({"type": "delta", "text": str(n)})
        assert orjson.loads(data)["seq"] == n
    frames, lost = log.since(1)  # 2 fell out of the 3-frame buffer
    assert [orjson.loads(f)["seq"] for f in frames] == [3, 4, 5] and lost == 1
    log.ack(4)
    assert [orjson.loads(f)["seq"] for f in log.since(4)[0]] == [5]
    log.ack(5)
    assert len(log) == 0 and log.since(5) == ([], 0)


def test_frame_log_keeps_the_newest_unacknowledged_frames_and_counts_the_rest_lost() -> None:
    rng = random.Random(7)
    log = FrameLog(limit=40)  # trims back to 40 once it holds 45
    acked = 0
    for _ in range(3000):
        if rng.random() < 0.9:
            log.append({"type": "delta"})
        else:
            acked = rng.randint(acked, log.seq)
            log.ack(acked)
        unacked = log.seq - acked
        assert min(unacked, 40) <= len(log) <= min(unacked, 45)
        last = rng.randint(-1, log.seq + 1)
        frames, lost = log.since(last)
        if last >= log.seq:
            assert (frames, lost) == ([], 0)
            continue
        first = max(last, 0) + 1 + lost  # what is not lost arrives, in order, up to the newest
        assert [orjson.loads(f)["seq"] for f in frames] == list(range(first, log.seq + 1))
        assert lost <= max(0, acked - max(last, 0)) + max(0, unacked - 40)


def test_frame_log_memory_is_about_the_size_of_its_frames() -> None:
    log = FrameLog(limit=20_000)
    frame = {"type": "done", "id": "q1", "text": "x" * 150, "usage": {"prompt_tokens": 1}}
    before = psutil.Process().memory_info().rss
    for _ in range(20_000):
        log.append(dict(frame))
    grown = psutil.Process().memory_info().rss - before
    assert len(log) == 20_000
    assert grown < 20_000 * 1024, f"{grown / 20_000:.0f} bytes of memory per ~200-byte frame"


def test_keepalive_pings_on_time_and_declares_death_after_interval_plus_timeout() -> None:
    ka = Keepalive(interval=45.0, timeout=10.0, now=0.0)
    assert ka.poll(44.999) is Beat.NOTHING and ka.poll(45.0) is Beat.PING
    assert ka.ping_sent(ts=1000, seq=7, now=45.0) is False
    assert ka.deadline() == 55.0  # silent since 0: dead at 55 unless something arrives
    assert ka.pong(999, 45.02) is None  # not the outstanding ping
    ka.received(45.02)
    rtt, seq = ka.pong(1000, 45.02)  # type: ignore[misc]
    assert abs(rtt - 20 * MS) < 1e-9 and seq == 7
    assert ka.poll(89.9) is Beat.NOTHING and ka.poll(90.0) is Beat.PING
    ka.ping_sent(ts=2000, seq=9, now=90.0)
    assert ka.poll(100.0) is Beat.NOTHING and ka.poll(100.03) is Beat.DEAD  # 45.02 + 55
    assert ka.ping_sent(ts=3000, seq=11, now=135.0) is True  # the pong for 2000 never came


def test_flood_gate_allows_bursts_then_the_rate() -> None:
    gate = FloodGate(rate=10, burst=3, now=0.0)
    assert [gate.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert gate.allow(0.1) is True and gate.allow(0.1) is False


def test_conversation_keeps_bounded_turns_and_only_recent_pictures() -> None:
    talk = History(max_turns=2, max_images=1)
    pic = b"png"
    for n in range(3):
        talk.add(Turn.user(f"q{n}", [pic]), f"a{n}", talk.generation)
    messages = talk.messages(Turn.user("now"))
    assert [t.text for t in messages] == ["q1", "a1", "q2", "a2", "now"]
    assert [len(t.images) for t in messages] == [0, 0, 1, 0, 0]
    started = talk.generation
    talk.reset()
    talk.add(Turn.user("old"), "answer from before the reset", started)
    assert len(talk) == 0


class FakeConnection:
    def __init__(self, label: str, now: float) -> None:
        self.label = label
        self.keepalive = Keepalive(0.2, 0.1, now)
        self.open = True
        self.pings: list[float] = []
        self.closed: tuple[int, str] | None = None

    def ping(self, now: float) -> bool:
        self.pings.append(now)
        return self.keepalive.ping_sent(len(self.pings), len(self.pings), now)

    def close(self, code: int, reason: str) -> None:
        self.open = False
        self.closed = (code, reason)


def test_one_sweep_pings_the_due_connections_and_closes_the_dead() -> None:
    registry = SessionRegistry(SessionLimits(10, 1.0, 16, 4, 4))
    manager = PingManager(registry, interval=0.2, timeout=0.1, clock=lambda: 0.0)
    alive, silent = FakeConnection("alive", 0.0), FakeConnection("silent", 0.0)
    manager.watch(alive)
    manager.watch(silent)
    now = 0.0
    while now < 1.0:
        now = round(now + 10 * MS, 3)
        if alive.pings:
            alive.keepalive.received(alive.pings[-1] + MS)  # answers each ping within 1 ms
        manager.sweep(now)
    assert alive.closed is None and len(alive.pings) in (4, 5)  # every 0.2 s, to the 10 ms tick
    assert silent.closed is not None and silent.closed[0] == CloseCode.PING_TIMEOUT
    assert silent.pings == [0.2] and manager.watched == 1


def test_registry_limits_evicts_parked_first_and_expires() -> None:
    registry = SessionRegistry(
        SessionLimits(max_sessions=2, resume_ttl=10.0, log_frames=16, history_turns=4, max_images=4)
    )
    a = registry.open(b"")
    b = registry.open(b"")
    assert a is not None and b is not None and registry.open(b"") is None
    registry.park(a, now=0.0)
    c = registry.open(b"")  # the parked one makes room
    assert c is not None and registry.resume(a.id, b"") is None
    registry.park(b, now=1.0)
    assert registry.resume(b.id, b"someone else") is None
    assert registry.expire(10.5) == 0 and registry.expire(11.0) == 1
    assert len(registry) == 1
