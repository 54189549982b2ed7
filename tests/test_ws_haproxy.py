"""WebSocket sessions across instances: two `vlbridge serve` processes behind a real HAProxy
running docker/haproxy.cfg.

A session lives in the instance that opened it; HAProxy learns the owner from the handshake
response (X-Vlbridge-Session) and routes `?resume=` there. Ownership is read from each
instance's own log ("session <tag>: ask ...", "... resumed after seq N"); HAProxy's table
is checked against it.
"""

from __future__ import annotations

import asyncio
from contextlib import ExitStack
from pathlib import Path

from server.logs import short_id
from tests.feishu_service import Service
from tests.haproxy import DEPLOY_CONFIG, HAProxy, free_port, needs_haproxy, render, run_haproxy, wait_up
from tests.openai_upstreams import echo_config, spawned_together
from tests.waiting import until
from tests.wsclient import Client

pytestmark = needs_haproxy

# The echo engine answers with the question, one token per character, as fast as the real
# executor streams it: a 20,000-character question is a long answer (tens of delta frames,
# a good part of a second) that costs no model, so both instances start in about a second.
QUESTION = "tell me a long story. " * 910


async def owner(instances: dict[str, Service], session: str) -> str:
    """The name of the instance whose log shows *session* taking a question."""
    said = f"session {short_id(session)}: ask"
    found = await until(
        lambda: [name for name, instance in instances.items() if instance.logged(said)],
        f"an instance to log {said!r}",
    )
    assert len(found) == 1, found
    return found[0]


async def until_mid_answer(client: Client, ask_id: str) -> int:
    """Read *client* until a delta of *ask_id*; the last seq read (the answer is not done)."""
    while (frame := await client.recv())["type"] != "delta":
        assert frame["type"] in ("queued", "started") and frame["id"] == ask_id, frame
    return int(frame["seq"])


async def resume(proxy: HAProxy, client: Client, last_seq: int) -> Client:
    return await Client.open(f"{proxy.ws}?resume={client.session}&last_seq={last_seq}")


async def test_a_resume_reaches_its_owner_and_one_whose_owner_died_gets_a_new_session(
    tmp_path: Path,
) -> None:
    with ExitStack() as stack:
        names = ("vlbridge1", "vlbridge2")
        configs = [echo_config(tmp_path / name) for name in names]
        instances = dict(zip(names, stack.enter_context(spawned_together(configs)), strict=True))
        socket_path = tmp_path / "haproxy.sock"
        port = free_port()
        config = render(DEPLOY_CONFIG.read_text(), port, [s.port for s in instances.values()], socket_path)
        proxy = stack.enter_context(run_haproxy(config, tmp_path, port, socket_path))
        await asyncio.to_thread(wait_up, proxy, list(instances))

        # New sessions are balanced (leastconn): open them until each instance owns one.
        owned: dict[str, Client] = {}
        opened: list[Client] = []
        while len(owned) < len(instances):
            assert len(opened) < 8, f"8 new sessions and only {sorted(owned)} got one"
            client = await Client.open(proxy.ws)
            opened.append(client)
            await client.ask("long", QUESTION)
            owned.setdefault(await owner(instances, client.session), client)
        table = await asyncio.to_thread(proxy.table)
        for name, client in owned.items():  # learnt from the handshake response
            assert table.get(client.session) == int(name.removeprefix("vlbridge")), table

        # Each connection breaks mid-answer (no close frame: a lost network).
        seen = {}
        for name, client in owned.items():
            seen[name] = await until_mid_answer(client, "long")
            client.conn.transport.abort()

        # Each resumes through HAProxy with its owner in "drain" (no new sessions there): only
        # the stick table can bring the resume back to it; balancing would pick the other.
        resumed: dict[str, Client] = {}
        for name, client in owned.items():
            await asyncio.to_thread(proxy.command, f"set server vlbridge/{name} state drain")
            again = resumed[name] = await resume(proxy, client, seen[name])
            await asyncio.to_thread(proxy.command, f"set server vlbridge/{name} state ready")
            assert again.hello["resumed"] is True and again.hello["session"] == client.session, again.hello
            assert again.hello["lost"] == 0
            rest = await again.until_end("long")
            frames = client.frames + again.frames
            seqs = [frame["seq"] for frame in frames]
            assert seqs == list(range(1, len(seqs) + 1))  # contiguous: no gap, nothing twice
            deltas = "".join(frame["text"] for frame in frames if frame["type"] == "delta")
            assert rest[-1]["type"] == "done" and rest[-1]["text"] == deltas
            said = f"session {short_id(client.session)}: resumed after seq {seen[name]}"
            # The logs are read by a thread per instance: wait for the line, then say whose it is.
            loggers = await until(
                lambda said=said: [n for n, instance in instances.items() if instance.logged(said)],
                f"an instance to log {said!r}",
            )
            assert loggers == [name]

        # An owner dies (kill -9) under a connected session: its resume reaches the other
        # instance, which says plainly that it does not know the session and opens a new one.
        victim, survivor = owned
        await asyncio.to_thread(instances[victim].kill_group)
        dead = resumed[victim]
        lost = await resume(proxy, dead, dead.frames[-1]["seq"])
        assert lost.hello["resumed"] is False, lost.hello
        assert lost.hello["resume_error"] == "unknown or expired session"
        assert lost.session != dead.session
        refused = f"resume of {short_id(dead.session)} refused"
        await until(lambda: instances[survivor].logged(refused), f"the survivor to log {refused!r}")
        await lost.ask("again", "hello again", max_tokens=4)
        assert (await lost.until_end("again"))[-1]["type"] == "done"
        assert (await asyncio.to_thread(proxy.table)).get(lost.session) == int(
            survivor.removeprefix("vlbridge")
        )

        # The survivor's own session is untouched: it still resumes there.
        kept = resumed[survivor]
        kept.conn.transport.abort()
        back = await resume(proxy, kept, kept.frames[-1]["seq"])
        assert back.hello["resumed"] is True and back.hello["lost"] == 0
        for client in (*opened, lost, back):
            await client.close()
