"""Feishu in /health when it cannot work: ``starting``, with the reason, and a log line worth reading.

The unmodified lark-oapi SDK (in the adapter, and in the long-connection worker) talks to the
fake platform, told to fail the call for the bot's own info, or the long connection's discovery.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot.feishu.adapter import FeishuAdapter
from server.answers import AnswerGateway
from tests.fakefeishu import FakeFeishu, Fault, Route
from tests.feishu_helpers import feishu_config
from tests.serving import serve, slow_echo
from tests.waiting import DEADLINE, until_blocking


def feishu_health(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(url + "/health", timeout=DEADLINE).json()
    return body


def test_bot_info_that_fails_shows_starting_with_the_reason(
    fake_feishu: FakeFeishu, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vlbridge.feishu")
    fake_feishu.faults.inject(Route.BOT_INFO, Fault(1, 500, "internal error"), times=1000)
    config = feishu_config(fake_feishu, tmp_path, model="x", mode="webhook", watchdog_interval=0.5)
    gateway = AnswerGateway(slow_echo())
    adapter = FeishuAdapter(config, gateway.route("feishu"))
    adapter.api.backoff = 0.01  # its five attempts in a moment
    with serve(config, gateway, platforms=[adapter]) as running:  # type: ignore[arg-type]
        body = until_blocking(
            lambda: (
                (body := feishu_health(running.http))["platforms"]["feishu"]["state"] == "starting" and body
            ),
            "Feishu shown as starting",
            poll=0.05,
        )
        feishu = body["platforms"]["feishu"]
        assert "bot info" in feishu["reason"] and "internal error" in feishu["reason"], feishu
        assert body["status"] == "degraded", body  # the model serves; Feishu cannot answer anyone
        fake_feishu.faults.clear()
        body = until_blocking(
            lambda: (body := feishu_health(running.http))["status"] == "healthy" and body,
            "the bot's info once Feishu answers",
            poll=0.05,
        )
        assert body["platforms"]["feishu"]["state"] == "listening"
        assert body["platforms"]["feishu"]["reason"] == ""
        assert body["platforms"]["feishu"]["bot_open_id"]
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries, [r.getMessage() for r in caplog.records]
    assert retries[0].startswith("bot info: Feishu code 1 (HTTP 500): internal error; retry 1"), retries[0]
    for record in caplog.records:
        assert "bot info: bot info" not in record.getMessage(), record.getMessage()


@pytest.mark.timeout(300)
def test_a_long_connection_that_cannot_connect_shows_starting_with_the_reason(
    fake_feishu: FakeFeishu, tmp_path: Path
) -> None:
    fake_feishu.fail_discovery(times=1000, msg="app is not allowed to connect")
    config = feishu_config(fake_feishu, tmp_path, model="x")
    gateway = AnswerGateway(slow_echo())
    adapter = FeishuAdapter(config, gateway.route("feishu"))
    with serve(config, gateway, platforms=[adapter]) as running:  # type: ignore[arg-type]
        # the worker imports the SDK (seconds of CPU), asks for the endpoint, and is refused
        body = until_blocking(
            lambda: (
                "not allowed" in (body := feishu_health(running.http))["platforms"]["feishu"]["reason"]
                and body
            ),
            "the platform's refusal as the reason",
            3 * DEADLINE,
            poll=0.2,
        )
        feishu = body["platforms"]["feishu"]
        assert feishu["state"] == "starting" and feishu["connected"] is False, feishu
        assert body["status"] == "degraded", body
