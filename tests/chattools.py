"""Helpers for the chat client tests: the `vlbridge chat` command as a subprocess, a loopback
TCP proxy that can cut every connection through it, and a pseudo-terminal session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.waiting import DEADLINE

ROOT = Path(__file__).resolve().parent.parent


def chat_command(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "chat", "--url", url, *args]


def chat_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VLBRIDGE_TOKEN"}
    pythonpath = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{pythonpath}" if pythonpath else str(ROOT)
    env["NO_COLOR"] = "1"
    return env


def run_chat(
    url: str, *args: str, stdin: bytes = b"", timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        chat_command(url, *args), input=stdin, capture_output=True, cwd=ROOT, env=chat_env(), timeout=timeout
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


class TcpProxy:
    """Forwards 127.0.0.1:<port> to *target*; `drop()` cuts every live connection at once."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.accepted = 0
        self._refuse_until = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def drop(self, refuse_for: float = 0.0) -> None:
        """Reset every connection; refuse new ones (accept and reset) for *refuse_for* seconds."""
        self._refuse_until = time.monotonic() + refuse_for
        self._call(self._cut())

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()

    async def _cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._refuse_until:
            writer.transport.abort()
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError, ConnectionError, RuntimeError):
            writer.close()
        self._writers.discard(writer)


class Terminal:
    """A command on a pseudo-terminal: stdin, stdout and stderr are all the same tty."""

    def __init__(self, command: list[str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=chat_env(), start_new_session=True
        )
        os.close(slave)
        self.screen = ""

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def expect(self, text: str, timeout: float = DEADLINE) -> str:
        """Read until *text* has appeared (after what earlier expects consumed); return all read."""
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and not self._ready(0)):
                raise AssertionError(f"{text!r} never appeared; the terminal shows:\n{self.screen}")
            if self._ready(min(left, 0.2)):
                try:
                    self.screen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    self.proc.wait(5)
        return self.screen

    def _ready(self, timeout: float) -> bool:
        return bool(select.select([self.master], [], [], timeout)[0])

    def close(self) -> int:
        try:
            return self.proc.wait(10)
        finally:
            if self.master >= 0:
                os.close(self.master)
                self.master = -1


@contextlib.contextmanager
def terminal(command: list[str]) -> Iterator[Terminal]:
    term = Terminal(command)
    try:
        yield term
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        term.close()
