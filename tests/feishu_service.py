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
    redis_prefix: str = "",
    storage_extra: str = "",
    model: str = "",
) -> Path:
    """A config file for the demo model on the CPU and *fake* as the platform; *executor*,
    *feishu* and *storage_extra* are extra TOML lines for those sections; *model* another
    ``model.path`` (e.g. ``builtin:echo``); with *redis_url* the inbox is on Redis, under a key
    prefix of its own (so several services' tests never share one) unless *redis_prefix* names
    one (several services of one test sharing one inbox)."""
    prefix = redis_prefix or f"test-{uuid.uuid4().hex[:12]}"
    backend = ""
    if redis_url:
        backend = f'backend = "redis"\nredis_url = "{redis_url}"\nredis_prefix = "{prefix}"\n'
    path.write_text(
        f"[server]\nport = 0\nshutdown_grace = {grace}\n"
        f'[model]\npath = "{model or demo_model_dir}"\ndevice = "cpu"\nmax_new_tokens = {max_new_tokens}\n'
        f"[executor]\n{executor}\n"
        f'[feishu]\nenabled = true\napp_id = "{fake.app_id}"\ndomain = "{fake.url}"\n'
        f"watchdog_interval = 10.0\nstream_interval = 0.05\n{feishu}\n"
        f'[storage]\npath = "{storage}"\n{backend}{storage_extra}\n'
    )
    return path


@dataclass
class Service:
    process: subprocess.Popen[str]
    port: int = 0
    lines: list[str] = field(default_factory=list)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=DEADLINE).json()

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


def _start(config: Path, env: dict[str, str], python_flags: Sequence[str]) -> Service:
    return Service(
        subprocess.Popen(
            [sys.executable, *python_flags, "-m", "server.cli", "serve", "--config", str(config)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
    )


def _until_listening(service: Service) -> None:
    """Read the log until the port is known; from then on a thread reads it into `lines`."""
    stderr = service.process.stderr
    assert stderr is not None
    for line in stderr:
        service.lines.append(line)
        if match := _LISTENING.search(line):
            service.port = int(match.group(1))
            break
    assert service.port, "the server did not start:\n" + "".join(service.lines[-30:])
    threading.Thread(target=service.lines.extend, args=(stderr,), daemon=True).start()


@contextmanager
def launched(config: Path, env: dict[str, str], python_flags: Sequence[str] = ()) -> Iterator[Service]:
    """`vlbridge serve --config config` in its own process group until the block ends (then the
    group is killed if still running), once it listens; its log goes on into `Service.lines`."""
    with launched_together([config], env, python_flags) as [service]:
        yield service


@contextmanager
def launched_together(
    configs: Sequence[Path], env: dict[str, str], python_flags: Sequence[str] = ()
) -> Iterator[list[Service]]:
    """`launched` for several services at once (all started before the first is waited for, so
    that their slow imports overlap), in the order of *configs*."""
    services: list[Service] = []
    try:
        for config in configs:
            services.append(_start(config, env, python_flags))
        for service in services:
            _until_listening(service)
        yield services
    finally:
        for service in services:
            if service.process.poll() is None:
                os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait()


@contextmanager
def serving(fake: FakeFeishu, config: Path, *, connections: int = 1) -> Iterator[Service]:
    """`launched` with *fake* as its platform; waits for its long connection (*connections*: how
    many open ones the fake must see, counting any other service's)."""
    with serving_together(fake, [config], connections=connections) as [service]:
        yield service


@contextmanager
def serving_together(
    fake: FakeFeishu, configs: Sequence[Path], *, connections: int | None = None
) -> Iterator[list[Service]]:
    """`serving` for several services of *fake*'s app, started at once; waits for *connections*
    open long connections (by default one per service)."""
    wanted = len(configs) if connections is None else connections
    with launched_together(configs, env_for(fake)) as services:
        until_blocking(  # the worker imports the SDK: 4 s of CPU, far longer on a busy machine
            lambda: len(fake.records.open_connections()) >= wanted,
            "the bots' long connections",
            4 * DEADLINE,
        )
        yield services
    for service in services:
        assert not any(fake.app_secret in line for line in service.lines), "the secret must never be logged"
