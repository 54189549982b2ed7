"""The whole product in one process, as `vlbridge serve` runs it: demo model + Feishu adapter.

The unmodified lark-oapi SDK in the service talks to the fake Feishu platform. Checked: /health
reports the platform connection; a picture sent in a private chat comes back as one closed
streaming card carrying the model's answer, counted on /metrics like every other route's; and a
SIGTERM while a card streams lets that answer finish before the process exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_png
from tests.fakefeishu import FakeFeishu
from tests.waiting import DEADLINE, until_blocking


@contextmanager
def serving(
    fake_feishu: FakeFeishu, demo_model_dir: Path, tmp_path: Path, *, max_new_tokens: int, grace: float
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`vlbridge serve` with the demo model and the long connection up: (process, port). On
    exit, the process is gone and none of its output held the app secret."""
    config = tmp_path / "vlbridge.toml"
    config.write_text(
        f"[server]\nport = 0\nshutdown_grace = {grace}\n"
        f'[model]\npath = "{demo_model_dir}"\ndevice = "cpu"\nmax_new_tokens = {max_new_tokens}\n'
        f'[feishu]\nenabled = true\napp_id = "{fake_feishu.app_id}"\ndomain = "{fake_feishu.url}"\n'
        "watchdog_interval = 10.0\nstream_interval = 0.05\n"
        f'[storage]\npath = "{tmp_path / "data"}"\n'
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "VLBRIDGE_FEISHU_APP_SECRET": fake_feishu.app_secret}
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        assert process.stderr is not None
        port = None
        for line in process.stderr:
            lines.append(line)
            if "Uvicorn running on" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
                break
        assert port, "the server did not start"
        # Keep reading its log: a full pipe would block the server (and the worker, which shares it).
        reader = threading.Thread(target=lines.extend, args=(process.stderr,), daemon=True)
        reader.start()
        fake_feishu.wait_until(  # the worker imports the SDK: 4 s of CPU, longer on a busy machine
            lambda: fake_feishu.records.open_connections(), 2 * DEADLINE, "the bot's long connection"
        )
        yield process, port
        reader.join(DEADLINE)  # the pipe ends with the process
    finally:
        process.kill()
        process.wait()
    assert not any(fake_feishu.app_secret in line for line in lines), "the secret must never be logged"


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def test_serve_with_feishu_answers_a_picture_and_counts_it(
    fake_feishu: FakeFeishu, demo_model_dir: Path, tmp_path: Path
) -> None:
    with serving(fake_feishu, demo_model_dir, tmp_path, max_new_tokens=12, grace=2.0) as (process, port):
        event = fake_feishu.events.image("img_service")
        message_id = event["event"]["message"]["message_id"]
        fake_feishu.push_event(event, resources={"img_service": make_png()})
        card = fake_feishu.wait_until(
            lambda: next((c for c in fake_feishu.records.cards() if c.closed and c.message_id), None),
            2 * DEADLINE,
            "a closed streaming card",
        )
        [reply] = [r for r in fake_feishu.records.replies() if r.parent_id == message_id]
        assert reply.card_id == card.card_id
        assert card.final_text

        def health() -> dict[str, Any]:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=DEADLINE).json()  # type: ignore[no-any-return]

        # The worker reports "connected" every heartbeat (5 s here): events may flow before it has.
        body = until_blocking(lambda: (b := health())["status"] == "healthy" and b, "a healthy service")
        assert body["platforms"]["feishu"]["connected"] is True, body

        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE).text
        assert _samples(text, "vlbridge_feishu_events_total").get((("outcome", "answer"),), 0) >= 1, text
        requests = _samples(text, "vlbridge_requests_total")
        assert requests.get((("code", "ok"), ("route", "feishu")), 0) >= 1, requests
        assert _samples(text, "vlbridge_feishu_connected") == {(): 1.0}
        process.send_signal(signal.SIGTERM)
        assert process.wait(DEADLINE) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled


@pytest.mark.timeout(600)  # a generous grace: the answer must end by itself, however busy the machine
def test_sigterm_lets_a_streaming_card_finish(
    fake_feishu: FakeFeishu, demo_model_dir: Path, tmp_path: Path
) -> None:
    with serving(fake_feishu, demo_model_dir, tmp_path, max_new_tokens=300, grace=500.0) as (process, _):
        fake_feishu.push_event(fake_feishu.events.image("img_long"), resources={"img_long": make_png()})
        card = fake_feishu.wait_until(
            lambda: next((c for c in fake_feishu.records.cards() if c.content_updates), None),
            2 * DEADLINE,
            "the answer streaming into its card",
        )
        assert not card.closed, "the answer ended before the signal: the test proves nothing"
        updates_before = len(card.content_updates)
        process.send_signal(signal.SIGTERM)
        assert process.wait(550) in (0, -signal.SIGTERM)
        [card] = [c for c in fake_feishu.records.cards() if c.card_id == card.card_id]  # records are copies
        assert card.closed_by == "settings", card.closed_by  # closed by the bot, not by a timeout
        assert len(card.content_updates) > updates_before, "nothing was written after the signal"
        for sentence in ("（已停止）", "稍后再试", "shutting down"):
            assert sentence not in card.final_text, card.final_text
        [reply] = fake_feishu.records.replies()  # one answer: the card, no second message
        assert reply.card_id == card.card_id
