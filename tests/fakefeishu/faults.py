"""Fault injection: make the next N calls of a route fail, or be slow.

A ``FaultPlan`` is shared by the HTTP routes and the discovery endpoint; tests arm it from any
thread. Each call of a route consumes at most one armed fault, first armed first used.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from dataclasses import dataclass
from enum import StrEnum

from . import codes


class Route(StrEnum):
    """Every endpoint of the fake, by role (not by URL)."""

    TENANT_TOKEN = "auth.tenant_access_token"
    WS_ENDPOINT = "ws.endpoint"
    BOT_INFO = "bot.info"
    MESSAGE_CREATE = "im.message.create"
    MESSAGE_REPLY = "im.message.reply"
    MESSAGE_PATCH = "im.message.patch"
    MESSAGE_GET = "im.message.get"
    MESSAGE_RESOURCE = "im.message_resource.get"
    REACTION_CREATE = "im.message.reaction.create"
    REACTION_DELETE = "im.message.reaction.delete"
    CARD_CREATE = "cardkit.card.create"
    CARD_UPDATE = "cardkit.card.update"
    CARD_SETTINGS = "cardkit.card.settings"
    CARD_ELEMENT_CONTENT = "cardkit.card_element.content"


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour.

    ``delay_s`` is waited before anything else. With ``code`` None the call then proceeds normally
    (a slow call); otherwise it answers ``{"code": code, "msg": msg, "data": {}}`` with ``status``.
    """

    code: int | None = None
    status: int = 400
    msg: str = "fault injected by fakefeishu"
    delay_s: float = 0.0

    @classmethod
    def slow(cls, delay_s: float) -> Fault:
        return cls(delay_s=delay_s)

    @classmethod
    def error(cls, code: int, status: int = 400, msg: str = "fault injected by fakefeishu") -> Fault:
        return cls(code=code, status=status, msg=msg)


RATE_LIMITED = Fault(codes.RATE_LIMITED, 429, "request trigger frequency limit")
CHAT_RATE_LIMITED = Fault(codes.CHAT_RATE_LIMITED, 400, "The request you send is too frequent")
MESSAGE_RATE_LIMITED = Fault(codes.MESSAGE_RATE_LIMITED, 400, "create message trigger rate limit")
TOKEN_INVALID = Fault(codes.TOKEN_INVALID, 400, "Invalid access token for authorization.")
SERVER_ERROR = Fault(1, 500, "internal error")


class FaultPlan:
    """Thread-safe queues of armed faults per route."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[Route, deque[Fault]] = defaultdict(deque)

    def inject(self, route: Route, fault: Fault, times: int = 1) -> None:
        """Arm ``fault`` for the next ``times`` calls of ``route`` (after those already armed)."""
        if times < 1:
            raise ValueError(f"expected times >= 1, got {times}")
        with self._lock:
            self._armed[route].extend([fault] * times)

    def take(self, route: Route) -> Fault | None:
        """Consume the next armed fault for ``route``, if any."""
        with self._lock:
            queue = self._armed.get(route)
            return queue.popleft() if queue else None

    def pending(self, route: Route) -> int:
        with self._lock:
            return len(self._armed.get(route, ()))

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()
