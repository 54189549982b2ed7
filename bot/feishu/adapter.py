"""The Feishu adapter: the `server.platform.PlatformAdapter` the service starts and stops.

Flow of one event: receiver (long connection worker or webhook) -> `_on_event` (on the loop,
returns at once) -> a task: parse (`messages.parse_event`) -> claim in the durable `Inbox`
(a duplicate or redelivered message stops here) -> `Conversation.handle` with a
`FeishuChannel` (downloads, plain replies, streaming cards) -> the inbox row is marked.

Shutdown (`stop`, called after the executor stopped): stop receiving -> give running handlers
`grace` seconds (their answers already got a final Failed/Done) -> cancel the rest -> close
the API pool and the inbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bot.conversation import AnswerSink, Conversation, Decision, Policy, Settings
from bot.feishu import metrics
from bot.feishu.cards import CardStream
from bot.feishu.longconn import LongConnection
from bot.feishu.messages import MalformedEvent, parse_event
from bot.feishu.openapi import FeishuApi, FeishuApiError
from bot.feishu.webhook import Webhook
from bot.inbox import Inbox, InboxState
from bot.types import ChatType, InboundMessage
from server.config import Config
from server.errors import Unavailable
from server.inference.api import AnswerSource
from server.platform import HttpRoute

log = logging.getLogger("vlbridge.feishu")


class FeishuChannel:
    """`bot.conversation.ReplyChannel` over the Feishu Open API."""

    def __init__(self, api: FeishuApi, *, max_image_bytes: int, stream_interval: float) -> None:
        self.api = api
        self.max_image_bytes = max_image_bytes
        self.stream_interval = stream_interval

    async def fetch_images(self, message: InboundMessage) -> list[bytes]:
        try:
            return list(
                await asyncio.gather(
                    *(
                        self.api.download_image(message.message_id, key, max_bytes=self.max_image_bytes)
                        for key in message.image_keys
                    )
                )
            )
        except FeishuApiError as exc:
            raise Unavailable(str(exc)) from None

    async def reply_text(self, message: InboundMessage, text: str) -> None:
        try:
            await self.api.reply(
                message.message_id,
                "text",
                {"text": text},
                in_thread=message.in_thread,
                uuid=f"{message.message_id}:text",
            )
        except FeishuApiError as exc:
            metrics.API_ERRORS.inc()
            log.error("message %s: reply failed: %s", message.message_id, exc)

    def answer_sink(self, message: InboundMessage) -> AnswerSink:
        return CardStream(
            self.api, message.message_id, in_thread=message.in_thread, interval=self.stream_interval
        )


class FeishuAdapter:
    name = "feishu"

    def __init__(self, config: Config, answers: AnswerSource, *, grace: float = 2.0) -> None:
        feishu = config.feishu
        self.config = config
        self.grace = grace
        self.api = FeishuApi(feishu.app_id, feishu.app_secret.get_secret_value(), feishu.domain)
        self.inbox = Inbox(
            config.storage_path / "feishu-inbox.sqlite3",
            platform="feishu",
            retention_hours=feishu.dedup_hours,
        )
        self.conversation = Conversation(
            answers,
            Settings(
                language=feishu.language,
                policy=Policy(
                    allowed_chats=frozenset(feishu.allowed_chats),
                    allowed_users=frozenset(feishu.allowed_users),
                    max_message_age=feishu.max_message_age,
                ),
                user_rate_per_minute=feishu.user_rate_per_minute,
                max_images=config.server.max_images,
            ),
        )
        self.channel = FeishuChannel(
            self.api, max_image_bytes=config.server.max_image_bytes, stream_interval=feishu.stream_interval
        )
        self.receiver: LongConnection | Webhook
        if feishu.mode == "webhook":
            self.receiver = Webhook(
                encrypt_key=feishu.encrypt_key.get_secret_value(),
                verification_token=feishu.verification_token.get_secret_value(),
                on_event=self._on_event,
            )
        else:
            self.receiver = LongConnection(
                app_id=feishu.app_id,
                app_secret=feishu.app_secret.get_secret_value(),
                domain=feishu.domain,
                on_event=self._on_event,
                watchdog_interval=feishu.watchdog_interval,
            )
        self.bot_id = ""
        self._bot_id_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = False
        self.counts: dict[str, int] = {}

    # -- lifecycle --------------------------------------------------------------------------------

    def routes(self) -> list[HttpRoute]:
        return list(self.receiver.routes()) if isinstance(self.receiver, Webhook) else []

    async def start(self) -> None:
        await self.inbox.open()
        self._accepting = True
        if isinstance(self.receiver, LongConnection):
            await self.receiver.start()
        self._spawn(self._own_id(), "bot-info")

    async def drain(self, deadline: float) -> None:
        """Stop receiving; running handlers (their answers, then the card's last update) get
        until *deadline*, plus `grace` for the platform calls that close their cards."""
        if self._accepting:
            self._accepting = False
            # The worker acked what is still in its pipe: it is read before the link closes,
            # so an acked message still gets a sentence ("shutting down") instead of silence.
            if isinstance(self.receiver, LongConnection):
                await self.receiver.stop()
            else:
                self.receiver.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()) + self.grace)

    async def stop(self) -> None:
        await self.drain(time.monotonic())
        pending = set(self._tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        self.api.close()
        await self.inbox.close()

    def health(self) -> dict[str, Any]:
        return {
            **self.receiver.health(),
            "bot_open_id": self.bot_id,
            "in_flight": len(self._tasks),
            "counts": dict(self.counts),
        }

    def healthy(self) -> bool:
        return not isinstance(self.receiver, LongConnection) or self.receiver.connected

    # -- events -----------------------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        metrics.EVENTS.labels(outcome).inc()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_event(self, body: dict[str, Any], received_at: float) -> None:
        """Called on the event loop for every delivery; must return at once."""
        if not self._accepting:
            return
        self._spawn(self._process(body, received_at), "feishu-event")

    async def _own_id(self) -> str:
        async with self._bot_id_lock:
            if not self.bot_id:
                try:
                    self.bot_id = await self.api.bot_open_id()
                    log.info("bot open_id %s", self.bot_id)
                except FeishuApiError as exc:
                    log.error("cannot learn the bot's open_id (group @-mentions unrecognised): %s", exc)
            return self.bot_id

    async def _process(self, body: dict[str, Any], received_at: float) -> None:
        try:
            message = parse_event(body)
        except MalformedEvent as exc:
            self._count("malformed")
            log.warning("event %s ignored: %s", (body.get("header") or {}).get("event_id"), exc)
            return
        if not await self.inbox.claim(message.message_id):
            self._count("duplicate")
            log.info("message %s: already accepted, redelivery ignored", message.message_id)
            return
        bot_id = await self._own_id() if message.chat_type is ChatType.GROUP else self.bot_id
        if bot_id:
            message = parse_event(body, bot_id=bot_id)  # the bot's own @ leaves the text
        state = InboxState.FAILED
        started = time.monotonic()
        try:
            decision = await self.conversation.handle(
                message, self.channel, bot_id=bot_id, arrived_at=received_at
            )
            state = InboxState.ANSWERED if decision is Decision.ANSWER else InboxState.IGNORED
            self._count(decision.value)
            if decision is Decision.ANSWER:
                metrics.ANSWER_SECONDS.observe(time.monotonic() - started)
        except Exception:
            self._count("failed")
            log.exception("message %s: handling failed", message.message_id)
            await self.channel.reply_text(
                message,
                "抱歉，出了点问题。"
                if self.config.feishu.language == "zh"
                else "Sorry, something went wrong.",
            )
        finally:
            await asyncio.shield(self.inbox.mark(message.message_id, state))
