"""The receipt: a reaction on a user's message while it waits for room, so they see at once
that the bot has it.

When: the moment the dispatcher leaves a message waiting because the executor is full (the
same moment its card shows its place in the queue); a message answered at once gets none.
Removed when its answer starts. So a message costs at most one add and one delete, and only
if it waited. Kept in memory by the service that showed it: after a restart, or when another
service sharing the inbox starts the message, the reaction stays (harmless: it only said "got it").
"""

from __future__ import annotations

import logging

from bot.feishu.ids import reply_target
from bot.feishu.openapi import FeishuApi, FeishuApiError

log = logging.getLogger("vlbridge.feishu.receipts")

_ADDING = ""  # the reaction's id while the add is in flight


class Receipts:
    def __init__(self, api: FeishuApi, emoji: str) -> None:
        self.api = api
        self.emoji = emoji  # a Feishu emoji_type, e.g. "OnIt"; "" turns receipts off
        self._shown: dict[str, str] = {}  # answer id -> reaction id (or _ADDING)

    def __contains__(self, answer_id: str) -> bool:
        return answer_id in self._shown

    async def show(self, answer_id: str) -> None:
        """React on the answer's message, once (never raises)."""
        if not self.emoji or answer_id in self._shown:
            return
        self._shown[answer_id] = _ADDING
        target = reply_target(answer_id)
        try:
            reaction = await self.api.add_reaction(target, self.emoji)
        except FeishuApiError as exc:
            log.info("message %s: no receipt (%s)", answer_id, exc)
            return
        if answer_id in self._shown:
            self._shown[answer_id] = reaction
        else:  # its answer started while the reaction was being added
            await self._remove(target, reaction)

    async def clear(self, answer_id: str) -> None:
        """Remove the answer's receipt, if it has one (never raises)."""
        reaction = self._shown.pop(answer_id, None)
        if reaction:
            await self._remove(reply_target(answer_id), reaction)

    async def _remove(self, message_id: str, reaction: str) -> None:
        try:
            await self.api.delete_reaction(message_id, reaction)
        except FeishuApiError as exc:
            log.info("message %s: receipt %s not removed (%s)", message_id, reaction, exc)
