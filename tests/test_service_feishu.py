"""The whole product in one process, as `vlbridge serve` runs it: demo model + Feishu adapter.

The unmodified lark-oapi SDK in the service talks to the fake Feishu platform; the test
checks that /health reports the platform connection and that a picture sent in a
private chat comes back as one closed streaming card carrying the model's answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import make_png
from tests.fakefeishu import FakeFeishu


def test_serve_with_feishu_answers_a_picture(
    fake_feishu: FakeFeishu, demo_model_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "vlbridge.toml"
    config.write_text(
        "[server]\nport = 0\nshutdown_grace = 2.0\n"
        f'[model]\npath = "{demo_model_dir}"\ndevice = "cpu"\nmax_new_tokens = 12\n'
        f'[feishu]\nenabled = true\napp_id = "{fake_feishu.app_id}"\ndomain = "{fake_feishu.url}"\n'
        "watchdog_interval = 0.5\nstream_interval = 0.05\n"
        f'[storage]\npath = "{tmp_path / "data"}"\n'
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "VLBRIDGE_FEISHU_APP_SECRET": fake_feishu.app_secret}
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stderr is not None
        port = None
        for line in process.stderr:
            assert fake_feishu.app_secret not in line, "the app secret must never be logged"
            if "Uvicorn running on" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
                break
        assert port, "the server did not start"
        fake_feishu.wait_until(
            lambda: fake_feishu.records.open_connections(), 30, "the bot's long connection"
        )

        event = fake_feishu.events.image("img_service")
        message_id = event["event"]["message"]["message_id"]
        fake_feishu.push_event(event, resources={"img_service": make_png()})
        card = fake_feishu.wait_until(
            lambda: next((c for c in fake_feishu.records.cards() if c.closed and c.message_id), None),
            60,
            "a closed streaming card",
        )
        [reply] = [r for r in fake_feishu.records.replies() if r.parent_id == message_id]
        assert reply.card_id == card.card_id
        assert card.final_text

        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health["status"] == "healthy", health
        assert health["platforms"]["feishu"]["connected"] is True, health
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) in (0, -signal.SIGTERM)
    finally:
        process.kill()
        process.wait()
