"""A real HAProxy for tests: the deployment's configuration on loopback ports, its runtime API.

`render` turns docker/haproxy.cfg into a test's configuration by swapping only what is the
deployment's own (the listening address, the stats socket path, the server lines and their
agent ports); every option a test exercises is the file's. `run_haproxy` starts it in the foreground (its
log, which the configuration sends to stdout, goes to a file next to the configuration) and
waits until its runtime API answers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.waiting import DEADLINE, stop_process, until_blocking

DEPLOY_CONFIG = Path(__file__).resolve().parents[1] / "docker" / "haproxy.cfg"

needs_haproxy = pytest.mark.skipif(
    shutil.which("haproxy") is None and not os.environ.get("CI"),
    reason="haproxy is not installed (.ci/system-packages installs it; in CI its absence fails the test)",
)


def free_port() -> int:
    """A loopback port free right now (for HAProxy, which cannot report a port 0 it bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render(
    template: str,
    front_port: int,
    server_ports: Sequence[int],
    stats_socket: Path,
    agent_ports: Sequence[int] | None = None,
) -> str:
    """*template* (the deployment's configuration) listening on 127.0.0.1:*front_port*, with
    its runtime API on *stats_socket* and one server per port, named vlbridge1, vlbridge2, ...;
    each asks its agent on the matching port of *agent_ports* (none: no agent check)."""
    assert agent_ports is None or len(agent_ports) == len(server_ports)
    out: list[str] = []
    swapped = {"bind": 0, "stats socket": 0, "server": 0}
    for line in template.splitlines():
        word = line.strip()
        if word.startswith("bind "):
            line, swapped["bind"] = f"    bind 127.0.0.1:{front_port}", swapped["bind"] + 1
        elif word.startswith("stats socket "):
            line = f"    stats socket {stats_socket} mode 600 level admin"
            swapped["stats socket"] += 1
        elif word.startswith("server "):
            swapped["server"] += 1
            if swapped["server"] > 1:
                continue
            agents = [f"agent-port {port}" for port in agent_ports] if agent_ports else None
            line = "\n".join(
                f"    server vlbridge{n} 127.0.0.1:{port} {agents[n - 1] if agents else 'no-agent-check'}"
                for n, port in enumerate(server_ports, 1)
            )
        out.append(line)
    assert all(swapped.values()), f"the template lacks a line to swap: {swapped}"
    return "\n".join(out) + "\n"


@dataclass
class HAProxy:
    process: subprocess.Popen[bytes]
    port: int
    stats_socket: Path
    log: Path

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def command(self, line: str) -> str:
        """One runtime API command's answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(DEADLINE)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.decode()

    def servers(self, backend: str = "vlbridge") -> dict[str, dict[str, str]]:
        """``show stat`` rows of *backend*'s servers, by server name."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = (dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line)
        return {
            row["svname"]: row
            for row in rows
            if row.get("pxname") == backend and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def table(self, name: str = "vlbridge") -> dict[str, int]:
        """Stick table *name*: key -> server id (vlbridgeN has id N)."""
        entries: dict[str, int] = {}
        for line in self.command(f"show table {name}").splitlines():
            fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
            if "key" in fields and "server_id" in fields:
                entries[fields["key"]] = int(fields["server_id"])
        return entries


@contextmanager
def run_haproxy(config: str, directory: Path, port: int, stats_socket: Path) -> Iterator[HAProxy]:
    """HAProxy on *config* (written into *directory*) until the block ends."""
    path, log = directory / "haproxy.cfg", directory / "haproxy.log"
    path.write_text(config)
    with log.open("wb") as sink:
        process = subprocess.Popen(["haproxy", "-f", str(path), "-db"], stdout=sink, stderr=subprocess.STDOUT)
    proxy = HAProxy(process, port, stats_socket, log)
    try:

        def answering() -> bool:
            assert process.poll() is None, "haproxy exited:\n" + log.read_text()
            try:
                return bool(proxy.command("show info"))
            except OSError:
                return False

        until_blocking(answering, "haproxy's runtime API", poll=0.05)
        yield proxy
    finally:
        stop_process(process)


def wait_up(proxy: HAProxy, names: Sequence[str]) -> None:
    """Until HAProxy's health checks see every server in *names* up."""
    until_blocking(
        lambda: all(proxy.servers()[name]["status"] == "UP" for name in names),
        f"haproxy to see {', '.join(names)} up",
        poll=0.05,
    )
