"""Graceful shutdown: stop accepting, close sessions with 1012, finish or cancel answers, in time."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from protocol.v1 import CloseCode
from tests.serving import make_config, serve, slow_echo
from tests.waiting import DEADLINE
from tests.wsclient import Client


async def closed_code(client: Client) -> tuple[int, list[dict]]:
    frames: list[dict] = []
    with pytest.raises(ConnectionClosed) as caught:
        await _collect_until_closed(client, frames)
    assert caught.value.rcvd is not None
    return caught.value.rcvd.code, frames


async def _collect_until_closed(client: Client, frames: list[dict]) -> None:
    while True:
        frames.append(await client.recv())


async def test_running_answers_finish_within_the_grace_idle_sessions_close_at_once() -> None:
    with serve(make_config(shutdown_grace=5.0), executor=slow_echo(0.01)) as running:
        idle = await Client.open(running.ws)
        busy = await Client.open(running.ws)
        await busy.ask("q", "an answer of about half a second " * 2)
        await busy.recv()  # queued
        stopping = asyncio.create_task(asyncio.to_thread(running.stop))
        idle_code, _ = await closed_code(idle)
        assert idle_code == CloseCode.RESTART
        busy_code, frames = await closed_code(busy)
        assert busy_code == CloseCode.RESTART and frames[-1]["type"] == "done"
        with pytest.raises(OSError):  # no longer accepting
            await Client.open(running.ws)
        assert await stopping < 5.0


async def test_answers_past_the_grace_are_cancelled_with_unavailable() -> None:
    with serve(make_config(shutdown_grace=0.3), executor=slow_echo(0.05)) as running:
        client = await Client.open(running.ws)
        await client.ask("long", "this answer takes several seconds to echo " * 2)
        await client.recv()
        stopping = asyncio.create_task(asyncio.to_thread(running.stop))
        code, frames = await closed_code(client)
        assert code == CloseCode.RESTART
        error = frames[-1]
        assert error["type"] == "error" and error["code"] == "unavailable" and error["retry_after"] > 0
        assert await stopping < 3.0


async def test_an_sse_stream_is_let_finish() -> None:
    with serve(make_config(shutdown_grace=5.0), executor=slow_echo(0.01)) as running:
        async with httpx.AsyncClient() as http:
            request = http.build_request(
                "POST",
                running.http + "/v1/analyze",
                files={"x": ("x", b"x")},
                data={"prompt": "let me finish " * 4},
            )
            response = await http.send(request, stream=True)
            assert response.status_code == 200
            stopping = asyncio.create_task(asyncio.to_thread(running.stop))
            body = (await response.aread()).decode()
            assert "event: done" in body
            assert await stopping < 5.0


def test_sigterm_stops_the_cli_server_cleanly(tmp_path) -> None:
    config = tmp_path / "vlbridge.toml"
    config.write_text('[server]\nport = 0\nshutdown_grace = 10.0\n[model]\npath = "builtin:echo"\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        port = None
        assert process.stderr is not None
        for line in process.stderr:
            if "Uvicorn running on" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
                break
        assert port, "the server did not start"

        async def run() -> int:
            client = await Client.open(f"ws://127.0.0.1:{port}/ws")
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code, _ = await closed_code(client)
            assert time.monotonic() - started < 5.0  # at once: not after the 10 s grace
            return code

        assert asyncio.run(run()) == CloseCode.RESTART
        assert process.wait(DEADLINE) in (0, -signal.SIGTERM)
    finally:
        process.kill()
        process.wait()
