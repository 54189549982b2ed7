"""From the inbox to the answers: arrival order per conversation, overload waiting on disk.

`Dispatcher` takes received messages from the `bot.inbox.Inbox` to a handler (the adapter's
"answer this message"), with three rules:

- per conversation (chat, or thread in a chat) one message at a time, in arrival order: the
  head of each idle conversation is chosen by the database, so a long queue in one chat never
  hides the other chats' messages;
- only while the answer source has room (`room()`, e.g. a free place in the executor's queue):
  when it is full, messages stay on disk, not in memory; at most `max_running` handlers at once;
- a handler that raises `bot.conversation.NotNow` (the answer source is stopping or not
  loaded) puts its message back, unchanged in order, for later (or the next start).

The dispatcher moves each message received -> running before the handler and running ->
(the handler's `Outcome`) after it; a handler that raises is a failure with the exception as
reason; a handler cancelled by `stop()` puts its message back (answered after the restart).
New arrivals call `wake()`; anything else that adds work (an admin's `vlbridge inbox retry`)
is found by polling every `poll` seconds.

Several processes may dispatch from one shared inbox: a start is leased for `lease` seconds
(the owner renews the leases of `running_ids`, and takes over ended ones: the adapter's job),
and a message another process started first is simply skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bot.conversation import NotNow
from bot.inbox import Inbox, InboxState, StoredMessage, TransitionError
from server import metrics

log = logging.getLogger("vlbridge.dispatch")


@dataclass(frozen=True, slots=True)
class Outcome:
    state: InboxState  # answered, failed or ignored
    reason: str = ""


Handler = Callable[[StoredMessage], Awaitable[Outcome]]


class Dispatcher:
    def __init__(
        self,
        inbox: Inbox,
        handler: Handler,
        *,
        room: Callable[[], int],
        max_running: int,
        poll: float = 2.0,
        on_idle: Callable[[], Awaitable[None]] | None = None,
        lease: float = math.inf,
    ) -> None:
        self.inbox = inbox
        self.handler = handler
        self.room = room
        self.max_running = max(1, max_running)
        self.poll = poll
        self.on_idle = on_idle  # called when messages wait for room (e.g. to show queue places)
        self.lease = lease  # seconds a started message is held before others may take it over
        self.counts: dict[str, int] = {state.value: 0 for state in InboxState}
        self._running: dict[str, asyncio.Task[None]] = {}  # context_key -> its handler
        self._ids: dict[str, str] = {}  # context_key -> the message its handler answers
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._accepting = False
        self._quiet = False  # the last pass found nothing to do

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def running_ids(self) -> list[str]:
        """The messages being answered here (their leases are this process's to renew)."""
        return list(self._ids.values())

    @property
    def idle(self) -> bool:
        """Nothing running, nothing pending, nothing new to look at: the last pass found nothing
        to do and no pass is under way (a pass clears `_wake` before it reads the inbox)."""
        return self._quiet and not self._running and not self._wake.is_set()

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._accepting = True
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="inbox-dispatch")

    async def drain(self, within: float) -> None:
        """Start nothing new; give the running handlers *within* seconds."""
        self._accepting = False
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        running = set(self._running.values())
        if running:
            await asyncio.wait(running, timeout=max(0.0, within))

    async def stop(self) -> None:
        """Cancel what still runs; their messages go back to `received` (answered next start)."""
        await self.drain(0.0)
        running = set(self._running.values())
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=2.0)

    # -- the loop ---------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while self._accepting:
            self._wake.clear()
            self._quiet = False
            waiting = False
            try:
                waiting = await self._fill()
                self.counts = await self.inbox.run(self.inbox.db.counts)
                for state, count in self.counts.items():
                    metrics.INBOX_MESSAGES.labels(state).set(count)
                pending = self.counts[InboxState.RECEIVED] + self.counts[InboxState.RUNNING]
                self._quiet = not pending and not self._running
                if waiting and self.on_idle is not None:
                    await self.on_idle()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("inbox dispatch failed; trying again in %.0f s", self.poll)
            with contextlib.suppress(TimeoutError):
                # Messages waiting for room: look again soon (room is not an event we are told of).
                await asyncio.wait_for(self._wake.wait(), 0.25 if waiting else self.poll)

    async def _fill(self) -> bool:
        """Start what may start now; True when received messages are left waiting for room."""
        free = min(self.room(), self.max_running - len(self._running))
        busy = tuple(self._running)
        heads = await self.inbox.run(self.inbox.db.heads, busy, max(free, 1))
        if not heads:
            return False
        if free <= 0:
            return True
        for message in heads[:free]:
            if not self._accepting:
                return True
            try:
                started = await self.inbox.run(
                    self.inbox.db.start, message.message_id, time.time() + self.lease
                )
            except TransitionError as exc:  # another process sharing the inbox started it first
                log.debug("message %s not started here: %s", message.message_id, exc)
                continue
            except Exception:
                log.exception("message %s could not be started", message.message_id)
                continue
            task = asyncio.get_running_loop().create_task(
                self._handle(started), name=f"message-{message.message_id}"
            )
            self._running[message.context_key] = task
            self._ids[message.context_key] = message.message_id
            task.add_done_callback(functools.partial(self._done, message.context_key))
        return len(heads) > free

    def _done(self, key: str, _: object) -> None:
        self._running.pop(key, None)
        self._ids.pop(key, None)
        self._wake.set()

    async def _handle(self, message: StoredMessage) -> None:
        try:
            outcome = await self.handler(message)
        except NotNow:
            log.info("message %s: not answerable now; back to the inbox", message.message_id)
            await asyncio.shield(self.inbox.run(self.inbox.db.requeue, message.message_id))
            return
        except asyncio.CancelledError:
            log.info(
                "message %s: stopped before its answer ended; kept for the next start", message.message_id
            )
            await asyncio.shield(self.inbox.run(self.inbox.db.requeue, message.message_id))
            raise
        except Exception as exc:
            log.exception("message %s: handling failed", message.message_id)
            outcome = Outcome(InboxState.FAILED, f"{type(exc).__name__}: {exc}"[:500])
        try:
            await asyncio.shield(
                self.inbox.run(self.inbox.db.finish, message.message_id, outcome.state, outcome.reason)
            )
        except Exception:
            log.exception("message %s: its outcome could not be recorded", message.message_id)
