"""The Feishu adapter: the `server.platform.PlatformAdapter` the service starts and stops.

Flow of one message ("nothing lost, nothing twice"):

1. a receiver (the long-connection worker, or the webhook) commits the message to the durable
   `bot.inbox.Inbox` and only then acknowledges it to Feishu; a redelivery finds it there;
2. the `bot.dispatch.Dispatcher` takes received messages in arrival order, one at a time per
   chat (or thread), as many as the executor has room for: overload waits on disk, and while
   messages wait, their cards show their place in the queue (`_show_queue`);
3. `_answer` parses the stored event and calls `Conversation.handle` with a `FeishuChannel`
   whose cards record their id, reply and CardKit sequences in the inbox as they go;
4. the inbox row ends answered, ignored or failed(reason).

At start-up (`start`) messages left `running` by a process that died are recovered: answered
again into the same card (or set aside, and the user told, after `feishu.max_attempts` such
deaths); messages that waited past `feishu.max_message_age` over a restart get a short note.

Shutdown: stop receiving -> running answers get until the deadline (plus `grace` for the
calls that close their cards) -> what still runs is cancelled and kept for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from typing import Any

import orjson

from bot import texts
from bot.cancels import ANSWER_PREFIX
from bot.conversation import Conversation, Decision, NotNow, Policy, Settings
from bot.dispatch import Dispatcher, Outcome
from bot.feishu import actions, metrics
from bot.feishu.cards import CardStream, button
from bot.feishu.ids import is_retry, reply_target
from bot.feishu.longconn import LongConnection
from bot.feishu.messages import MalformedEvent, is_command, parse_event
from bot.feishu.monitor import LinkState, restart_delay
from bot.feishu.openapi import FeishuApi, FeishuApiError
from bot.feishu.pacing import Pacing
from bot.feishu.receipts import Receipts
from bot.feishu.references import ReferenceReader
from bot.feishu.webhook import Webhook
from bot.inbox import Inbox, InboxState, StoredMessage
from bot.inbox_factory import StoreSpec
from bot.memory import Memory
from bot.types import ChatType, InboundMessage, PictureRef, Referenced
from server.config import Config
from server.errors import Unavailable
from server.inference.api import AnswerSource, ExecutorState
from server.platform import HttpRoute

log = logging.getLogger("vlbridge.feishu")

QUEUE_CARDS = 200  # waiting messages (the oldest) whose card shows their place in the queue
QUEUE_CARDS_PER_PASS = 8  # new queue cards per dispatcher pass (bounds the burst of API calls)


class InboxJournal:
    """`bot.feishu.cards.CardJournal` writing into one message's inbox row."""

    def __init__(self, inbox: Inbox, message_id: str) -> None:
        self.inbox = inbox
        self.message_id = message_id

    async def card_created(self, card_id: str) -> tuple[str, int]:
        return await self.inbox.run(self.inbox.db.claim_card, self.message_id, card_id)

    async def card_sent(self, reply_id: str) -> None:
        await self.inbox.run(lambda: self.inbox.db.note_reply(self.message_id, reply_id=reply_id))

    async def sequences_reserved(self, upto: int) -> None:
        await self.inbox.run(self.inbox.db.reserve_sequence, self.message_id, upto)


class FeishuChannel:
    """`bot.conversation.ReplyChannel` over the Feishu Open API for one stored message: its
    card continues the one recorded in the inbox, if any, and records its own progress there."""

    def __init__(
        self,
        api: FeishuApi,
        inbox: Inbox,
        stored: StoredMessage,
        *,
        max_image_bytes: int,
        stream_interval: float,
        pacing: Pacing | None = None,
        language: texts.Language = "zh",
    ) -> None:
        self.api = api
        self.inbox = inbox
        self.stored = stored
        self.max_image_bytes = max_image_bytes
        self.stream_interval = stream_interval
        self.pacing = pacing
        self.language = language

    async def fetch_images(self, pictures: PictureRef) -> list[bytes]:
        try:
            return list(
                await asyncio.gather(
                    *(
                        self.api.download_image(
                            reply_target(pictures.message_id), key, max_bytes=self.max_image_bytes
                        )
                        for key in pictures.keys
                    )
                )
            )
        except FeishuApiError as exc:
            raise Unavailable(str(exc)) from None

    async def reply_text(self, message: InboundMessage, text: str) -> None:
        """One sentence as the reply: on the message's card when it already has one (a queue
        place, or an answer cut by a restart), so that a message never gets two replies."""
        if self.stored.card_id:
            card = self.answer_sink(message, retry=False)
            await card.open(text)
            await card.close(text)
            return
        try:
            await self.api.reply(
                reply_target(message.message_id),
                "text",
                {"text": text},
                in_thread=message.in_thread,
                uuid=f"{message.message_id}:text",
            )
        except FeishuApiError as exc:
            metrics.API_ERRORS.inc()
            log.error("message %s: reply failed: %s", message.message_id, exc)

    async def referenced(self, message: InboundMessage, *, max_pictures: int) -> Referenced:
        return await ReferenceReader(self.api).read(message, max_pictures=max_pictures)

    def answer_sink(self, message: InboundMessage, *, retry: bool = True) -> CardStream:
        """The answer's card: "Stop" while it streams, "Try again" (with *retry*) at the end."""

        def labelled(kind: actions.ActionKind, key: str, style: str) -> dict[str, Any]:
            label = texts.text(key, self.language)
            return button(f"btn_{kind.value}", label, actions.button_value(kind, message.message_id), style)

        return CardStream(
            self.api,
            message.message_id,
            in_thread=message.in_thread,
            interval=self.stream_interval,
            pacing=self.pacing,
            stop_button=labelled(actions.ActionKind.STOP, "button_stop", "danger"),
            retry_button=labelled(actions.ActionKind.RETRY, "button_retry", "default") if retry else None,
            journal=InboxJournal(self.inbox, message.message_id),
            card_id=self.stored.card_id,
            reply_id=self.stored.reply_id,
            sequence=self.stored.sequence,
        )


class FeishuAdapter:
    name = "feishu"

    def __init__(self, config: Config, answers: AnswerSource, *, grace: float = 2.0) -> None:
        feishu = config.feishu
        self.config = config
        self.answers = answers
        self.grace = grace
        self.api = FeishuApi(feishu.app_id, feishu.app_secret.get_secret_value(), feishu.domain)
        self.store = StoreSpec.from_config(config, "feishu")  # [storage] backend: SQLite or Redis
        self.inbox = self.store.inbox()
        self.conversation = Conversation(
            answers,
            Settings(
                language=feishu.language,
                policy=Policy(
                    allowed_chats=frozenset(feishu.allowed_chats),
                    allowed_users=frozenset(feishu.allowed_users),
                    max_message_age=feishu.max_message_age,
                ),
                max_images=config.server.max_images,
            ),
            Memory(
                self.inbox, context_hours=feishu.context_hours, rate_per_minute=feishu.user_rate_per_minute
            ),
            cancels=self.store.cancels(),
        )
        self.dispatcher = Dispatcher(
            self.inbox,
            self._answer,
            room=self._room,
            max_running=config.executor.max_batch + config.executor.queue_size,
            on_idle=self._show_queue,
            lease=config.storage.lease_seconds,
        )
        self.action_policy = actions.ActionPolicy(
            who=feishu.card_actions, allowed_users=frozenset(feishu.allowed_users), language=feishu.language
        )
        self.pacing = Pacing(feishu.stream_interval, feishu.stream_growth, feishu.max_card_updates)
        self.receipts = Receipts(self.api, feishu.receipt_emoji, self.inbox)
        self.receiver: LongConnection | Webhook
        if feishu.mode == "webhook":
            self.receiver = Webhook(
                encrypt_key=feishu.encrypt_key.get_secret_value(),
                verification_token=feishu.verification_token.get_secret_value(),
                persist=self._persist,
                on_action=self._pressed,
            )
        else:
            self.receiver = LongConnection(
                app_id=feishu.app_id,
                app_secret=feishu.app_secret.get_secret_value(),
                domain=feishu.domain,
                inbox=self.store,
                on_event=self._arrived,
                watchdog_interval=feishu.watchdog_interval,
                actions=self.action_policy,
                on_action=self._acted,
            )
        self.bot_id = ""
        self.identity_error = ""  # why the bot's own info (and so a tenant token) could not be had
        self._bot_id_lock = asyncio.Lock()
        self._identity: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._accepting = False
        self._started_at = 0.0
        self._queue_shown: dict[str, int] = {}  # waiting message -> the place its card shows
        self._leases: asyncio.Task[None] | None = None
        self._storage_ok = True  # the last lease renewal reached the store
        self.counts: dict[str, int] = {}

    # -- lifecycle --------------------------------------------------------------------------------

    def routes(self) -> list[HttpRoute]:
        return list(self.receiver.routes()) if isinstance(self.receiver, Webhook) else []

    def open_storage(self) -> None:
        """Open the inbox now (before the model loads): raises `bot.inbox.StorageError`."""
        self.inbox.open_now()

    async def start(self) -> None:
        if not self.inbox.is_open:
            await self.inbox.open()
        self._started_at = time.time()
        # A SQLite inbox is this service's alone (its lock file): whatever runs there is a dead
        # predecessor's. A shared one (Redis) may hold live services' messages: only ended leases.
        await self._recover(math.inf if self.store.backend == "sqlite" else self._started_at)
        self._accepting = True
        self.conversation.cancels.start(self._cancel)
        self.dispatcher.start()
        self._leases = asyncio.get_running_loop().create_task(self._keep_leases(), name="inbox-leases")
        if isinstance(self.receiver, LongConnection):
            await self.receiver.start()
        self._identity = asyncio.get_running_loop().create_task(self._learn_identity(), name="bot-info")

    async def drain(self, deadline: float) -> None:
        """Stop receiving; running answers get until *deadline*, plus `grace` for the platform
        calls that close their cards. Received messages stay in the inbox for the next start."""
        if self._accepting:
            self._accepting = False
            if isinstance(self.receiver, LongConnection):
                await self.receiver.stop()
            else:
                self.receiver.close()
        await self.dispatcher.drain(max(0.0, deadline - time.monotonic()) + self.grace)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.grace)

    async def stop(self) -> None:
        await self.drain(time.monotonic())
        await self.dispatcher.stop()
        if self._leases is not None:  # renewed until every answer ended or was put back
            self._leases.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._leases
            self._leases = None
        if self._identity is not None:
            self._identity.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._identity
            self._identity = None
        pending = set(self._tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        await self.conversation.cancels.stop()
        self.api.close()
        await self.inbox.close()

    def health(self) -> dict[str, Any]:
        """The receiver's health; ``state`` is ``starting`` while the bot's own info cannot be
        had (bad credentials, Feishu unreachable: it cannot answer anyone), and ``reason`` says
        why the platform is not up (empty when it is)."""
        receiver = self.receiver.health()
        state = receiver["state"]
        reasons = [receiver.get("reason", "")]
        if self.identity_error:
            reasons.append(f"the bot's own info cannot be had: {self.identity_error}")
            if state in (LinkState.CONNECTED, "listening"):
                state = LinkState.STARTING.value
        return {
            **receiver,
            "state": state,
            "reason": "; ".join(reason for reason in reasons if reason),
            "bot_open_id": self.bot_id,
            "in_flight": self.dispatcher.running,
            "inbox": dict(self.dispatcher.counts),
            "counts": dict(self.counts),
        }

    def healthy(self) -> bool:
        connected = not isinstance(self.receiver, LongConnection) or self.receiver.connected
        return connected and self._storage_ok and not self.identity_error

    # -- arrivals ---------------------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        metrics.EVENTS.labels(outcome).inc()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _arrived(self, message_id: str, new: bool) -> None:
        """A receiver put a message into the inbox (on the event loop; returns at once)."""
        if new:
            self.dispatcher.wake()
        else:
            self._count("duplicate")
            log.info("message %s: already in the inbox, redelivery ignored", message_id)

    async def _persist(self, bodies: list[dict[str, Any]]) -> None:
        """The webhook's events into the inbox (before the webhook answers 200)."""
        for body in bodies:
            metrics.EVENTS.labels("received").inc()
            try:
                message = parse_event(body)
            except MalformedEvent as exc:
                self._count("malformed")
                log.warning("event %s ignored: %s", (body.get("header") or {}).get("event_id"), exc)
                continue
            new = await self.inbox.receive(
                message, orjson.dumps(body), time.time(), ordered=not is_command(body)
            )
            self._arrived(message.message_id, new)

    async def _pressed(self, body: dict[str, Any]) -> dict[str, Any]:
        """A button press through the webhook: checked and recorded now, answered with a toast
        (within the platform's 3 s); the cancel or the new answer follows after."""
        try:
            action = actions.parse_action(body)
        except MalformedEvent as exc:
            log.warning("card action %s ignored: %s", (body.get("header") or {}).get("event_id"), exc)
            return {}
        decision = await self.inbox.run(actions.act, self.inbox.db, action, self.action_policy, time.time())
        self._acted(action.kind.value, decision.verdict.value, decision.stop, decision.new_answer)
        return decision.response(self.action_policy.language)

    def _acted(self, kind: str, verdict: str, stop: str, new_answer: str) -> None:
        """What a press asked for, once recorded (by the webhook, or the long-connection worker)."""
        metrics.CARD_ACTIONS.labels(kind, verdict).inc()
        log.info(
            "card action %s: %s%s", kind, verdict, f" ({stop or new_answer})" if stop or new_answer else ""
        )
        if stop:
            self._spawn(self.conversation.cancels.publish(ANSWER_PREFIX + stop), f"stop-{stop}")
        if new_answer:
            self.dispatcher.wake()

    def _cancel(self, target: str) -> None:
        """A cancel from any service: a Stop button's answer, or a user's `/cancel`."""
        if target.startswith(ANSWER_PREFIX):
            self.conversation.cancel_answer(target.removeprefix(ANSWER_PREFIX))
        else:
            self.conversation.cancel_local(target)

    async def _own_id(self) -> str:
        async with self._bot_id_lock:
            if not self.bot_id:
                try:
                    self.bot_id = await self.api.bot_open_id()
                    self.identity_error = ""
                    log.info("bot open_id %s", self.bot_id)
                except FeishuApiError as exc:
                    self.identity_error = str(exc)
                    log.error("cannot learn the bot's open_id (group @-mentions unrecognised): %s", exc)
            return self.bot_id

    async def _learn_identity(self) -> None:
        """Ask for the bot's own info until it comes, backing off as the long connection's
        restarts do: until then /health shows the platform as starting, with the reason."""
        failures = 1
        while not await self._own_id():
            failures += 1
            await asyncio.sleep(restart_delay(failures, self.config.feishu.watchdog_interval))

    # -- answering --------------------------------------------------------------------------------

    def _t(self, key: str, **values: object) -> str:
        return texts.text(key, self.config.feishu.language, **values)

    def _room(self) -> int:
        """How many more messages the executor can take now: free batch rows and queue places
        (0 while it loads or stops)."""
        stats = self.answers.stats()
        if stats.state is not ExecutorState.READY:
            return 0
        return max(0, stats.max_batch + stats.queue_capacity - stats.active - stats.queue_depth)

    def _channel(self, stored: StoredMessage) -> FeishuChannel:
        return FeishuChannel(
            self.api,
            self.inbox,
            stored,
            max_image_bytes=self.config.server.max_image_bytes,
            stream_interval=self.config.feishu.stream_interval,
            pacing=self.pacing,
            language=self.config.feishu.language,
        )

    async def _message(self, stored: StoredMessage) -> InboundMessage:
        body = orjson.loads(stored.body)
        message = parse_event(body)
        if message.chat_type is ChatType.GROUP:
            bot_id = await self._own_id()
            if bot_id:
                message = parse_event(body, bot_id=bot_id)  # the bot's own @ leaves the text
        if is_retry(stored.message_id):  # "Try again": the same event, a new answer of its own
            message = dataclasses.replace(message, message_id=stored.message_id, created_at=stored.created_at)
        return message

    async def _answer(self, stored: StoredMessage) -> Outcome:
        """The dispatcher's handler: answer one stored message (now `running`)."""
        self._queue_shown.pop(stored.message_id, None)
        if self.receipts.owed(stored):
            self._spawn(self.receipts.clear(stored), f"receipt-{stored.message_id}")
        try:
            message = await self._message(stored)
        except (MalformedEvent, orjson.JSONDecodeError) as exc:
            self._count("malformed")
            return Outcome(InboxState.FAILED, f"unreadable event: {exc}")
        channel = self._channel(stored)
        stop = actions.stop_key(stored.message_id)
        if await self.inbox.run(self.inbox.db.load_context, stop, time.time()) is not None:
            await channel.reply_text(message, self._t("stopped"))  # Stop pressed while it waited
            self._count("stopped")
            return Outcome(InboxState.IGNORED, "stopped before it started")
        kept_since = stored.created_at or stored.received_at
        if (
            stored.received_at < self._started_at
            and time.time() - kept_since > self.config.feishu.max_message_age
        ):
            await channel.reply_text(message, self._t("restarted_too_old"))
            self._count("stale")
            return Outcome(InboxState.IGNORED, "waited too long over a restart")
        started = time.monotonic()
        try:
            decision = await self.conversation.handle(
                message, channel, bot_id=self.bot_id, arrived_at=stored.received_at, again=stored.attempts > 1
            )
        except NotNow:
            raise
        except Exception as exc:
            self._count("failed")
            log.exception("message %s: handling failed", message.message_id)
            await channel.reply_text(message, self._t("failed"))
            return Outcome(InboxState.FAILED, f"{type(exc).__name__}: {exc}"[:500])
        self._count(decision.value)
        if decision is Decision.ANSWER:
            metrics.ANSWER_SECONDS.observe(time.monotonic() - started)
            return Outcome(InboxState.ANSWERED)
        return Outcome(InboxState.IGNORED, decision.value)

    async def _keep_leases(self) -> None:
        """Every third of `storage.lease_seconds`: renew the leases of the messages answered
        here, take over those of processes that went silent, forget old finished messages.
        A store that fails makes the service unhealthy until it answers again."""
        lease = self.config.storage.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            try:
                ids = self.dispatcher.running_ids
                await self.inbox.run(self.inbox.db.renew, ids, time.time() + lease)
                if await self._recover(time.time()):
                    self.dispatcher.wake()
                await self.inbox.prune_now_and_then(time.time())
            except Exception as exc:
                if self._storage_ok:
                    log.error("inbox: %s; unhealthy, trying again every %.1f s", exc, lease / 3)
                self._storage_ok = False
            else:
                if not self._storage_ok:
                    log.info("inbox %s works again", self.inbox.name)
                self._storage_ok = True

    async def _recover(self, ended_before: float) -> int:
        """Running messages whose lease ended before *ended_before* (their process died, or went
        silent): taken over, then back to the queue, or set aside after `max_attempts` deaths
        (the user is told; the card, if any, says so). Returns how many were taken over."""
        lease_until = time.time() + self.config.storage.lease_seconds
        taken = await self.inbox.run(self.inbox.db.claim, ended_before, lease_until)
        mine = set(self.dispatcher.running_ids)
        left = [stored for stored in taken if stored.message_id not in mine]  # late renewals: ours
        limit = self.config.feishu.max_attempts
        for stored in left:
            if stored.attempts < limit:
                await self.inbox.run(self.inbox.db.recover, stored.message_id)
                log.warning(
                    "message %s: its answer was cut by a restart (attempt %d of %d); answering it again",
                    stored.message_id,
                    stored.attempts,
                    limit,
                )
                continue
            log.error(
                "message %s: the service ended %d times while answering it; set aside",
                stored.message_id,
                limit,
            )
            try:
                message = await self._message(stored)
                await self._channel(stored).reply_text(message, self._t("gave_up", attempts=stored.attempts))
            except Exception as exc:  # an unreadable row must not stop the start-up
                log.error("message %s: the user could not be told: %s", stored.message_id, exc)
            await self.inbox.run(
                self.inbox.db.finish,
                stored.message_id,
                InboxState.FAILED,
                f"the service ended {stored.attempts} times while answering it",
            )
            self._count("failed")
        return len(left)

    async def _show_queue(self) -> None:
        """Messages wait for room: their cards show their place (opened in arrival order, a few
        per pass; a place is rewritten when it has at least halved, so a wait costs a handful of
        calls, not one per finished answer)."""
        waiting = await self.inbox.run(self.inbox.db.in_state, InboxState.RECEIVED, QUEUE_CARDS)
        opened = 0
        jobs = []
        for ahead, stored in enumerate(waiting):
            shown = self._queue_shown.get(stored.message_id)
            if shown is not None and not (ahead < shown and ahead <= shown // 2):
                continue
            if not stored.card_id:
                if opened >= QUEUE_CARDS_PER_PASS:
                    continue
                opened += 1
            self._queue_shown[stored.message_id] = ahead
            jobs.append(self._show_place(stored, ahead, first=shown is None))
            if shown is None:
                jobs.append(self.receipts.show(stored.message_id))
        if jobs:
            await asyncio.gather(*jobs)
        current = {stored.message_id for stored in waiting}
        for message_id in [m for m in self._queue_shown if m not in current]:
            del self._queue_shown[message_id]

    async def _show_place(self, stored: StoredMessage, ahead: int, *, first: bool) -> None:
        try:
            message = await self._message(stored)
        except (MalformedEvent, orjson.JSONDecodeError):
            return
        card = self._channel(stored).answer_sink(message)
        text = self._t("queued", ahead=ahead)
        if stored.card_id:
            # The first time in this process the card may be closed (kept over a restart).
            await card.show(text, streaming=first)
        else:
            await card.open(text, placeholder=True)
            await card.detach()
