"""Streaming answers as CardKit v1 cards ("typewriter" cards), with a plain-reply fallback.

`CardStream` is the Feishu `bot.conversation.AnswerSink`:

1. `open`: create a card JSON 2.0 with ``config.streaming_mode`` and one markdown element
   (`ELEMENT_ID`), then reply to the user's message with it (``msg_type=interactive``,
   ``{"type": "card", "data": {"card_id": ...}}``), in the thread when the message was in one;
2. `update`: remember the FULL text so far; one pump task per card sends it with
   ``PUT .../elements/{id}/content`` at most every `interval` seconds (coalescing: the newest
   text wins; at most one call in flight, so `sequence` strictly increases per card);
3. `close`: send the final text at once, then ``PATCH .../settings`` with
   ``streaming_mode: false`` (else the chat list keeps showing "generating").

If CardKit fails (create/send, or an update after the API's own retries) the answer is sent
as ONE plain text reply at the end instead. Methods never raise: failures are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

from bot.feishu.openapi import FeishuApi, FeishuApiError

log = logging.getLogger("vlbridge.feishu.cards")

ELEMENT_ID = "answer"
MAX_CARD_TEXT = 20_000  # characters; a card may hold 30 KB


def streaming_card(text: str) -> dict[str, Any]:
    """The card JSON 2.0 a streaming answer starts from."""
    return {
        "schema": "2.0",
        "config": {
            "streaming_mode": True,
            "summary": {"content": ""},
            "streaming_config": {
                "print_frequency_ms": {"default": 30},
                "print_step": {"default": 2},
                "print_strategy": "fast",
            },
        },
        "body": {"elements": [{"tag": "markdown", "content": text, "element_id": ELEMENT_ID}]},
    }


def closing_settings(text: str) -> dict[str, Any]:
    """Settings that end streaming and put the answer's start into the chat-list preview."""
    summary = " ".join(text.split())[:60]
    return {"config": {"streaming_mode": False, "summary": {"content": summary}}}


def clip(text: str, limit: int = MAX_CARD_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class CardStream:
    """One streaming answer to one message; use open -> update* -> close, once."""

    def __init__(
        self, api: FeishuApi, message_id: str, *, in_thread: bool, interval: float, request_id: str = ""
    ) -> None:
        self.api = api
        self.message_id = message_id
        self.in_thread = in_thread
        self.interval = interval
        self.request_id = request_id or message_id
        self.card_id = ""
        self.fallback = False  # CardKit failed: the answer goes out as a plain reply
        self.updates = 0
        self._sequence = itertools.count(1)
        self._latest = ""
        self._sent = ""
        self._last_send = 0.0
        self._closing = False
        self._wake = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None

    def _next_sequence(self) -> int:
        return next(self._sequence)

    async def open(self, status: str) -> None:
        self._latest = self._sent = status
        try:
            self.card_id = await self.api.create_card(streaming_card(status))
            await self.api.reply(
                self.message_id,
                "interactive",
                {"type": "card", "data": {"card_id": self.card_id}},
                in_thread=self.in_thread,
                uuid=f"{self.message_id}:card",
            )
        except FeishuApiError as exc:
            log.warning(
                "%s: streaming card unavailable (%s); will answer with one plain reply", self.request_id, exc
            )
            self.fallback = True
            return
        self._last_send = time.monotonic()
        self._pump_task = asyncio.create_task(self._pump(), name=f"card-{self.card_id}")

    def update(self, text: str) -> None:
        if self._closing:
            return
        idle = self._latest == self._sent
        self._latest = clip(text)
        if idle:
            self._wake.set()

    async def close(self, text: str) -> None:
        self._closing = True
        self._latest = clip(text)
        self._wake.set()
        if self._pump_task is not None:
            with contextlib.suppress(Exception):
                await self._pump_task
        if not self.fallback and self._sent == self._latest:
            try:
                await self.api.card_settings(self.card_id, closing_settings(text), self._next_sequence)
                return
            except FeishuApiError as exc:
                # The text is complete on the card; only the "generating" mark stays.
                log.warning(
                    "%s: could not close streaming on card %s: %s", self.request_id, self.card_id, exc
                )
                return
        await self._plain(text)

    async def _plain(self, text: str) -> None:
        try:
            await self.api.reply(
                self.message_id,
                "text",
                {"text": clip(text, 30_000)},
                in_thread=self.in_thread,
                uuid=f"{self.message_id}:answer",
            )
        except FeishuApiError as exc:
            log.error("%s: the answer could not be delivered at all: %s", self.request_id, exc)

    async def _pump(self) -> None:
        """Send the newest text, at most one call in flight and one per `interval`."""
        while not (self._closing and self._latest == self._sent):
            if self._latest == self._sent:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = self._last_send + self.interval - time.monotonic()
            if delay > 0 and not self._closing:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            text = self._latest
            try:
                await self.api.card_content(self.card_id, ELEMENT_ID, text, self._next_sequence)
            except FeishuApiError as exc:
                log.warning("%s: card %s update failed: %s; falling back", self.request_id, self.card_id, exc)
                self.fallback = True
                return
            self.updates += 1
            self._sent = text
            self._last_send = time.monotonic()
