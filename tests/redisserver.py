"""A real Redis server for the tests: Debian's ``redis-server``, on a unix socket in a temp dir.

No TCP port at all (``--port 0``), so nothing can collide with another test run. Started once
per session (`redis_server`); each test gets its own key prefix (`redis_url` + a fresh
``prefix``), so tests never see each other's keys. Without the binary the Redis tests skip on a
developer's machine and fail in CI (``CI`` set): .ci/system-packages installs it there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.waiting import stop_process, until_blocking

REDIS_SERVER = shutil.which("redis-server")
MISSING = "redis-server is not installed (.ci/system-packages installs it; in CI its absence fails the test)"


def needs_redis() -> None:
    """Skip the calling test without a redis-server, except in CI."""
    if REDIS_SERVER is None and not os.environ.get("CI"):
        pytest.skip(MISSING)
    assert REDIS_SERVER is not None, MISSING


def _answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=1.0) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


class RedisServer:
    """One redis-server process on a unix socket in *folder*; `stop()` and `start()` again keep
    its data (append-only file in *folder*), as a restarted production server would."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.url = f"unix://{folder / 'redis.sock'}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        needs_redis()
        assert REDIS_SERVER is not None
        settings = {
            "port": "0",  # no TCP at all: the unix socket only
            "unixsocket": str(self.folder / "redis.sock"),
            "unixsocketperm": "700",
            "dir": str(self.folder),
            "logfile": str(self.folder / "redis.log"),
            "save": "",
            "appendonly": "yes",  # as production should run it (durable acks)
        }
        args = [part for name, value in settings.items() for part in (f"--{name}", value)]
        proc = self.proc = subprocess.Popen([REDIS_SERVER, *args], stdin=subprocess.DEVNULL)
        until_blocking(
            lambda: proc.poll() is not None or _answers(self.url), "redis-server to answer", poll=0.05
        )
        if proc.poll() is not None:
            log = self.folder / "redis.log"
            raise AssertionError(f"redis-server exited: {log.read_text() if log.exists() else '?'}")

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, 10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a running Redis (``unix://...``), stopped at the end of the session."""
    needs_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server.url
    finally:
        server.stop()
