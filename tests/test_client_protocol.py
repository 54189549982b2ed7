"""The client's sans-I/O protocol core: plain frames in, events and frames out."""

from __future__ import annotations

import base64
import re
from typing import Any

import orjson
import pytest

from client.protocol import (
    AskDone,
    AskFailed,
    AskState,
    ClientProtocol,
    Delta,
    FramesLost,
    Hello,
    Link,
    ProtocolError,
    Queued,
    Reading,
    SessionLost,
    Started,
)


class Server:
    """Numbers frames like the real server does."""

    def __init__(self) -> None:
        self.seq = 0

    def frame(self, **frame: Any) -> bytes:
        self.seq += 1
        return orjson.dumps({**frame, "seq": self.seq})

    def hello(self, session: str = "s1") -> bytes:
        return self.frame(type="hello", session=session, ping_interval=45.0, protocol=1)


def connected(server: Server) -> ClientProtocol:
    core = ClientProtocol()
    core.connecting()
    [hello] = core.receive(server.hello())
    assert hello == Hello("s1", False, 45.0, {"protocol": 1, "seq": 1})
    assert core.link is Link.READY
    return core


def test_ask_and_stream() -> None:
    server = Server()
    core = connected(server)
    ask_id = core.ask("what is it?", [b"\x89PNG"])
    [frame] = core.take_outgoing()
    assert frame == {
        "type": "ask",
        "id": ask_id,
        "text": "what is it?",
        "images": [base64.b64encode(b"\x89PNG").decode()],
    }
    assert core.receive(server.frame(type="queued", id=ask_id, position=2)) == [Queued(ask_id, 2)]
    core.receive(server.frame(type="started", id=ask_id))
    assert core.receive(server.frame(type="delta", id=ask_id, text="a cat")) == [Delta(ask_id, "a cat")]
    done = core.receive(server.frame(type="done", id=ask_id, text="a cat", usage={"completion_tokens": 2}))
    assert done == [AskDone(ask_id, "a cat", {"completion_tokens": 2})]
    assert core.open_asks() == []


def test_reading_max_tokens_and_the_finish_reason() -> None:
    server = Server()
    core = connected(server)
    ask_id = core.ask("what is it?", [b"\x89PNG"], max_tokens=7)
    [frame] = core.take_outgoing()
    assert frame["max_tokens"] == 7
    core.receive(server.frame(type="queued", id=ask_id, position=1))
    assert core.receive(server.frame(type="reading", id=ask_id)) == [Reading(ask_id)]
    assert core.receive(server.frame(type="started", id=ask_id)) == [Started(ask_id)]
    done = core.receive(server.frame(type="done", id=ask_id, text="a cat", usage={}, finish_reason="length"))
    assert done == [AskDone(ask_id, "a cat", {}, "length")]
    with pytest.raises(ValueError, match="positive max_tokens"):
        core.ask("hi", max_tokens=0)
    core.ask("hi")
    assert "max_tokens" not in core.take_outgoing()[-1]  # the server's default length


def test_frame_types_a_client_does_not_know_are_ignored() -> None:
    """Protocol v1 grows by additions (like `reading`): an unknown frame type, or an unknown
    field, changes nothing about the ask it names."""
    server = Server()
    core = connected(server)
    ask_id = core.ask("hi")
    core.take_outgoing()
    core.receive(server.frame(type="queued", id=ask_id, position=1, new_field={"x": 1}))
    assert core.receive(server.frame(type="pondering", id=ask_id, depth=3)) == []
    assert core.asks[ask_id].state is AskState.QUEUED
    assert core.receive(server.frame(type="delta", id=ask_id, text="ok")) == [Delta(ask_id, "ok")]


def test_pings_are_answered_with_the_same_ts() -> None:
    server = Server()
    core = connected(server)
    assert core.receive(server.frame(type="ping", ts=1234)) == []
    assert core.take_outgoing() == [{"type": "pong", "ts": 1234}]


def test_replayed_frames_are_dropped_and_holes_reported() -> None:
    server = Server()
    core = connected(server)
    ask_id = core.ask("q")
    core.take_outgoing()
    first = server.frame(type="delta", id=ask_id, text="ab")
    assert core.receive(first) == [Delta(ask_id, "ab")]
    assert core.receive(first) == []  # the same seq again: a replay
    server.seq += 2
    events = core.receive(server.frame(type="delta", id=ask_id, text="z"))
    assert events == [FramesLost(3, 4), Delta(ask_id, "z")]


def test_resume_replays_missed_frames_and_resends_unacknowledged_asks() -> None:
    server = Server()
    core = connected(server)
    answered = core.ask("first")
    core.receive(server.frame(type="queued", id=answered, position=1))
    lost = core.ask("second")  # written, but the connection died before the server read it
    core.take_outgoing()
    core.disconnected()
    later = core.ask("third")  # asked while down
    assert core.take_outgoing() == []
    assert core.resume_query() == {"resume": "s1", "last_seq": "2"}
    core.connecting()
    [hello] = core.receive(orjson.dumps({"type": "hello", "session": "s1", "ping_interval": 45.0}))
    assert hello.resumed
    assert core.link is Link.SYNCING
    assert core.take_outgoing() == [{"type": "ping", "ts": 0}]  # asks wait for the end of the replay
    assert core.receive(server.frame(type="delta", id=answered, text="x")) == [Delta(answered, "x")]
    core.receive(server.frame(type="pong", ts=0))
    assert core.link is Link.READY
    assert [f["id"] for f in core.take_outgoing()] == [lost, later]
    assert core.asks[answered].state is AskState.STARTED


def test_a_forgotten_session_fails_running_asks_and_reasks_the_rest() -> None:
    server = Server()
    core = connected(server)
    running = core.ask("one")
    core.receive(server.frame(type="started", id=running))
    unacked = core.ask("two")
    core.take_outgoing()
    core.disconnected()
    core.connecting()
    events = core.receive(Server().hello("s2"))
    assert events[0] == Hello("s2", False, 45.0, {"protocol": 1, "seq": 1})
    assert events[1] == SessionLost("s1", "s2", (unacked,))  # "two" is asked again
    assert events[2] == AskFailed(running, "session_lost", "the server lost the session while answering")
    assert [f["id"] for f in core.take_outgoing()] == [unacked]
    assert core.last_seq == 1


def test_cancel_and_reset_wait_for_the_link() -> None:
    server = Server()
    core = connected(server)
    ask_id = core.ask("q")
    core.take_outgoing()
    core.disconnected()
    core.cancel(ask_id)
    core.reset()
    pending = core.ask("not sent yet")
    assert core.cancel(pending) == [AskFailed(pending, "cancelled", "cancelled before it was sent")]
    core.connecting()
    core.receive(orjson.dumps({"type": "hello", "session": "s1"}))
    assert core.take_outgoing() == [{"type": "ping", "ts": 0}]
    core.receive(server.frame(type="queued", id=ask_id, position=1))
    core.receive(server.frame(type="pong"))
    assert core.take_outgoing() == [{"type": "cancel", "id": ask_id}, {"type": "reset"}]


def test_errors_belong_to_their_ask_or_to_the_session() -> None:
    server = Server()
    core = connected(server)
    ask_id = core.ask("q")
    events = core.receive(server.frame(type="error", id=ask_id, code="busy", message="full", retry_after=2))
    assert events == [AskFailed(ask_id, "busy", "full", 2.0)]
    [event] = core.receive(server.frame(type="error", code="bad_request", message="what?"))
    assert event.code == "bad_request"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1, 2]", b'{"type": "delta", "id": "q1", "text": "x", "seq": 1}'],
)
def test_bad_server_frames_raise(raw: bytes) -> None:
    core = ClientProtocol()
    core.connecting()
    with pytest.raises(ProtocolError):
        core.receive(raw)


def test_illegal_transitions_name_the_states() -> None:
    core = ClientProtocol()
    core.connecting()
    core.receive(Server().hello())
    with pytest.raises(ProtocolError, match=re.escape("expected link idle|down|handshake, got ready")):
        core.connecting()


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    from client.connection import Backoff

    backoff = Backoff(initial=0.25, factor=2.0, maximum=5.0, jitter=0.2)
    assert [round(Backoff(jitter=0).delay(n), 2) for n in (1, 2, 3, 6, 9)] == [0.25, 0.5, 1.0, 5.0, 5.0]
    assert all(0.2 <= backoff.delay(1) <= 0.3 for _ in range(50))
