"""The receipt: a reaction on a user's message while it waits for room, so they see at once
that the bot has it.

When: the moment the dispatcher leaves a message waiting because the executor is full (the
same moment its card shows its place in the queue); a message answered at once gets none.
Removed when its answer starts. So a message costs at most one add and one delete, and only
if it waited.

The reaction's id is recorded in the inbox (`receipt_id`), so that whichever service starts
the message removes it: this one, another sharing the inbox, or this one after a restart.
The first recorded is the message's receipt (`claim_receipt`: services whose executors are all
full each show the waiting messages, and a second reaction is removed at once); services
racing to remove it ask the inbox first (`take_receipt`): one of them is told to.
A message started while its reaction was being added is seen by the service that added it
(here, or in the inbox after recording the id), which then removes it itself.
"""

from __future__ import annotations

import logging

from bot.feishu.ids import reply_target
from bot.feishu.openapi import FeishuApi, FeishuApiError
from bot.inbox import Inbox, InboxState, StorageError, StoredMessage

log = logging.getLogger("vlbridge.feishu.receipts")


class Receipts:
    def __init__(self, api: FeishuApi, emoji: str, inbox: Inbox) -> None:
        self.api = api
        self.emoji = emoji  # a Feishu emoji_type, e.g. "OnIt"; "" turns receipts off
        self.inbox = inbox
        self._adding: set[str] = set()  # answer ids whose reaction is being added

    async def show(self, answer_id: str) -> None:
        """React on the answer's message, once, and record the reaction (never raises)."""
        if not self.emoji or answer_id in self._adding:
            return
        self._adding.add(answer_id)
        target = reply_target(answer_id)
        try:
            reaction = await self.api.add_reaction(target, self.emoji)
        except FeishuApiError as exc:
            self._adding.discard(answer_id)
            log.info("message %s: no receipt (%s)", answer_id, exc)
            return
        if answer_id not in self._adding:  # its answer started here meanwhile (`clear`)
            await self._remove(target, reaction)
            return
        self._adding.discard(answer_id)
        try:
            recorded = await self.inbox.run(self.inbox.db.claim_receipt, answer_id, reaction)
            stored = await self.inbox.run(self.inbox.db.get, answer_id)
        except StorageError as exc:  # unrecorded: removed now rather than left for good
            log.warning("message %s: receipt not recorded (%s)", answer_id, exc)
            await self._remove(target, reaction)
            return
        if recorded != reaction:  # another service's came first (or the message is gone)
            await self._remove(target, reaction)
        elif stored is None or stored.state is not InboxState.RECEIVED:  # started before the record
            await self._take(answer_id, reaction)

    async def clear(self, stored: StoredMessage) -> None:
        """Its answer starts: remove the message's receipt, if it has one (never raises).
        *stored* is the message as its start read it."""
        self._adding.discard(stored.message_id)  # one being added here: `show` removes it then
        if stored.receipt_id:  # recorded (by any service; not the one being added here)
            await self._take(stored.message_id, stored.receipt_id)

    def owed(self, stored: StoredMessage) -> bool:
        """Whether starting *stored* has a receipt to remove."""
        return bool(stored.receipt_id) or stored.message_id in self._adding

    async def _take(self, answer_id: str, reaction: str) -> None:
        try:
            taken = await self.inbox.run(self.inbox.db.take_receipt, answer_id, reaction)
        except StorageError as exc:
            log.warning("message %s: receipt %s left (%s)", answer_id, reaction, exc)
            return
        if taken:
            await self._remove(reply_target(answer_id), reaction)

    async def _remove(self, message_id: str, reaction: str) -> None:
        try:
            await self.api.delete_reaction(message_id, reaction)
        except FeishuApiError as exc:
            log.info("message %s: receipt %s not removed (%s)", message_id, reaction, exc)
