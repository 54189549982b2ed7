"""A real nginx for tests: the deployment's configuration on loopback ports.

`render` turns docker/nginx.conf into a test's configuration by swapping only what is the
deployment's own (listening address, upstream address, user, file paths, one worker) and the
two values a test sets on purpose (the WebSocket idle timeout, the body limit); every other
line a test exercises is the file's. `run_nginx` starts it in the foreground and waits until
it accepts connections.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.config import ServerConfig
from tests.waiting import DEADLINE, stop_process, until_blocking

DEPLOY_CONFIG = Path(__file__).resolve().parents[1] / "docker" / "nginx.conf"

needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None and not os.environ.get("CI"),
    reason="nginx is not installed (.ci/system-packages installs it; in CI its absence fails the test)",
)


def body_limit(server: ServerConfig) -> int:
    """The largest request body the service reads (a chat completion with base64 pictures), as
    docker/nginx.conf explains it: nginx's client_max_body_size for *server*'s settings."""
    return 2 * server.max_images * server.max_image_bytes + (1 << 20)


def render(
    template: str, directory: Path, port: int, upstream: int, ws_read_timeout: str, max_body: int
) -> str:
    """*template* listening on 127.0.0.1:*port* in front of 127.0.0.1:*upstream*, its files in
    *directory*, WebSocket idle timeout *ws_read_timeout*, bodies up to *max_body* bytes."""
    swaps = {
        "user ": f"user {getpass.getuser()};",
        "worker_processes ": "worker_processes 1;",
        "pid ": f"pid {directory / 'nginx.pid'};",
        "error_log ": f"error_log {directory / 'error.log'} info;",
        "access_log ": f"access_log {directory / 'access.log'} vlbridge;",
        "listen ": f"listen 127.0.0.1:{port};",
        "server vlbridge:": f"server 127.0.0.1:{upstream};",
        "client_max_body_size 321m": f"client_max_body_size {max_body};",
    }
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    swapped = dict.fromkeys([*swaps, "ws proxy_read_timeout"], 0)
    out: list[str] = []
    location = ""
    for line in template.splitlines():
        word = line.strip()
        indent = line[: len(line) - len(line.lstrip())]
        if word.startswith("location "):
            location = word
        if word.startswith("proxy_read_timeout ") and location.startswith("location /ws"):
            line, swapped["ws proxy_read_timeout"] = f"{indent}proxy_read_timeout {ws_read_timeout};", 1
        for start, replacement in swaps.items():
            if word.startswith(start) and not swapped[start]:
                line, swapped[start] = indent + replacement, 1
        out.append(line)
        if word == "http {":
            out.append(temp)
    assert all(swapped.values()), f"the template lacks a line to swap: {swapped}"
    return "\n".join(out) + "\n"


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    port: int
    directory: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log(self) -> str:
        return "".join(
            (self.directory / name).read_text(errors="replace")
            for name in ("error.log", "access.log")
            if (self.directory / name).exists()
        )


@contextmanager
def run_nginx(config: str, directory: Path, port: int) -> Iterator[Nginx]:
    """nginx on *config* (written into *directory*) until the block ends."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "nginx.conf"
    path.write_text(config)
    command = ["nginx", "-p", str(directory), "-c", str(path), "-e", str(directory / "error.log")]
    process = subprocess.Popen(
        [*command, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    proxy = Nginx(process, port, directory)
    try:

        def accepting() -> bool:
            assert process.poll() is None, "nginx exited:\n" + proxy.log()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()
            except OSError:
                return False
            return True

        until_blocking(accepting, "nginx to listen", poll=0.05)
        yield proxy
    finally:
        stop_process(process)
