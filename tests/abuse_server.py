"""A vlbridge server in its own process, so a test can watch its memory (RSS) alone.

``python -m tests.abuse_server`` serves the app (echo model, small picture limits) plus the
Feishu webhook route on a free loopback port, prints ``PORT <n>`` and runs until its stdin
closes. `subprocess_server()` starts it and yields a `Remote`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.feishu.webhook import Webhook
from server.platform import HttpRoute
from tests.serving import make_config, serve

ROOT = Path(__file__).resolve().parent.parent
ENCRYPT_KEY = "abuse-encrypt-key"
LIMITS = {"max_image_bytes": 1 << 20, "max_images": 2}  # bodies: analyze 3 MB, completions 5 MB


class WebhookOnly:
    """The webhook route as a platform adapter, without the rest of the Feishu adapter."""

    name = "webhook"

    def __init__(self) -> None:
        self.webhook = Webhook(encrypt_key=ENCRYPT_KEY, verification_token="token", persist=_drop)

    def routes(self) -> list[HttpRoute]:
        return list(self.webhook.routes())

    async def start(self) -> None:
        return None

    async def drain(self, deadline: float) -> None:
        return None

    async def stop(self) -> None:
        self.webhook.close()

    def health(self) -> dict[str, Any]:
        return self.webhook.health()

    def healthy(self) -> bool:
        return True


async def _drop(bodies: list[dict[str, Any]]) -> None:
    return None


@dataclass
class Remote:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def subprocess_server() -> Iterator[Remote]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.abuse_server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # "" when the server failed to start
        assert line.startswith("PORT "), f"the server did not start: {line!r}"
        yield Remote(proc, int(line.split()[1]))
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    with serve(make_config(**LIMITS), platforms=[WebhookOnly()]) as running:
        print("PORT", running.port, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
