"""The /ws protocol over real sockets: ask/stream, context, cancel, limits, bad input."""

from __future__ import annotations

import pytest
from websockets.exceptions import ConnectionClosed

from protocol.v1 import CloseCode
from tests.conftest import make_png
from tests.serving import make_config, serve, slow_echo
from tests.waiting import until
from tests.wsclient import Client


@pytest.fixture(scope="module")
def echo_server():
    with serve(make_config(max_image_bytes=64 * 1024, max_images=2, max_frame_bytes=512 * 1024)) as running:
        yield running


async def test_hello_describes_the_session(echo_server) -> None:
    client = await Client.open(echo_server.ws)
    hello = client.hello
    assert hello["seq"] == 0 and hello["protocol"] == 1 and hello["resumed"] is False
    assert len(hello["session"]) >= 20
    assert hello["ping_interval"] == 5.0 and hello["limits"]["max_images"] == 2
    await client.close()


async def test_ask_streams_queued_reading_started_deltas_done_with_increasing_seq(echo_server) -> None:
    client = await Client.open(echo_server.ws)
    await client.ask("q1", "what is this?", [make_png()])
    frames = await client.until_end("q1")
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "queued" and frames[0]["position"] >= 1
    # a question with a picture: "reading" when its preparation began, before the model took it
    assert kinds[1:3] == ["reading", "started"] and kinds[-1] == "done", kinds
    assert frames[1] == {"type": "reading", "id": "q1", "seq": frames[0]["seq"] + 1}
    assert set(kinds[3:-1]) == {"delta"}
    done = frames[-1]
    assert done["text"] == "echo: what is this? [96x64]"
    assert "".join(f["text"] for f in frames if f["type"] == "delta") == done["text"]
    assert done["usage"]["completion_tokens"] > 0 and done["finish_reason"] == "stop"
    seqs = [f["seq"] for f in client.frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] == 1
    await client.ask("q2", "and without a picture?")
    assert "reading" not in [f["type"] for f in await client.until_end("q2")]  # nothing to read
    await client.close()


async def test_earlier_turns_are_context_until_reset(echo_server) -> None:
    client = await Client.open(echo_server.ws)
    await client.ask("a", "first question")
    first = (await client.until_end("a"))[-1]
    await client.ask("b", "second")
    second = (await client.until_end("b"))[-1]
    # The echo engine counts every turn's characters as prompt tokens: the first exchange is context.
    assert second["usage"]["prompt_tokens"] > len("second") + len("first question")
    await client.send({"type": "reset"})
    assert (await client.recv())["type"] == "reset"
    await client.ask("c", "second")
    third = (await client.until_end("c"))[-1]
    assert third["usage"]["prompt_tokens"] == len("second") + 1
    assert first["usage"]["prompt_tokens"] == len("first question") + 1
    await client.close()


async def test_client_ping_gets_a_pong(echo_server) -> None:
    client = await Client.open(echo_server.ws)
    await client.send({"type": "ping", "ts": 1234})
    pong = await client.recv()
    assert pong["type"] == "pong" and pong["ts"] == 1234 and pong["server_ts"] > 0
    await client.close()


@pytest.mark.parametrize(
    ("frame", "code", "words"),
    [
        ("{not json", "bad_request", "not valid JSON"),
        ("[1, 2]", "bad_request", "JSON object"),
        ('{"type": "dance"}', "bad_request", "unknown frame type"),
        ('{"type": "ask", "text": "no id"}', "bad_request", '"id"'),
        ('{"type": "ask", "id": "x"}', "bad_request", "question, a picture"),
        ('{"type": "ask", "id": "x", "text": "hi", "images": ["%%%not base64"]}', "bad_image", "base64"),
        ('{"type": "ask", "id": "x", "text": "hi", "images": "abc"}', "bad_request", "list"),
        ('{"type": "ask", "id": "x", "text": "", "images": ["QQ==", "QQ==", "QQ=="]}', "too_large", "most 2"),
        ('{"type": "ask", "id": "x", "text": "hi", "max_tokens": -3}', "bad_request", "max_tokens"),
        ('{"type": "cancel", "id": "nothing-running"}', "bad_request", "no running question"),
        (b'{"type": "ping"}', "bad_request", "binary"),
    ],
)
async def test_bad_input_gets_an_error_frame_and_the_session_stays_usable(
    echo_server, frame: str | bytes, code: str, words: str
) -> None:
    client = await Client.open(echo_server.ws)
    await client.send(frame)
    error = await client.recv()
    assert error["type"] == "error" and error["code"] == code, error
    assert words in error["message"]
    await client.ask("after", "still there?")
    assert (await client.until_end("after"))[-1]["type"] == "done"
    await client.close()


async def test_pictures_that_are_too_large_or_not_pictures_get_errors(echo_server) -> None:
    client = await Client.open(echo_server.ws)
    await client.ask("big", "look", [make_png(900, 900) + b"\0" * 70_000])
    error = (await client.until_end("big"))[-1]
    assert (error["type"], error["code"]) == ("error", "too_large")
    await client.ask("junk", "look", [b"this is not a picture at all"])
    error = (await client.until_end("junk"))[-1]
    assert (error["type"], error["code"]) == ("error", "bad_image")
    assert "picture 1" in error["message"]
    await client.ask("ok", "fine")
    assert (await client.until_end("ok"))[-1]["type"] == "done"
    await client.close()


async def test_a_frame_past_the_size_limit_closes_with_1009(echo_server) -> None:
    client = await Client.open(echo_server.ws)
    with pytest.raises(ConnectionClosed) as caught:
        await _send_then_recv(client, '{"type": "ask", "id": "huge", "text": "' + "x" * 600_000 + '"}')
    assert caught.value.rcvd is not None and caught.value.rcvd.code == CloseCode.TOO_BIG
    # Abuse ends the session: it is not parked for resume (that would keep it for resume_ttl, 300 s).
    sessions = echo_server.service.hub.sessions
    await until(lambda: all(s.id != client.session for s in sessions), "the session to end, not be parked")


async def test_cancel_ends_the_answer_with_cancelled() -> None:
    with serve(make_config(), executor=slow_echo(0.02)) as running:
        client = await Client.open(running.ws)
        await client.ask("long", "a rather long question to echo slowly")
        while (await client.recv())["type"] != "delta":
            pass
        await client.send({"type": "cancel", "id": "long"})
        frames = await client.until_end("long")
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "cancelled"
        await client.close()


async def test_per_session_limits_duplicate_ids_and_busy() -> None:
    with serve(make_config(max_asks_per_session=2), executor=slow_echo(0.02)) as running:
        client = await Client.open(running.ws)
        await client.ask("a", "slow one " * 5)
        await client.ask("a", "same id")
        error = await client.recv()
        while error["type"] != "error":
            error = await client.recv()
        assert error["id"] == "a" and error["code"] == "bad_request" and "still running" in error["message"]
        await client.ask("b", "slow two " * 5)
        await client.ask("c", "one too many")
        while not (error["type"] == "error" and error.get("id") == "c"):
            error = await client.recv()
        assert error["code"] == "busy" and error["retry_after"] > 0
        await client.close()


async def test_a_flood_of_frames_closes_with_1008() -> None:
    with serve(make_config(max_frames_per_second=5.0)) as running:
        client = await Client.open(running.ws)
        for _ in range(40):
            try:
                await client.send({"type": "ping"})
            except ConnectionClosed:
                break
        with pytest.raises(ConnectionClosed) as caught:
            await _read_until_closed(client)
        assert caught.value.rcvd is not None and caught.value.rcvd.code == CloseCode.POLICY
        assert "frames a second" in caught.value.rcvd.reason


async def test_max_sessions_refuses_cleanly_with_1013() -> None:
    with serve(make_config(max_sessions=2)) as running:
        first = await Client.open(running.ws)
        second = await Client.open(running.ws)
        with pytest.raises(ConnectionClosed) as caught:
            await Client.open(running.ws)
        assert caught.value.rcvd is not None and caught.value.rcvd.code == CloseCode.FULL
        await first.close()
        await until(lambda: len(running.service.hub.sessions) < 2, "the closed session to free its place")
        third = await Client.open(running.ws)
        await second.close()
        await third.close()


async def _read_until_closed(client: Client) -> None:
    while True:
        await client.recv()


async def _send_then_recv(client: Client, frame: str) -> None:
    """The server may close once it has read a frame's header, while the rest is still on its
    way: then the send itself sees the close, else the next receive does."""
    await client.send(frame)
    await client.recv()
