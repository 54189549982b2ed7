"""``FakeFeishu``: the facade tests use. It wires the routes to one state, one record store and one
fault plan, runs them in a ``ServerThread`` and offers the controls and waits tests need.

Thread model: the server runs on its own thread and loop. Every public method here may be called from
any thread (a sync test, an async test's loop, the SDK's thread); methods that touch the long
connection hop onto the server loop and return once it has acted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..waiting import DEADLINE
from . import codes, ids
from .cardkit import CardKit
from .events import EventFactory, User
from .faults import Fault, FaultPlan, Route
from .frames import ClientConfig
from .longconn import LongConn, Push
from .openapi import BotIdentity, OpenApi
from .records import Ack, CardRecord, ConnectionRecord, Records, SentMessage
from .routing import Endpoints, json_response
from .server import ServerThread
from .state import KnownMessage, PlatformState, resource_keys
from .webhook import WebhookRequest, build_request

T = TypeVar("T")


class FakeFeishu:
    """A fake Feishu Open Platform on 127.0.0.1 that the unmodified lark-oapi SDK talks to.

    ``app_id`` defaults to a fresh random id per instance on purpose: the SDK caches tenant tokens
    process-wide per app_id, and a token issued by one fake means nothing to the next.
    """

    def __init__(
        self,
        *,
        app_id: str | None = None,
        app_secret: str = "fake-app-secret",
        encrypt_key: str = "fake-encrypt-key",
        verification_token: str = "fake-verification-token",
        tenant_key: str = "fake-tenant",
        bot_name: str = "vlbridge-test-bot",
        client_config: ClientConfig | None = None,
        token_expire_s: int = 7200,
        strict_messages: bool = True,
        card_streaming_lifetime_s: float = 600.0,
        seed: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.app_id = app_id or ids.app_id()
        self.app_secret = app_secret
        self.encrypt_key = encrypt_key
        self.verification_token = verification_token
        self.tenant_key = tenant_key
        self.bot = User(name=bot_name)
        self.records = Records()
        self.faults = FaultPlan()
        self.state = PlatformState(app_id=self.app_id, app_secret=app_secret, token_expire_s=token_expire_s)
        self.events = EventFactory(
            app_id=self.app_id, token=verification_token, tenant_key=tenant_key, bot=self.bot
        )
        endpoints = Endpoints(self.state, self.records, self.faults)
        cards = CardKit(endpoints, streaming_lifetime_s=card_streaming_lifetime_s)
        openapi = OpenApi(
            endpoints,
            BotIdentity(self.bot.open_id, bot_name, tenant_key),
            strict_messages=strict_messages,
            bind_card=cards.bind,
        )
        self._longconn = LongConn(endpoints, client_config or ClientConfig(), seed=seed)
        app = Starlette(
            routes=[*openapi.routes(), *cards.routes(), *self._longconn.routes()],
            exception_handlers={HTTPException: _http_error},
        )
        self._server = ServerThread(app, host)

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The ``domain`` to give ``lark.Client`` and ``lark.ws.Client``, e.g. http://127.0.0.1:PORT."""
        return self._server.url

    def start(self) -> FakeFeishu:
        self._server.start()
        return self

    def stop(self) -> None:
        """Close long connections (code 1001), then stop the server; safe to call twice."""
        if self._server.running:
            self._server.call_async(self._longconn.shutdown)
        self._server.stop()

    def __enter__(self) -> FakeFeishu:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- platform state ---------------------------------------------------------------------------

    def register_event(
        self, event: Mapping[str, Any], resources: Mapping[str, bytes] | None = None
    ) -> KnownMessage:
        """Make an event's message known (to reply to it, download its pictures) without pushing it."""
        return self.state.register_event(dict(event), dict(resources or {}))

    def forward(
        self,
        messages: Sequence[Mapping[str, Any]],
        resources: Mapping[str, bytes] | None = None,
        **kw: Any,
    ) -> dict[str, Any]:
        """A bundle (``merge_forward``) of *messages* (event bodies: ``events.image(...)``, a nested
        ``forward(...)``), known to the platform with their *resources* (each key to the message
        that names it); returns the bundle's event (kw: ``EventFactory.message`` arguments)."""
        bundle = self.events.merge_forward(**kw)
        bundle_id = str(bundle["event"]["message"]["message_id"])
        given = dict(resources or {})
        for event in messages:
            message = event["event"]["message"]
            content = {} if message["message_type"] == "merge_forward" else json.loads(message["content"])
            mine = {
                key: given.pop(key) for key in resource_keys(message["message_type"], content) if key in given
            }
            self.state.register_event(dict(event), mine, upper_message_id=bundle_id)
        if given:
            raise ValueError(f"resources {sorted(given)} are not referred to by any forwarded message")
        return bundle

    def revoke_scope(self, scope: str) -> None:
        """Take a scope from the app (e.g. ``im:message.group_msg``): calls that need it fail."""
        self.state.scopes.discard(scope)

    def add_resource(
        self,
        message_id: str,
        key: str,
        data: bytes,
        *,
        kind: str = "image",
        file_name: str | None = None,
        content_type: str | None = None,
    ) -> None:
        self.state.add_resource(
            message_id, key, data, kind=kind, file_name=file_name, content_type=content_type
        )

    def invalidate_tokens(self) -> int:
        """Invalidate every tenant token issued so far: calls using one get 99991663."""
        return self.state.invalidate_tokens()

    @property
    def client_config(self) -> ClientConfig:
        return self._longconn.config

    def set_client_config(self, config: ClientConfig) -> None:
        """Used by later discoveries and carried by pongs (the SDK adopts it on the next pong)."""
        self._call(lambda: setattr(self._longconn, "config", config))

    # -- long connection --------------------------------------------------------------------------

    def push_event(
        self,
        event: Mapping[str, Any],
        *,
        resources: Mapping[str, bytes] | None = None,
        parts: int = 1,
        copies: int = 1,
        retry_unacked_after_s: float | None = None,
        max_retries: int = 4,
    ) -> str:
        """Deliver an event over the long connection; returns its ``event_id``.

        The message becomes known with its ``resources`` (see ``register_event``). ``parts`` splits
        it into that many frames; ``copies`` delivers it that many times at once (what the platform
        does when an ack is lost); ``retry_unacked_after_s`` delivers it again, up to
        ``max_retries`` times, while no code-200 ack came back. With no connection open the
        delivery waits for the next one. Returns once the frames are queued on the server loop.
        """
        if event["header"].get("event_type") == "im.message.receive_v1":
            self.register_event(event, resources)
        push = Push(
            event_id=str(event["header"]["event_id"]),
            payload=json.dumps(dict(event), ensure_ascii=False).encode(),
            parts=parts,
            copies=copies,
            retry_unacked_after_s=retry_unacked_after_s,
            max_retries=max_retries,
        )
        self._call(lambda: self._longconn.push(push))
        return push.event_id

    def drop_connections(self, code: int = 1001) -> int:
        """Close every open long connection from the server side; returns how many."""
        return self._call(lambda: self._longconn.drop(code))

    def fail_discovery(
        self,
        times: int = 1,
        code: int = codes.WS_EXCEED_CONN_LIMIT,
        msg: str = "fault injected by fakefeishu",
    ) -> None:
        """Make the next ``times`` discoveries answer ``code`` (HTTP 200). The SDK retries codes 1
        and 1000040343 and gives up for good on any other (the default here)."""
        self.faults.inject(Route.WS_ENDPOINT, Fault(code=code, status=200, msg=msg), times)

    def set_answer_pings(self, enabled: bool) -> None:
        """With False the socket stays open but pings get no pong (a half-dead connection)."""
        self._call(lambda: setattr(self._longconn, "answer_pings", enabled))

    # -- webhook ----------------------------------------------------------------------------------

    def webhook_request(
        self, event: Mapping[str, Any], *, encrypt: bool = True, sign: bool = True
    ) -> WebhookRequest:
        """The POST Feishu would make for ``event`` to this app's webhook (encrypted and signed)."""
        return build_request(event, encrypt_key=self.encrypt_key if encrypt else "", sign=sign)

    # -- waiting ----------------------------------------------------------------------------------

    async def wait_for(
        self, predicate: Callable[[], T | None], timeout: float = DEADLINE, what: str = "condition"
    ) -> T:
        """Poll ``predicate`` (every 5 ms) until truthy and return its value; ``TimeoutError`` after
        ``timeout`` s, naming ``what`` and summarising the records."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}; {self.records.summary()}")
            await asyncio.sleep(0.005)

    def wait_until(
        self, predicate: Callable[[], T | None], timeout: float = DEADLINE, what: str = "condition"
    ) -> T:
        """Blocking twin of ``wait_for`` for sync tests and threads (woken by record changes)."""
        return self.records.wait_until(predicate, timeout, what)

    async def wait_for_replies(self, n: int = 1, timeout: float = DEADLINE) -> list[SentMessage]:
        return await self.wait_for(_at_least(n, self.records.replies), timeout, f"{n} replies")

    async def wait_for_acks(
        self, n: int = 1, event_id: str | None = None, timeout: float = DEADLINE
    ) -> list[Ack]:
        return await self.wait_for(
            _at_least(n, lambda: self.records.acks(event_id)),
            timeout,
            f"{n} acks for {event_id or 'any event'}",
        )

    async def wait_for_connections(self, n: int = 1, timeout: float = DEADLINE) -> list[ConnectionRecord]:
        """Until ``n`` connections were opened in total and one is open now."""

        def ready() -> list[ConnectionRecord] | None:
            conns = self.records.connections()
            return conns if len(conns) >= n and any(c.open for c in conns) else None

        return await self.wait_for(ready, timeout, f"{n} connections (one open)")

    async def wait_for_closed_cards(self, n: int = 1, timeout: float = DEADLINE) -> list[CardRecord]:
        closed = _at_least(n, lambda: [c for c in self.records.cards() if c.closed])
        return await self.wait_for(closed, timeout, f"{n} closed cards")

    def _call(self, fn: Callable[[], T]) -> T:
        return self._server.call(fn)


def _at_least(n: int, items: Callable[[], list[T]]) -> Callable[[], list[T] | None]:
    def check() -> list[T] | None:
        found = items()
        return found if len(found) >= n else None

    return check


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return json_response(
        {"code": status, "msg": f"{status} page not found: {request.url.path}", "data": {}}, status
    )
