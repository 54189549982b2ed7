"""Streaming answers as CardKit v1 cards ("typewriter" cards), with a plain-reply fallback.

`CardStream` is the Feishu `bot.conversation.AnswerSink`:

1. `open`: create a card JSON 2.0 with ``config.streaming_mode`` and one markdown element
   (`ELEMENT_ID`), then reply to the user's message with it (``msg_type=interactive``,
   ``{"type": "card", "data": {"card_id": ...}}``), in the thread when the message was in one;
2. `update`: remember the FULL text so far; one pump task per card sends it with
   ``PUT .../elements/{id}/content`` as `bot.feishu.pacing.Pacing` allows (gaps growing as the
   answer goes on, a bounded number per card; coalescing: the newest text wins; at most one
   call in flight, so `sequence` strictly increases per card);
3. `close`: a card with buttons (Stop while it streams) is replaced in ONE call
   (``PUT /cardkit/v1/cards/{id}``: the final text, "Try again" instead of "Stop", streaming
   off); a card without buttons gets the final text, then ``PATCH .../settings`` with
   ``streaming_mode: false`` (else the chat list keeps showing "generating").

If CardKit fails (create/send, or an update after the API's own retries) the answer is sent
as ONE plain text reply at the end instead. Methods never raise: failures are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from bot.feishu.ids import reply_target
from bot.feishu.openapi import FeishuApi, FeishuApiError
from bot.feishu.pacing import Pacing

log = logging.getLogger("vlbridge.feishu.cards")

ELEMENT_ID = "answer"
MAX_CARD_TEXT = 20_000  # characters; a card may hold 30 KB


def button(element_id: str, label: str, value: dict[str, str], kind: str = "default") -> dict[str, Any]:
    """A card JSON 2.0 button whose press comes back as a ``card.action.trigger`` with *value*."""
    return {
        "tag": "button",
        "element_id": element_id,
        "text": {"tag": "plain_text", "content": label},
        "type": kind,
        "behaviors": [{"type": "callback", "value": value}],
    }


def streaming_card(text: str, buttons: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
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
        "body": {"elements": [{"tag": "markdown", "content": text, "element_id": ELEMENT_ID}, *buttons]},
    }


def final_card(text: str, buttons: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """The whole card at the end: the final text and *buttons*, streaming off, a preview."""
    card = streaming_card(text, buttons)
    card["config"] = closing_settings(text)["config"]
    return card


def closing_settings(text: str) -> dict[str, Any]:
    """Settings that end streaming and put the answer's start into the chat-list preview."""
    summary = " ".join(text.split())[:60]
    return {"config": {"streaming_mode": False, "summary": {"content": summary}}}


def clip(text: str, limit: int = MAX_CARD_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class CardJournal(Protocol):
    """Where a card's progress is recorded as it happens, so that after a crash the same card is
    finished (`bot.inbox`); every method returns only once the record is durable."""

    async def card_created(self, card_id: str) -> tuple[str, int]:
        """Record the new card unless the message has one already (opened meanwhile by another
        service); returns the card to use and the highest sequence reserved on it."""

    async def card_sent(self, reply_id: str) -> None: ...

    async def sequences_reserved(self, upto: int) -> None:
        """CardKit sequences up to *upto* may be used from now on."""


SEQUENCE_BLOCK = 64  # sequences reserved per journal write
SEQUENCE_MARGIN = 8  # more than one call's attempts (FeishuApi: 5, plus a token retry)


class CardStream:
    """One streaming answer to one message; use open -> update* -> close, once.

    With a *journal*, the card id, the reply's message id and the sequences are recorded before
    they are used; a stream made with the recorded *card_id*, *reply_id* and *sequence* (after a
    restart, or for a card first opened to show a queue place) takes the same card over: `open`
    turns streaming on again and shows the status, and the sequence keeps increasing.
    """

    def __init__(
        self,
        api: FeishuApi,
        message_id: str,
        *,
        in_thread: bool,
        interval: float,
        pacing: Pacing | None = None,
        request_id: str = "",
        journal: CardJournal | None = None,
        card_id: str = "",
        reply_id: str = "",
        sequence: int = 0,
        stop_button: dict[str, Any] | None = None,
        retry_button: dict[str, Any] | None = None,
    ) -> None:
        self.api = api
        self.message_id = message_id  # the answer's id: the user's message, or a retry of it
        self.target = reply_target(message_id)  # the user's message the card replies to
        self.in_thread = in_thread
        self.pacing = pacing or Pacing(interval=interval, growth=1.0, max_updates=1 << 62)
        self.stop_button = stop_button
        self.retry_button = retry_button
        # A card that shows buttons ends with one full replacement (text, buttons, streaming off).
        self.replace_on_close = stop_button is not None or retry_button is not None
        self.request_id = request_id or message_id
        self.journal = journal
        self.card_id = card_id
        self.reply_id = reply_id
        self.fallback = False  # CardKit failed: the answer goes out as a plain reply
        self.updates = 0
        self._last_sequence = sequence
        self._reserved = sequence
        self._latest = ""
        self._sent = ""
        self._last_send = 0.0
        self._closing = False
        self._wake = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None

    def _next_sequence(self) -> int:
        self._last_sequence += 1
        return self._last_sequence

    async def _reserve(self) -> None:
        """Make sure the next call's sequences are recorded (a restart continues above them)."""
        if self.journal is not None and self._last_sequence + SEQUENCE_MARGIN > self._reserved:
            upto = self._last_sequence + SEQUENCE_BLOCK
            await self.journal.sequences_reserved(upto)
            self._reserved = upto

    async def open(self, status: str, *, placeholder: bool = False) -> None:
        """Create the card and reply with it (or take over the recorded one). When another
        service recorded a card for this message first, the stream continues that card above
        its reserved sequences; a *placeholder* (a queue place) leaves it alone instead, so a
        queue place never overwrites an answer being streamed there."""
        self._latest = self._sent = status
        try:
            if not self.card_id:
                buttons = (self.stop_button,) if self.stop_button is not None else ()
                created = await self.api.create_card(streaming_card(status, buttons))
                self.card_id = created
                if self.journal is not None:
                    self.card_id, reserved = await self.journal.card_created(created)
                    if self.card_id != created:
                        log.info("%s: card %s was opened elsewhere first", self.request_id, self.card_id)
                        if placeholder:
                            return
                        self._last_sequence = self._reserved = max(self._last_sequence, reserved)
                        await self.show(status, streaming=True, raising=True)
            else:
                await self.show(status, streaming=True, raising=True)
            if not self.reply_id:
                # Idempotent by uuid: after a crash between the send and its record, the
                # platform answers with the first message instead of sending a second.
                self.reply_id = await self.api.reply(
                    self.target,
                    "interactive",
                    {"type": "card", "data": {"card_id": self.card_id}},
                    in_thread=self.in_thread,
                    uuid=f"{self.message_id}:card",
                )
                if self.journal is not None:
                    await self.journal.card_sent(self.reply_id)
        except FeishuApiError as exc:
            log.warning(
                "%s: streaming card unavailable (%s); will answer with one plain reply", self.request_id, exc
            )
            self.fallback = True
            return
        self._last_send = time.monotonic()
        self._pump_task = asyncio.create_task(self._pump(), name=f"card-{self.card_id}")

    async def detach(self) -> None:
        """Leave the card as it is, still streaming: its message's answer takes it over later."""
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
            self._pump_task = None

    async def show(self, text: str, *, streaming: bool = False, raising: bool = False) -> bool:
        """Set the card's text now (e.g. a queue place), outside the stream; with *streaming*,
        turn streaming mode on first (a card taken over may have been closed, or timed out).
        False (or `FeishuApiError` when *raising*) when it failed."""
        try:
            if streaming:
                await self._reserve()
                await self.api.card_settings(
                    self.card_id, {"config": {"streaming_mode": True}}, self._next_sequence
                )
            await self._reserve()
            await self.api.card_content(self.card_id, ELEMENT_ID, clip(text), self._next_sequence)
        except FeishuApiError as exc:
            if raising:
                raise
            log.info("%s: card %s not updated: %s", self.request_id, self.card_id, exc)
            return False
        self._sent = clip(text)
        return True

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
        if not self.fallback and self.replace_on_close:
            buttons = (self.retry_button,) if self.retry_button is not None else ()
            try:
                await self._reserve()
                await self.api.card_replace(
                    self.card_id, final_card(clip(text), buttons), self._next_sequence
                )
                self._sent = self._latest
                return
            except FeishuApiError as exc:
                log.warning(
                    "%s: card %s not replaced (%s); closing it in two steps",
                    self.request_id,
                    self.card_id,
                    exc,
                )
            if self._sent != self._latest and not await self.show(self._latest):
                await self._plain(text)
                return
        if not self.fallback and self._sent == self._latest:
            try:
                await self._reserve()
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
                self.target,
                "text",
                {"text": clip(text, 30_000)},
                in_thread=self.in_thread,
                uuid=f"{self.message_id}:answer",
            )
        except FeishuApiError as exc:
            log.error("%s: the answer could not be delivered at all: %s", self.request_id, exc)

    async def _pump(self) -> None:
        """Send the newest text, at most one call in flight, spaced as `pacing` says. On close,
        the final text is left to `close` when the card is replaced whole."""
        while not (self._closing and (self.replace_on_close or self._latest == self._sent)):
            if self._latest == self._sent:
                self._wake.clear()
                await self._wake.wait()
                continue
            gap = self.pacing.delay(self.updates)
            if gap is None and not self._closing:  # the card had its updates: wait for the end
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = self._last_send + (gap or 0.0) - time.monotonic()
            if delay > 0 and not self._closing:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            text = self._latest
            try:
                await self._reserve()
                await self.api.card_content(self.card_id, ELEMENT_ID, text, self._next_sequence)
            except FeishuApiError as exc:
                log.warning("%s: card %s update failed: %s; falling back", self.request_id, self.card_id, exc)
                self.fallback = True
                return
            self.updates += 1
            self._sent = text
            self._last_send = time.monotonic()
