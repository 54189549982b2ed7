"""`vlbridge chat` against a real server: one-shot, interactive, auth, reconnect and resume.

The command runs as a subprocess (the real CLI, its real exit status) against uvicorn on a
free loopback port with the echo engine, which answers "echo: <question> [<w>x<h>]".
"""

from __future__ import annotations

import asyncio
import io
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from websockets.sync.client import connect

from client.connection import Connection, Disconnected
from client.screen import Screen
from client.terminal import Chat, ScriptedInputs
from tests.chattools import ROOT, TcpProxy, chat_command, chat_env, run_chat, terminal
from tests.conftest import make_png
from tests.serving import Running, make_config, serve, slow_echo
from tests.waiting import DEADLINE, until


@pytest.fixture(scope="module")
def echo() -> Iterator[Running]:
    with serve(make_config(auth_tokens=("sesame",))) as running:
        yield running


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    path.write_bytes(make_png(96, 64))
    return path


def test_one_shot_prints_the_answer_and_the_timings(echo: Running, picture: Path) -> None:
    result = run_chat(echo.ws, "--token", "sesame", "--image", str(picture), "what", "is", "it?")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "echo: what is it? [96x64]\n"  # stdout holds the answer alone
    assert "queued" in result.stderr
    # while the picture is prepared, the user reads that, not "queued, position 1"
    assert "reading the picture" in result.stderr
    assert result.stderr.index("queued") < result.stderr.index("reading the picture")
    assert "TTFT" in result.stderr and "tokens/s" in result.stderr
    assert "cut at" not in result.stderr
    plain = run_chat(echo.ws, "--token", "sesame", "no picture here")
    assert plain.returncode == 0 and "reading the picture" not in plain.stderr


def test_max_tokens_limits_the_answer(echo: Running) -> None:
    # the echo engine answers one character per token: "echo: a short answer" cut after 5
    result = run_chat(echo.ws, "--token", "sesame", "--max-tokens", "5", "a short answer")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "echo:\n"
    assert "5 tokens" in result.stderr and "cut at the length limit" in result.stderr
    for bad in ("0", "-3", "many", "2.5"):
        refused = run_chat(echo.ws, "--token", "sesame", "--max-tokens", bad, "hi")
        assert refused.returncode == 2, (bad, refused.stderr)
        assert f"--max-tokens: expected a positive whole number, got {bad!r}" in refused.stderr


def test_picture_from_stdin_and_the_token_from_the_environment(echo: Running) -> None:
    result = subprocess.run(
        chat_command(echo.ws, "--image", "-", "and this?"),
        input=make_png(40, 50),
        capture_output=True,
        cwd=ROOT,
        env={**chat_env(), "VLBRIDGE_TOKEN": "sesame"},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "echo: and this? [40x50]\n"
    alone = run_chat(echo.ws, "--token", "sesame", "--image", "-", "", stdin=make_png(40, 50))
    assert (alone.returncode, alone.stdout) == (0, "echo:  [40x50]\n")  # a picture alone is a question


def test_clear_failures_and_exit_status(echo: Running, picture: Path, tmp_path: Path) -> None:
    wrong = run_chat(echo.ws, "--token", "nope", "hi")
    assert (wrong.returncode, wrong.stdout) == (3, "")
    assert "refused the token (HTTP 403)" in wrong.stderr
    (tmp_path / "notes.txt").write_text("not a picture")
    bad = run_chat(echo.ws, "--token", "sesame", "--image", str(tmp_path / "notes.txt"), "hi")
    assert bad.returncode == 2 and "notes.txt: not a picture" in bad.stderr
    nobody = run_chat(f"ws://127.0.0.1:{_free_port()}/ws", "hi")
    assert nobody.returncode == 3 and "connection refused" in nobody.stderr
    empty = run_chat(echo.ws, "--token", "sesame", " ")
    assert empty.returncode == 2 and "empty question" in empty.stderr
    many = [arg for _ in range(9) for arg in ("--image", str(picture))]
    refused = run_chat(echo.ws, "--token", "sesame", *many, "nine pictures?")  # the server allows 8
    assert refused.returncode == 1, refused.stderr
    assert refused.stdout == "" and "✗ " in refused.stderr


def test_interactive_on_a_terminal(echo: Running, picture: Path) -> None:
    with terminal(chat_command(echo.ws, "--token", "sesame")) as term:
        term.expect("/quit")
        term.expect("> ")
        term.type(f"/image {picture}")
        term.expect("attached red.png (96x64 PNG")
        term.type("what is it?")
        term.expect("echo: what is it? [96x64]")
        term.expect("TTFT")
        term.type("and now?")
        term.expect("echo: and now? [96x64]")  # the earlier turn, picture included, is context
        term.type("/history")
        term.expect("2. you: and now?")
        term.type("/reset")
        term.expect("conversation reset")
        term.type("again")
        term.expect("echo: again\r\n")  # forgotten
        term.type("/nonsense")
        term.expect("unknown command /nonsense")
        term.type("/quit")
        assert term.close() == 0
    assert "1. you: what is it? [red.png]" in term.screen


def test_interactive_from_a_pipe_answers_every_line(echo: Running) -> None:
    result = run_chat(echo.ws, "--token", "sesame", stdin=b"first\n/cancel\nsecond\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "echo: first\necho: second\n"
    assert "nothing to cancel" in result.stderr


@pytest.fixture(scope="module")
def slow() -> Iterator[Running]:
    with serve(make_config(), slow_echo(step_delay=0.02)) as running:
        yield running


QUESTION = "please describe every detail of this picture, slowly and completely"
ANSWER = f"echo: {QUESTION} [96x64]\n"


@pytest.mark.parametrize("away", [0.0, 1.0], ids=["drop", "answer-finishes-while-away"])
def test_reconnect_in_the_middle_of_an_answer_resumes_it(slow: Running, picture: Path, away: float) -> None:
    with TcpProxy(slow.port) as proxy:
        proc = subprocess.Popen(
            chat_command(f"ws://127.0.0.1:{proxy.port}/ws", "--image", str(picture), QUESTION),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=chat_env(),
        )
        assert proc.stdout is not None and proc.stderr is not None
        before = _read_at_least(proc.stdout.fileno(), 40, timeout=15)
        proxy.drop(refuse_for=away)  # mid-answer: ~40 more characters (0.8 s) to come
        out, err = proc.communicate(timeout=30)
    stdout = (before + out).decode()
    stderr = err.decode()
    assert proc.returncode == 0, stderr
    assert stdout == ANSWER  # nothing lost, nothing repeated
    assert len(before) < len(ANSWER) - 20, "the drop came too late to be in the middle"
    assert "connection lost" in stderr
    assert "session" in stderr and "resumed; the answer continues" in stderr
    assert "resumed after 1 reconnect" in stderr
    if away:
        assert proxy.accepted >= 2 and "attempt 2" in stderr  # backoff through refused attempts


def test_cancel_with_ctrl_c(slow: Running) -> None:
    proc = subprocess.Popen(
        chat_command(slow.ws, QUESTION),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=chat_env(),
    )
    assert proc.stdout is not None
    _read_at_least(proc.stdout.fileno(), 3, timeout=15)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130
    assert "cancelled" in err.decode()


def test_cancel_while_streaming_in_interactive_mode(slow: Running) -> None:
    with terminal(chat_command(slow.ws)) as term:
        term.expect("> ")
        term.type(QUESTION)
        term.expect("echo: please")
        term.type("/cancel")
        term.expect("cancelled")
        term.type("short")
        term.expect("echo: short")
        term.type("/quit")
        assert term.close() == 0
    assert "echo: please describe every detail of this picture, slowly and completely" not in term.screen


def _read_at_least(fd: int, count: int, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < count:
        assert time.monotonic() < deadline, f"only {data!r} arrived"
        if select.select([fd], [], [], 0.05)[0]:
            chunk = os.read(fd, count - len(data))
            assert chunk, f"the output ended after {data!r}"
            data += chunk
    return data


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_server_that_forgot_the_session_fails_the_answer_clearly(slow: Running, echo: Running) -> None:
    """The server behind the proxy is replaced mid-answer (as by a restart): no resume."""
    with TcpProxy(slow.port) as proxy:
        command = chat_command(f"ws://127.0.0.1:{proxy.port}/ws", "--token", "sesame", QUESTION)
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=chat_env()
        )
        assert proc.stdout is not None
        _read_at_least(proc.stdout.fileno(), 10, timeout=DEADLINE)
        proxy.target = echo.port
        proxy.drop()
        _, err = proc.communicate(timeout=30)
    stderr = err.decode()
    assert proc.returncode == 1, stderr
    assert "no longer knew session" in stderr
    assert "session_lost" in stderr
    # the truth: a new session, the answer lost and what to do; nothing "continues"
    assert "reconnected, but to a new session" in stderr
    assert "continues" not in stderr
    assert "the answer was lost with the session" in stderr and "ask again" in stderr


def test_one_shot_with_the_tiny_real_model(demo_model_dir: Path, picture: Path) -> None:
    with serve(make_config(model_path=str(demo_model_dir))) as running:
        result = run_chat(running.ws, "--image", str(picture), "what is it?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # random words, but words
    assert "tokens/s" in result.stderr


def test_a_full_server_is_a_clear_failure() -> None:
    from websockets.sync.client import connect

    with serve(make_config(max_sessions=1)) as running, connect(running.ws) as holder:
        holder.recv()  # its hello: the only session there is
        result = run_chat(running.ws, "hi")
    assert result.returncode == 3
    assert "cannot connect" in result.stderr and "1013" in result.stderr


async def test_a_question_the_new_session_never_got_is_asked_again() -> None:
    """The other side of a lost session: the question was sent but not yet acknowledged when
    the link dropped, so the new session gets it again; the client says so, not "continues".
    The real Connection, fed the server's frames by hand (no socket): the timing of a drop
    between sending and "queued" cannot be arranged over a real one."""
    conn = Connection("ws://127.0.0.1:9/ws")
    err = io.StringIO()

    def serve_frames(*frames: dict[str, object]) -> None:
        for frame in frames:
            for event in conn.core.receive(orjson.dumps(frame)):
                conn._events.put_nowait(event)

    conn.core.connecting()
    conn.hellos = 1
    serve_frames({"type": "hello", "seq": 0, "session": "first", "protocol": 1, "ping_interval": 45.0})
    chat = Chat(conn, Screen(io.StringIO(), err, tty=False), ScriptedInputs(["what is it?"]), False)
    running = asyncio.create_task(chat.run())
    await until(lambda: conn.core.take_outgoing(), "the ask to be sent")
    conn.core.disconnected()  # before the server acknowledged it
    conn._events.put_nowait(Disconnected("the connection dropped", 1, 0.1))
    conn.core.connecting()
    conn.hellos = 2
    serve_frames({"type": "hello", "seq": 0, "session": "second", "protocol": 1, "ping_interval": 45.0})
    [ask] = conn.core.take_outgoing()  # asked again in the new session
    assert ask["type"] == "ask" and ask["text"] == "what is it?"
    serve_frames(
        {"type": "queued", "id": ask["id"], "position": 1, "seq": 1},
        {"type": "done", "id": ask["id"], "text": "a cat", "usage": {}, "seq": 2},
    )
    assert await asyncio.wait_for(running, DEADLINE) == 0
    status = err.getvalue()
    assert "reconnected, but to a new session second" in status
    assert "it is asked again" in status and "continues" not in status


def test_what_the_hello_says_of_a_model_that_cannot_answer_yet(echo: Running) -> None:
    """`vlbridge chat` says so at once when the model is loading or failed (the hello's
    `model_state`); a ready model, or an older server that does not say, adds nothing."""
    from client.command import model_status

    with connect(f"{echo.ws}?token=sesame", open_timeout=DEADLINE) as ws:
        hello = orjson.loads(ws.recv(timeout=DEADLINE))
    assert hello["model_state"] == "ready" and "model_detail" not in hello
    assert model_status(hello) is None and model_status({"model": "old"}) is None
    loading = {
        "model_state": "loading",
        "model_progress": 0.31,
        "model_detail": "downloading Q/X: 2 MB of 5 MB",
    }
    assert model_status(loading) == (
        "the model is still loading (31%): downloading Q/X: 2 MB of 5 MB; questions wait for it"
    )
    failed = {"model_state": "failed", "model_progress": 0.0, "model_detail": "CUDA out of memory"}
    assert model_status(failed) == "the model failed to load: CUDA out of memory; questions will be refused"
