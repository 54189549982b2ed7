"""Pings with short intervals, resume after a dropped connection, auth on the handshake."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from protocol.v1 import HEADER_SESSION, CloseCode
from tests.serving import make_config, serve, slow_echo
from tests.waiting import until
from tests.wsclient import Client


async def test_a_silent_client_is_closed_in_time_and_an_answering_one_never() -> None:
    with serve(make_config(ping_interval=0.2, ping_timeout=0.2)) as running:
        opened = time.monotonic()  # before the handshake: the server's clock starts after this
        silent = await Client.open(running.ws)
        silent.answer_pings = False
        talker = await Client.open(running.ws)

        async def wait_silent() -> float:
            with pytest.raises(ConnectionClosed) as caught:
                await _read_until_closed(silent)
            assert caught.value.rcvd is not None and caught.value.rcvd.code == CloseCode.PING_TIMEOUT
            return time.monotonic() - opened

        silent_closed = asyncio.create_task(wait_silent())
        pings_before = pings_after = 0
        # The talker answers pings until the silent one is gone and three more pings came: it
        # outlives by 0.6 s the deadline that ended the silent one (a talker whose pongs were
        # ignored would be closed here, and recv_any would raise).
        while (pings_after < 3 or pings_before + pings_after < 5) and not (
            silent_closed.done() and silent_closed.exception()
        ):
            if (await talker.recv_any())["type"] == "ping":
                if silent_closed.done():
                    pings_after += 1
                else:
                    pings_before += 1
        closed_after = await silent_closed
        # Dead after interval + timeout (0.4 s), less a sweeper tick; the upper bound is wide
        # for a busy machine yet far below "never" or the 45 s default interval.
        assert 0.35 <= closed_after <= 2.0
        assert pings_before + pings_after >= 5 and pings_after >= 3  # one every 0.2 s, each answered
        assert all(f["ts"] > 0 for f in talker.frames if f["type"] == "ping")
        await talker.send({"type": "ping"})
        assert (await talker.recv())["type"] == "pong"  # still open
        metrics = httpx.get(running.http + "/metrics").text
        assert "vlbridge_ws_ping_rtt_seconds_count" in metrics
        rtt = "vlbridge_ws_ping_rtt_seconds_count"
        count = next(line for line in metrics.splitlines() if line.startswith(rtt))
        assert float(count.split()[-1]) >= 5
        await talker.close()


async def test_a_busy_session_is_pinged_early_so_its_resume_buffer_stays_short() -> None:
    with serve(make_config(resume_buffer_frames=64, resume_ttl=30.0)) as running:
        client = await Client.open(running.ws)
        for n in range(40):  # well over 64 frames, long before the first timed ping
            await client.ask(f"q{n}", "hi")
            assert (await client.until_end(f"q{n}"))[-1]["type"] == "done"
        pings = [f for f in client.frames if f["type"] == "ping"]
        assert len(pings) >= 10  # each time 8 frames (an eighth of 64) awaited a pong
        client.conn.transport.abort()
        await until(lambda: running.service.hub.sessions.parked == 1, "the dropped session to be parked")
        again = await Client.open(f"{running.ws}?resume={client.session}&last_seq=0")
        held, produced = again.hello["replayed"], again.hello["last_seq"]
        assert produced >= client.frames[-1]["seq"] > 160
        assert held < 32 and held + again.hello["lost"] == produced  # the acknowledged ones were dropped
        await again.close()


async def test_resume_after_a_dropped_connection_loses_and_repeats_nothing() -> None:
    with serve(make_config(resume_ttl=30.0), executor=slow_echo(0.01)) as running:
        client = await Client.open(running.ws)
        text = "tell me everything about this long question, slowly please"
        await client.ask("q", text)
        while len([f for f in client.frames if f["type"] == "delta"]) < 5:
            await client.recv()
        last_seq = client.frames[-1]["seq"]
        client.conn.transport.abort()  # the pipe breaks: no close frame
        service = running.service
        await until(lambda: service.hub.sessions.parked == 1, "the dropped session to be parked")
        await until(lambda: service.answers.running == 0, "the answer to finish while the client is away")
        assert len(service.hub.sessions) == 1 and service.hub.sessions.parked == 1

        again = await Client.open(f"{running.ws}?resume={client.session}&last_seq={last_seq}")
        assert again.hello["resumed"] is True and again.hello["session"] == client.session
        assert again.hello["lost"] == 0 and again.hello["replayed"] > 0
        rest = await again.until_end("q")
        frames = client.frames + again.frames
        seqs = [f["seq"] for f in frames]
        assert seqs == list(range(1, len(seqs) + 1))  # contiguous: nothing lost, nothing twice
        deltas = "".join(f["text"] for f in frames if f["type"] == "delta")
        assert rest[-1]["type"] == "done" and rest[-1]["text"] == deltas == f"echo: {text}"
        # The resumed session keeps its conversation and goes on numbering.
        await again.ask("q2", "and then?")
        done = (await again.until_end("q2"))[-1]
        assert done["usage"]["prompt_tokens"] > len(text) and done["seq"] > seqs[-1]
        await again.close()


async def test_resume_of_an_unknown_or_expired_session_starts_a_new_one() -> None:
    with serve(make_config(resume_ttl=0.3, ping_interval=0.1, ping_timeout=0.1)) as running:
        unknown = await Client.open(f"{running.ws}?resume=nope&last_seq=3")
        assert unknown.hello["resumed"] is False and unknown.hello["resume_error"]
        await unknown.close()
        client = await Client.open(running.ws)
        dropped = time.monotonic()
        client.conn.transport.abort()
        await until(lambda: len(running.service.hub.sessions) == 0, "the parked session to expire")
        assert time.monotonic() - dropped >= 0.3  # kept for resume_ttl, not dropped at once
        late = await Client.open(f"{running.ws}?resume={client.session}&last_seq=0")
        assert late.hello["resumed"] is False and late.hello["session"] != client.session
        await late.close()


async def test_a_clean_close_ends_the_session_and_a_resume_takes_over_a_live_connection() -> None:
    with serve(make_config(resume_ttl=300.0)) as running:
        first = await Client.open(running.ws)
        second = await Client.open(f"{running.ws}?resume={first.session}&last_seq=0")
        assert second.hello["resumed"] is True
        with pytest.raises(ConnectionClosed) as caught:
            await first.recv()
        assert caught.value.rcvd is not None and caught.value.rcvd.code == CloseCode.TAKEN_OVER
        await second.close()
        # Closed with 1000: nothing kept for resume (that would keep it for resume_ttl, 300 s).
        await until(lambda: len(running.service.hub.sessions) == 0, "the cleanly closed session to end")


async def test_the_handshake_response_names_the_session_for_a_load_balancer() -> None:
    """X-Vlbridge-Session carries the hello's session: new, resumed, or new after a refused
    resume (a load balancer must learn that one too). docker/haproxy.cfg relies on it."""
    with serve(make_config(resume_ttl=30.0)) as running:

        def named(client: Client) -> str | None:
            assert client.conn.response is not None
            return client.conn.response.headers.get(HEADER_SESSION)

        first = await Client.open(running.ws)
        assert named(first) == first.session
        first.conn.transport.abort()
        await until(lambda: running.service.hub.sessions.parked == 1, "the dropped session to be parked")
        resumed = await Client.open(f"{running.ws}?resume={first.session}&last_seq=0")
        assert resumed.hello["resumed"] is True and named(resumed) == first.session
        refused = await Client.open(f"{running.ws}?resume=not-a-session&last_seq=0")
        assert refused.hello["resumed"] is False and named(refused) == refused.session != first.session
        await resumed.close()
        await refused.close()


async def test_auth_refuses_the_handshake_without_a_valid_token() -> None:
    with serve(make_config(auth_tokens=("s3cret", "other"))) as running:
        for url, headers in [
            (running.ws, {}),
            (running.ws + "?token=wrong", {}),
            (running.ws, {"Authorization": "Bearer wrong"}),
        ]:
            with pytest.raises(InvalidStatus) as caught:
                await Client.open(url, additional_headers=headers)
            assert caught.value.response.status_code == 403
            assert b"unauthorized" in caught.value.response.body
        by_header = await Client.open(running.ws, additional_headers={"Authorization": "Bearer s3cret"})
        by_query = await Client.open(running.ws + "?token=other")
        # A session can be resumed only with the token that opened it.
        stolen = await Client.open(f"{running.ws}?token=other&resume={by_header.session}")
        assert stolen.hello["resumed"] is False
        await by_header.close()
        await by_query.close()
        await stolen.close()


async def _read_until_closed(client: Client) -> None:
    while True:
        await client.recv()
