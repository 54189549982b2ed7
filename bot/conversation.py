"""Platform-neutral conversation logic: policy, commands, per-chat context, answering.

An adapter parses a platform message into `bot.types.InboundMessage` and calls
`Conversation.handle(message, channel, arrived_at=...)`; *channel* is the adapter's
`ReplyChannel` (fetch pictures, plain replies, a streaming answer sink). Everything here is
independent of Feishu. The model is reached only through the `server.inference.api.AnswerSource` it is given
(in the service: the answer gateway, so Feishu answers are drained and counted like all others).

Ordering: messages of one conversation (chat, or thread in a chat) are answered one after the
other, so a question sent right after a picture sees that picture; different conversations
run concurrently. Commands bypass that queue (``/cancel`` must not wait behind the answer it
cancels).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from bot import texts
from bot.cancels import Cancels, LocalCancels
from bot.memory import Context, Memory, PictureCache
from bot.types import (
    ChatType,
    InboundMessage,
    MessageKind,
    PictureRef,
    Referenced,
    ReferenceUnreadable,
    Unreadable,
)
from protocol.v1 import ErrorCode
from server.errors import RequestError, TooLarge, VlbridgeError
from server.inference.api import (
    AnswerSource,
    Delta,
    Done,
    Failed,
    InferenceRequest,
    Queued,
    Reading,
    RequestHandle,
    Started,
    Turn,
)

log = logging.getLogger("vlbridge.bot")

Clock = Callable[[], float]
STOP_MEMORY = 60.0  # seconds a Stop for an answer not running here is remembered


# -- commands -------------------------------------------------------------------------------------


class NotNow(VlbridgeError):
    """The answer source is not answering now (stopping, loading): the message is kept for later
    (raised by `Conversation.handle`, the user's card says so; `bot.dispatch` puts it back)."""


class Command(StrEnum):
    HELP = "/help"
    RESET = "/reset"
    STATUS = "/status"
    CANCEL = "/cancel"
    UNKNOWN = "unknown"


def parse_command(text: str) -> tuple[Command, str] | None:
    """``("/reset", ...)`` for a message that is a command, else None; returns (command, word)."""
    stripped = text.strip()
    if not stripped.startswith("/"):
        return None
    word = stripped.split(maxsplit=1)[0].lower()
    try:
        return Command(word), word
    except ValueError:
        return Command.UNKNOWN, word


# -- policy ---------------------------------------------------------------------------------------


class Decision(StrEnum):
    ANSWER = "answer"
    IGNORE = "ignore"  # a group message that does not @ the bot: not ours to answer
    NOT_ALLOWED = "not_allowed"
    STALE = "stale"
    RATE_LIMITED = "rate_limited"


@dataclass(frozen=True, slots=True)
class Policy:
    allowed_chats: frozenset[str] = frozenset()  # empty = every chat
    allowed_users: frozenset[str] = frozenset()  # empty = every user
    max_message_age: float = 1800.0

    def decide(self, message: InboundMessage, *, bot_id: str, arrived_at: float) -> Decision:
        if message.chat_type is ChatType.GROUP and (not bot_id or bot_id not in message.mentioned):
            return Decision.IGNORE
        if (self.allowed_chats and message.chat_id not in self.allowed_chats) or (
            self.allowed_users and message.sender_id not in self.allowed_users
        ):
            return Decision.NOT_ALLOWED
        if message.created_at and arrived_at - message.created_at > self.max_message_age:
            return Decision.STALE
        return Decision.ANSWER


# -- the platform side ----------------------------------------------------------------------------


class AnswerSink(Protocol):
    """Where one streaming answer goes (e.g. a Feishu CardKit card). Methods never raise:
    platform failures are the sink's to handle (fall back, log)."""

    async def open(self, status: str) -> None: ...

    def update(self, text: str) -> None:
        """The full text so far (or a status line); may be coalesced; never blocks."""

    async def close(self, text: str) -> None:
        """The final text; the answer is complete (or failed: then *text* says why)."""


class ReplyChannel(Protocol):
    """What `Conversation` needs from a platform for one message."""

    async def fetch_images(self, pictures: PictureRef) -> list[bytes]:
        """Download pictures (of this message, or of an earlier one in its conversation);
        raises `RequestError` (e.g. TooLarge) on failure."""

    async def reply_text(self, message: InboundMessage, text: str) -> None:
        """One plain reply to *message*; never raises."""

    async def referenced(self, message: InboundMessage, *, max_pictures: int) -> Referenced:
        """What *message* quotes (one level) or forwards (bounded), with at most *max_pictures*
        pictures (the others counted as left out); raises `ReferenceUnreadable`."""

    def answer_sink(self, message: InboundMessage) -> AnswerSink: ...


@dataclass(frozen=True, slots=True)
class Settings:
    language: texts.Language = "zh"
    policy: Policy = Policy()
    max_images: int = 8


class Conversation:
    """Answers inbound messages; one instance per adapter."""

    def __init__(
        self,
        answers: AnswerSource,
        settings: Settings,
        memory: Memory,
        *,
        cancels: Cancels | None = None,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self.answers = answers
        self.settings = settings
        self.memory = memory  # contexts and rate limits, in the store every instance shares
        self.cancels = cancels or LocalCancels()  # /cancel reaches the answer in any instance
        self.pictures = PictureCache()
        self._started = monotonic()
        self._monotonic = monotonic
        self._locks: dict[str, asyncio.Lock] = {}
        self._active: dict[str, list[RequestHandle]] = {}  # sender -> running answers
        self._stopped: dict[str, float] = {}  # message -> when a Stop for its answer came
        self._ids = itertools.count(1)

    def _t(self, key: str, **values: object) -> str:
        return texts.text(key, self.settings.language, **values)

    async def handle(
        self,
        message: InboundMessage,
        channel: ReplyChannel,
        *,
        bot_id: str,
        arrived_at: float,
        again: bool = False,
    ) -> Decision:
        """Answer *message* (or deliberately not); returns what was decided. Never raises for
        anything the user caused: they get a sentence instead (`NotNow` is no one's fault).
        *again*: the message was admitted before (its answer was cut by a restart), so the
        user's rate limit is not charged twice."""
        decision = self.settings.policy.decide(message, bot_id=bot_id, arrived_at=arrived_at)
        log.info(
            "message %s in %s from %s (%s): %s",
            message.message_id,
            message.chat_id,
            message.sender_id,
            message.raw_type,
            decision.value,
        )
        if decision is Decision.IGNORE:
            return decision
        if decision is Decision.NOT_ALLOWED:
            await channel.reply_text(message, self._t("not_allowed"))
            return decision
        if decision is Decision.STALE:
            minutes = max(1, round((arrived_at - message.created_at) / 60))
            await channel.reply_text(message, self._t("stale", minutes=minutes))
            return decision
        command = parse_command(message.text) if message.kind is MessageKind.TEXT else None
        if command is not None:
            await self._command(message, channel, *command)
            return decision
        if message.kind is MessageKind.UNSUPPORTED:
            await channel.reply_text(message, self._t("unsupported", kind=message.raw_type or "?"))
            return decision
        retry = None if again else await self.memory.take_turn(message.sender_id)
        if retry is not None:
            await channel.reply_text(message, self._t("rate_limited", seconds=max(1, round(retry))))
            return Decision.RATE_LIMITED
        lock = self._locks.setdefault(message.context_key, asyncio.Lock())
        try:
            async with lock:
                await self._answer(message, channel)
        finally:
            if not lock.locked() and self._locks.get(message.context_key) is lock:
                del self._locks[message.context_key]
        return decision

    def cancel_local(self, user: str) -> None:
        """Stop the answers to *user* running in this process (a `/cancel` from any process)."""
        for handle in list(self._active.get(user, [])):
            handle.cancel()

    def cancel_answer(self, message_id: str) -> None:
        """Stop the answer to *message_id* if it runs in this process (a Stop from any process).
        Remembered for a minute, so an answer starting meanwhile is stopped as it starts."""
        now = self._monotonic()
        self._stopped = {m: at for m, at in self._stopped.items() if now - at < STOP_MEMORY}
        self._stopped[message_id] = now
        prefix = f"feishu-{message_id}-"
        for handles in list(self._active.values()):
            for handle in list(handles):
                if handle.id.startswith(prefix):
                    handle.cancel()

    async def _command(
        self, message: InboundMessage, channel: ReplyChannel, command: Command, word: str
    ) -> None:
        if command is Command.HELP:
            reply = self._t("help")
        elif command is Command.RESET:
            await self.memory.forget(message.context_key)
            reply = self._t("reset")
        elif command is Command.CANCEL:
            user = message.sender_id
            answering = bool(self._active.get(user)) or await self.memory.answering(
                user, besides=message.message_id
            )
            await self.cancels.publish(user)
            reply = self._t("cancelled" if answering else "nothing_to_cancel")
        elif command is Command.STATUS:
            stats = self.answers.stats()
            uptime = int(self._monotonic() - self._started)
            reply = self._t(
                "status",
                model=stats.model,
                state=stats.state.value,
                queue=stats.queue_depth,
                capacity=stats.queue_capacity,
                active=stats.active,
                uptime=f"{uptime // 3600}h{uptime % 3600 // 60:02d}m{uptime % 60:02d}s",
            )
        else:
            reply = self._t("unknown_command", command=word)
        await channel.reply_text(message, reply)

    async def _answer(self, message: InboundMessage, channel: ReplyChannel) -> None:
        language = self.settings.language
        context = await self.memory.context(message.context_key)
        try:
            referenced = await self._referenced(message, context, channel)
        except ReferenceUnreadable as exc:
            log.warning("message %s: what it refers to is unreadable: %s", message.message_id, exc)
            await channel.reply_text(message, self._unreadable(exc))
            return
        refs = (*referenced.pictures, *((message.pictures,) if message.image_keys else ()))
        if refs and refs != context.pictures:  # new pictures: a new context about them
            context = Context(pictures=refs)
        pictures: list[bytes] = []
        if context.pictures:
            try:
                pictures = await self._fetch(context.pictures, channel)
            except RequestError as exc:
                log.warning("message %s: pictures not fetched: %s", message.message_id, exc)
                if isinstance(exc, TooLarge):
                    sentence = texts.error_text(exc.code, language, message=exc.message)
                else:
                    sentence = self._t("picture_failed")
                await channel.reply_text(message, sentence)
                return
        question = self._question(message, referenced)
        if not question:
            await channel.reply_text(message, self._t("help"))
            return
        prompt = context.prompt(question, pictures)
        sink = channel.answer_sink(message)
        await sink.open(self._t("thinking"))
        answer = None
        while answer is None:
            answer = await self._stream(message, prompt, sink, note=self._left_out(referenced))
        if answer:
            await self.memory.keep(message.context_key, context.then(question, answer))

    async def _referenced(
        self, message: InboundMessage, context: Context, channel: ReplyChannel
    ) -> Referenced:
        """What *message* quotes or forwards, read only when it has something of the kind."""
        if not message.quoted_id and message.kind is not MessageKind.FORWARD:
            return Referenced()
        if message.in_thread and message.quoted_id == message.root_id and context.turns:
            return Referenced()  # the thread's conversation began at its root: already in context
        room = max(0, self.settings.max_images - len(message.image_keys))
        return await channel.referenced(message, max_pictures=room)

    def _question(self, message: InboundMessage, referenced: Referenced) -> str:
        """The user's words (or a default question) after the words of what they refer to."""
        question = message.text
        if not question and message.kind is MessageKind.FORWARD:
            question = self._t("describe_forwarded")
        elif not question and (message.image_keys or referenced.pictures):
            question = self._t("describe")
        if not question:
            return ""
        before = []
        if referenced.quoted:
            before.append(self._t("quoting", text=referenced.quoted))
        if referenced.forwarded:
            before.append(self._t("forwarded", lines="\n".join(referenced.forwarded)))
        return "\n\n".join([*before, question])

    def _left_out(self, referenced: Referenced) -> str:
        messages, pictures = referenced.left_out_messages, referenced.left_out_pictures
        if messages and pictures:
            return self._t("left_out_both", messages=messages, pictures=pictures)
        if messages:
            return self._t("left_out_messages", messages=messages)
        if pictures:
            return self._t("left_out_pictures", pictures=pictures, limit=self.settings.max_images)
        return ""

    def _unreadable(self, exc: ReferenceUnreadable) -> str:
        what = self._t("what_forwarded" if exc.forwarded else "what_quoted")
        if exc.reason is Unreadable.PERMISSION:
            return self._t("reference_permission", what=what, permission=exc.permission)
        return self._t("reference_gone" if exc.reason is Unreadable.GONE else "reference_failed", what=what)

    async def _fetch(self, refs: tuple[PictureRef, ...], channel: ReplyChannel) -> list[bytes]:
        if sum(len(ref.keys) for ref in refs) > self.settings.max_images:
            raise TooLarge(f"at most {self.settings.max_images} pictures per question")
        pictures: list[bytes] = []
        for ref in refs:
            cached = self.pictures.get(ref)
            if cached is None:
                cached = tuple(await channel.fetch_images(ref))
                self.pictures.put(ref, cached)
            pictures.extend(cached)
        return pictures

    async def _stream(
        self, message: InboundMessage, prompt: list[Turn], sink: AnswerSink, *, note: str = ""
    ) -> str | None:
        """Ask once and stream the answer into *sink*; returns its text ('' when it failed or
        was cancelled: nothing to remember), None when the executor was full (the caller asks
        again); raises `NotNow` when it is not answering at all (stopping, loading). *note* is
        shown after a complete answer (e.g. what was left out of a forwarded bundle)."""
        language = self.settings.language
        request_id = f"feishu-{message.message_id}-{next(self._ids)}"
        handle = self.answers.submit(InferenceRequest(id=request_id, messages=prompt))
        active = self._active.setdefault(message.sender_id, [])
        active.append(handle)
        if message.message_id in self._stopped:  # a Stop came while it was being asked
            handle.cancel()
        text = ""
        try:
            async for event in handle:
                if isinstance(event, Delta):
                    text += event.text
                    sink.update(text)
                elif isinstance(event, Queued):
                    sink.update(self._t("queued", ahead=max(0, event.position - 1)))
                elif isinstance(event, Reading):  # pictures being read: seconds for large ones
                    sink.update(self._t("reading"))
                elif isinstance(event, Started):
                    sink.update(self._t("thinking"))
                elif isinstance(event, Done):
                    text = event.text
                    log.info(
                        "request %s done: %d prompt tokens (%d image), %d answer tokens",
                        request_id,
                        event.usage.prompt_tokens,
                        event.usage.image_tokens,
                        event.usage.completion_tokens,
                    )
                    await sink.close(f"{text}\n\n{note}" if text and note else text or "…")
                elif isinstance(event, Failed):
                    log.info("request %s failed: %s %s", request_id, event.code, event.message)
                    if not text and event.code == ErrorCode.BUSY:
                        # Full for now: wait here (the card says so); at most as many messages
                        # wait like this as the inbox lets run, the others wait on disk.
                        sink.update(self._t("queued", ahead=self.answers.stats().queue_depth))
                        await asyncio.sleep(min(max(event.retry_after or 1.0, 0.2), 5.0))
                        return None
                    if event.code == ErrorCode.UNAVAILABLE:  # stopping (or not loaded): ask again later
                        await sink.close(f"{text}\n\n{self._t('kept')}".strip())
                        raise NotNow(event.message)
                    if event.code == ErrorCode.CANCELLED:
                        await sink.close(f"{text}\n\n{self._t('cancelled_suffix')}".strip())
                    else:
                        sentence = texts.error_text(
                            event.code, language, message=event.message, retry_after=event.retry_after
                        )
                        await sink.close(f"{text}\n\n{sentence}".strip() if text else sentence)
                    return ""
            return text
        except BaseException:
            handle.cancel()
            raise
        finally:
            active.remove(handle)
            if not active:
                self._active.pop(message.sender_id, None)
