"""The whole product in one process, as `vlbridge serve` runs it: demo model + Feishu adapter.

The unmodified lark-oapi SDK in the service talks to the fake Feishu platform. Checked: /health
reports the platform connection; a picture sent in a private chat comes back as one closed
streaming card carrying the model's answer, counted on /metrics like every other route's; and a
SIGTERM while a card streams lets that answer finish before the process exits.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_png
from tests.fakefeishu import FakeFeishu
from tests.feishu_service import serving, write_config
from tests.waiting import DEADLINE, until_blocking


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
    config = write_config(
        tmp_path / "vlbridge.toml", fake_feishu, demo_model_dir, tmp_path / "data", max_new_tokens=12
    )
    with serving(fake_feishu, config) as service:
        process = service.process
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

        # The worker reports "connected" every heartbeat (5 s here): events may flow before it has.
        def healthy_and_counted() -> dict[str, Any] | None:
            body: dict[str, Any] = service.health()
            feishu = body["platforms"]["feishu"]
            return body if body["status"] == "healthy" and feishu["inbox"]["answered"] == 1 else None

        body = until_blocking(healthy_and_counted, "a healthy service, its inbox counting the answer")
        assert body["platforms"]["feishu"]["connected"] is True, body
        assert body["platforms"]["feishu"]["inbox"] == {
            "received": 0,
            "running": 0,
            "answered": 1,
            "failed": 0,
            "ignored": 0,
        }

        text = service.metrics()
        assert _samples(text, "vlbridge_feishu_events_total").get((("outcome", "answer"),), 0) >= 1, text
        requests = _samples(text, "vlbridge_requests_total")
        assert requests.get((("code", "ok"), ("route", "feishu")), 0) >= 1, requests
        assert _samples(text, "vlbridge_feishu_connected") == {(): 1.0}
        # the inbox as /health showed it (docker/prometheus/alerts.yml watches running and failed)
        inbox = {labels[0][1]: value for labels, value in _samples(text, "vlbridge_inbox_messages").items()}
        assert inbox == {"received": 0, "running": 0, "answered": 1, "failed": 0, "ignored": 0}, text
        process.send_signal(signal.SIGTERM)
        assert process.wait(DEADLINE) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled


@pytest.mark.timeout(600)  # a generous grace: the answer must end by itself, however busy the machine
def test_sigterm_lets_a_streaming_card_finish(
    fake_feishu: FakeFeishu, demo_model_dir: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "vlbridge.toml",
        fake_feishu,
        demo_model_dir,
        tmp_path / "data",
        max_new_tokens=300,
        grace=500.0,
    )
    with serving(fake_feishu, config) as service:
        process = service.process
        fake_feishu.push_event(fake_feishu.events.image("img_long"), resources={"img_long": make_png()})
        card = fake_feishu.wait_until(
            lambda: next((c for c in fake_feishu.records.cards() if c.content_updates), None),
            2 * DEADLINE,
            "the answer streaming into its card",
        )
        assert not card.closed, "the answer ended before the signal: the test proves nothing"
        updates_before = len(card.history)
        process.send_signal(signal.SIGTERM)
        assert process.wait(550) in (0, -signal.SIGTERM)
        [card] = [c for c in fake_feishu.records.cards() if c.card_id == card.card_id]  # records are copies
        assert card.closed_by == "update", card.closed_by  # closed by the bot, not by a timeout
        assert len(card.history) > updates_before, "nothing was written after the signal"
        for sentence in ("（已停止）", "稍后再试", "shutting down"):
            assert sentence not in card.final_text, card.final_text
        [reply] = fake_feishu.records.replies()  # one answer: the card, no second message
        assert reply.card_id == card.card_id
