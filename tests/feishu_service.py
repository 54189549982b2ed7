"""`vlbridge serve` as a real process with the demo model and the Feishu long connection up.

Used by the tests that need the whole product: a SIGTERM or a ``kill -9`` of its process
group (the service and its long-connection worker), a restart on the same storage. The
service's log is read on a thread the whole time (a full pipe would block the server and the
worker, which shares it) and kept in `Service.lines`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.fakefeishu import FakeFeishu
from tests.waiting import DEADLINE, until_blocking

_LISTENING = re.compile(r"Uvicorn running on \S+:(\d+)")


def write_config(
    path: Path,
    fake: FakeFeishu,
    demo_model_dir: Path,
    storage: Path,
    *,
    max_new_tokens: int,
    grace: float = 2.0,
    executor: str = "",
    feishu: str = "",
    redis_url: str = "",
) -> Path:
    """A config file for the demo model on the CPU and *fake* as the platform; *executor* and
    *feishu* are extra TOML lines for those sections; with *redis_url* the inbox is on Redis
    (under a key prefix of its own, so several services' tests never share one)."""
    backend = (
        f'backend = "redis"\nredis_url = "{redis_url}"\nredis_prefix = "test-{uuid.uuid4().hex[:12]}"\n'
        if redis_url
        else ""
    )
    path.write_text(
        f"[server]\nport = 0\nshutdown_grace = {grace}\n"
        f'[model]\npath = "{demo_model_dir}"\ndevice = "cpu"\nmax_new_tokens = {max_new_tokens}\n'
        f"[executor]\n{executor}\n"
        f'[feishu]\nenabled = true\napp_id = "{fake.app_id}"\ndomain = "{fake.url}"\n'
        f"watchdog_interval = 10.0\nstream_interval = 0.05\n{feishu}\n"
        f'[storage]\npath = "{storage}"\n{backend}'
    )
    return path


@dataclass
class Service:
    process: subprocess.Popen[str]
    port: int = 0
    lines: list[str] = field(default_factory=list)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=DEADLINE).json()  # type: ignore[no-any-return]

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=DEADLINE).text

    def logged(self, text: str) -> bool:
        """Whether a line of its log so far contains *text*."""
        return any(text in line for line in list(self.lines))

    def kill_group(self) -> None:
        """``kill -9`` the service and its long-connection worker at once."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(DEADLINE)

    def peak_rss(self) -> int:
        """The service process's peak resident memory so far, in bytes (Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")


def env_for(fake: FakeFeishu) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.getcwd(), "VLBRIDGE_FEISHU_APP_SECRET": fake.app_secret}


@contextmanager
def launched(config: Path, env: dict[str, str], python_flags: Sequence[str] = ()) -> Iterator[Service]:
    """`vlbridge serve --config config` in its own process group until the block ends (then the
    group is killed if still running), once it listens; its log goes on into `Service.lines`."""
    process = subprocess.Popen(
        [sys.executable, *python_flags, "-m", "server.cli", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    service = Service(process)
    try:
        assert process.stderr is not None
        for line in process.stderr:
            service.lines.append(line)
            if match := _LISTENING.search(line):
                service.port = int(match.group(1))
                break
        assert service.port, "the server did not start:\n" + "".join(service.lines[-30:])
        threading.Thread(target=service.lines.extend, args=(process.stderr,), daemon=True).start()
        yield service
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def serving(fake: FakeFeishu, config: Path, *, connections: int = 1) -> Iterator[Service]:
    """`launched` with *fake* as its platform; waits for its long connection (*connections*: how
    many open ones the fake must see, counting any other service's)."""
    with launched(config, env_for(fake)) as service:
        until_blocking(  # the worker imports the SDK: 4 s of CPU, far longer on a busy machine
            lambda: len(fake.records.open_connections()) >= connections,
            "the bot's long connection",
            4 * DEADLINE,
        )
        yield service
    assert not any(fake.app_secret in line for line in service.lines), "the secret must never be logged"
