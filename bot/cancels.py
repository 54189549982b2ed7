"""`/cancel` reaches the answer wherever it runs.

With several services on one inbox, a user's `/cancel` is answered by whichever service takes it,
while their answer may stream from another. `Cancels.publish(user)` tells every service (this one
included) to stop *user*'s answers; each calls its `on_cancel(user)`, which cancels the answers it
runs for them (`bot.conversation.Conversation.cancel_local`).

`LocalCancels` is for a store that one service holds alone (SQLite). `RedisCancels` publishes on a
Redis channel beside the inbox and listens on it with redis-py's asyncio client: a subscription is
a long-lived read, the one Redis use here that belongs on the event loop rather than on the inbox
thread. A lost subscription is re-established with backoff, and logged once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("vlbridge.bot")

OnCancel = Callable[[str], None]

# A target is a user (`/cancel`: all their answers) or ``answer:<message id>`` (a Stop button:
# that answer only). Platform user ids never start so.
ANSWER_PREFIX = "answer:"


class Cancels(Protocol):
    def start(self, on_cancel: OnCancel) -> None:
        """Deliver every service's cancels (this one's too) to *on_cancel* from now on."""

    async def publish(self, user: str) -> None:
        """Stop *user*'s answers in every service."""

    async def stop(self) -> None: ...


class LocalCancels:
    """One service: a cancel is delivered at once, here."""

    def __init__(self) -> None:
        self._on_cancel: OnCancel | None = None

    def start(self, on_cancel: OnCancel) -> None:
        self._on_cancel = on_cancel

    async def publish(self, user: str) -> None:
        if self._on_cancel is not None:
            self._on_cancel(user)

    async def stop(self) -> None:
        self._on_cancel = None


class RedisCancels:
    """Cancels on the Redis channel ``<prefix>:{<platform>}:cancels``."""

    def __init__(self, url: str, *, prefix: str, platform: str, retry: float = 1.0) -> None:
        import redis.asyncio  # imported only when the Redis backend is used

        from bot.inbox_redis import redacted

        self.where = redacted(url)
        self.channel = f"{prefix}:{{{platform}}}:cancels"
        self.retry = retry
        self._redis = redis.asyncio.Redis.from_url(url)
        self._on_cancel: OnCancel | None = None
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()  # set while the subscription is up

    def start(self, on_cancel: OnCancel) -> None:
        self._on_cancel = on_cancel
        self._task = asyncio.get_running_loop().create_task(self._listen(), name="cancels")

    async def publish(self, user: str) -> None:
        if self._on_cancel is not None:
            self._on_cancel(user)  # here at once; the others through Redis (this one again: harmless)
        try:
            await self._redis.publish(self.channel, user)
        except Exception as exc:  # the local answers are stopped; the others cannot be reached
            log.error("cancel of %s not sent to the other services (redis %s): %s", user, self.where, exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._redis.aclose()

    async def _listen(self) -> None:
        failing = False
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    self.subscribed.set()
                    if failing:
                        log.info("cancels: listening on redis %s again", self.where)
                        failing = False
                    async for message in pubsub.listen():
                        data = message.get("data")
                        if isinstance(data, bytes) and self._on_cancel is not None:
                            self._on_cancel(data.decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed.clear()
                if not failing:
                    log.error(
                        "cancels: redis %s unreachable (%s); a /cancel reaches only this service's "
                        "answers until it is back; retrying every %.0f s",
                        self.where,
                        exc,
                        self.retry,
                    )
                    failing = True
                await asyncio.sleep(self.retry)
