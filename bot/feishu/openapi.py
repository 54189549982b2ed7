"""Outbound Feishu Open API calls through the unmodified `lark.Client`.

`FeishuApi` is the adapter's only way to call Feishu. Contracts:

- Never stalls the event loop: the SDK's sync `Client.request` (blocking `requests`, tokens
  included) runs in a bounded thread pool of its own; a slow Feishu API therefore only slows
  the calls waiting for that pool, never the executor or the event loop. (The SDK's `a*`
  methods would fetch tokens with blocking `requests` on the loop.)
- Rate limits (HTTP 429, codes 99991400, 230020, 11232) and transient failures (5xx,
  connection errors) are retried with exponential backoff, sleeping on the loop, not in a
  thread.
- An invalidated tenant token (99991663, 99991661, 99991668) is evicted from the SDK's token
  cache and the call retried once with a fresh one.
- Every failure surfaces as `FeishuApiError` (a `server.errors.VlbridgeError`) carrying the
  Feishu `code`, `msg` and HTTP status: lark-oapi exceptions never leave this module.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import lark_oapi as lark
import orjson
from lark_oapi.core.token.manager import TokenManager

from bot.feishu import metrics
from server.errors import TooLarge, VlbridgeError

log = logging.getLogger("vlbridge.feishu.api")

T = TypeVar("T")

RATE_LIMIT_CODES = frozenset({99991400, 230020, 11232})
TOKEN_CODES = frozenset({99991663, 99991661, 99991668})


class FeishuApiError(VlbridgeError):
    """A Feishu Open API call failed for good (after retries).

    `code` is Feishu's code (or -1 for a transport failure), `status` the HTTP status (0 when no
    response came back).
    """

    def __init__(self, what: str, code: int, msg: str, status: int = 0) -> None:
        super().__init__(f"{what}: Feishu code {code} (HTTP {status}): {msg}")
        self.what = what
        self.code = code
        self.msg = msg
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.code in RATE_LIMIT_CODES or self.status >= 500 or self.code == -1


class FeishuApi:
    """Typed helpers for the handful of calls the adapter makes; call `close()` at the end."""

    def __init__(
        self,
        app_id: str,
        app_secret: str,
        domain: str,
        *,
        max_workers: int = 16,
        timeout: float = 15.0,
        attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
    ) -> None:
        self.app_id = app_id
        self.client = (
            lark.Client.builder()
            .app_id(app_id)
            .app_secret(app_secret)
            .domain(domain.rstrip("/"))
            .timeout(timeout)
            .log_level(lark.LogLevel.WARNING)
            .build()
        )
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="feishu-api")
        self.calls = 0
        self.retries = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the generic call -------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        uri: str,
        *,
        what: str,
        body: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        paths: Mapping[str, str] | None = None,
        queries: list[tuple[str, str]] | None = None,
        raw: bool = False,
        kind: str = "other",
    ) -> Any:
        """One call with retries; returns the JSON ``data`` object (or the body bytes if *raw*).

        A callable *body* is called once per attempt (CardKit needs a fresh ``sequence`` for a
        retry: the platform may have applied the attempt whose answer was lost). Every attempt
        is counted in ``vlbridge_feishu_api_calls_total{kind}`` (each one counts against the
        tenant's quota).
        """
        token_retried = False
        attempt = 0
        while True:
            attempt += 1
            self.calls += 1
            metrics.API_CALLS.labels(kind).inc()
            try:
                payload = body() if callable(body) else body
                return await self._once(method, uri, what, payload, paths, queries, raw)
            except FeishuApiError as exc:
                if exc.code in TOKEN_CODES and not token_retried:
                    token_retried = True
                    log.warning("%s: tenant token rejected (%d); fetching a fresh one", what, exc.code)
                    self._evict_token()
                    continue
                if not exc.retryable or attempt >= self.attempts:
                    raise
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (
                    0.75 + random.random() / 2
                )
                self.retries += 1
                log.info("%s; retry %d in %.2f s", exc, attempt, delay)  # str(exc) names the call
                await asyncio.sleep(delay)

    async def _once(
        self,
        method: str,
        uri: str,
        what: str,
        body: Mapping[str, Any] | None,
        paths: Mapping[str, str] | None,
        queries: list[tuple[str, str]] | None,
        raw: bool,
    ) -> Any:
        request = (
            lark.BaseRequest.builder()
            .http_method(lark.HttpMethod[method])
            .uri(uri)
            .token_types({lark.AccessTokenType.TENANT})
            .paths(dict(paths or {}))
            .queries(list(queries or []))
            .body(dict(body) if body is not None else None)
            .build()
        )
        response = await self._in_pool(lambda: self._request(request, what))
        status = int(response.raw.status_code or 0) if response.raw is not None else 0
        code = response.code if response.code is not None else (0 if 200 <= status < 300 else -1)
        if status == 429 or code != 0 or not 200 <= status < 300:
            raise FeishuApiError(what, int(code if code != 0 else -1), str(response.msg or ""), status)
        content: bytes = response.raw.content or b""
        if raw:
            return content
        try:
            payload = orjson.loads(content) if content else {}
        except orjson.JSONDecodeError:
            raise FeishuApiError(what, -1, "response is not JSON", status) from None
        return payload.get("data") or {}

    def _request(self, request: Any, what: str) -> Any:
        """On a pool thread: the SDK call, its exceptions translated."""
        try:
            return self.client.request(request)
        except lark.core.exception.ObtainAccessTokenException as exc:
            code = int(getattr(exc, "code", -1) or -1)
            raise FeishuApiError(f"{what} (tenant token)", code, str(getattr(exc, "msg", exc))) from None
        except Exception as exc:  # requests' connection errors and timeouts
            raise FeishuApiError(what, -1, f"{type(exc).__name__}: {exc}") from None

    async def _in_pool(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def _evict_token(self) -> None:
        # The SDK caches the tenant token process-wide until expiry-600 s and keeps using a token
        # Feishu invalidated early; expiring the entry makes the next call fetch a new one.
        TokenManager.cache.set(f"self_tenant_token:{self.app_id}", "", 0)

    # -- the calls the adapter makes --------------------------------------------------------------

    async def bot_open_id(self) -> str:
        """The bot's own open_id (GET /open-apis/bot/v3/info; ``bot`` is at the top level)."""
        content = await self.call("GET", "/open-apis/bot/v3/info", what="bot info", raw=True, kind="bot_info")
        info = orjson.loads(content).get("bot") or {}
        open_id = str(info.get("open_id") or "")
        if not open_id:
            raise FeishuApiError("bot info", -1, "no bot.open_id in the answer")
        return open_id

    async def download_image(self, message_id: str, image_key: str, *, max_bytes: int) -> bytes:
        """A picture of a message; raises `TooLarge` past *max_bytes*."""
        data: bytes = await self.call(
            "GET",
            "/open-apis/im/v1/messages/:message_id/resources/:file_key",
            what=f"download {image_key}",
            paths={"message_id": message_id, "file_key": image_key},
            queries=[("type", "image")],
            raw=True,
            kind="resource",
        )
        if len(data) > max_bytes:
            raise TooLarge(f"picture of {len(data)} bytes; the limit is {max_bytes}")
        return data

    async def get_message(self, message_id: str) -> list[dict[str, Any]]:
        """A message as ``GET /open-apis/im/v1/messages/{id}`` gives it: a list of items, the
        message first; for a ``merge_forward`` bundle every message inside it follows, nested
        bundles' too, each naming its bundle in ``upper_message_id``."""
        data = await self.call(
            "GET",
            "/open-apis/im/v1/messages/:message_id",
            what=f"get message {message_id}",
            paths={"message_id": message_id},
            kind="message_get",
        )
        return [item for item in data.get("items") or () if isinstance(item, dict)]

    async def reply(
        self, message_id: str, msg_type: str, content: Mapping[str, Any], *, in_thread: bool, uuid: str
    ) -> str:
        """Reply to *message_id*; returns the new message's id. *uuid* makes retries idempotent."""
        data = await self.call(
            "POST",
            "/open-apis/im/v1/messages/:message_id/reply",
            what=f"reply to {message_id}",
            paths={"message_id": message_id},
            body={
                "msg_type": msg_type,
                "content": orjson.dumps(content).decode(),
                "reply_in_thread": in_thread,
                "uuid": uuid[:50],
            },
            kind="reply",
        )
        return str(data.get("message_id") or "")

    async def create_card(self, card: Mapping[str, Any]) -> str:
        data = await self.call(
            "POST",
            "/open-apis/cardkit/v1/cards",
            what="create card",
            body={"type": "card_json", "data": orjson.dumps(card).decode()},
            kind="card_create",
        )
        card_id = str(data.get("card_id") or "")
        if not card_id:
            raise FeishuApiError("create card", -1, "no card_id in the answer")
        return card_id

    async def card_content(
        self, card_id: str, element_id: str, content: str, sequence: Callable[[], int]
    ) -> None:
        """Set an element's full text; *sequence* gives a new, larger number per attempt."""
        await self.call(
            "PUT",
            "/open-apis/cardkit/v1/cards/:card_id/elements/:element_id/content",
            what=f"card {card_id} content",
            paths={"card_id": card_id, "element_id": element_id},
            body=lambda: {"content": content, "sequence": sequence()},
            kind="card_update",
        )

    async def card_settings(
        self, card_id: str, settings: Mapping[str, Any], sequence: Callable[[], int]
    ) -> None:
        text = orjson.dumps(settings).decode()
        await self.call(
            "PATCH",
            "/open-apis/cardkit/v1/cards/:card_id/settings",
            what=f"card {card_id} settings",
            paths={"card_id": card_id},
            body=lambda: {"settings": text, "sequence": sequence()},
            kind="card_update",
        )

    async def card_replace(self, card_id: str, card: Mapping[str, Any], sequence: Callable[[], int]) -> None:
        """Replace the whole card (text, buttons and settings in one call)."""
        data = orjson.dumps(card).decode()
        await self.call(
            "PUT",
            "/open-apis/cardkit/v1/cards/:card_id",
            what=f"card {card_id} update",
            paths={"card_id": card_id},
            body=lambda: {"card": {"type": "card_json", "data": data}, "sequence": sequence()},
            kind="card_update",
        )

    async def add_reaction(self, message_id: str, emoji_type: str) -> str:
        """React to a message; returns the reaction's id (to remove it later)."""
        data = await self.call(
            "POST",
            "/open-apis/im/v1/messages/:message_id/reactions",
            what=f"reaction on {message_id}",
            paths={"message_id": message_id},
            body={"reaction_type": {"emoji_type": emoji_type}},
            kind="reaction",
        )
        return str(data.get("reaction_id") or "")

    async def delete_reaction(self, message_id: str, reaction_id: str) -> None:
        await self.call(
            "DELETE",
            "/open-apis/im/v1/messages/:message_id/reactions/:reaction_id",
            what=f"reaction {reaction_id} off {message_id}",
            paths={"message_id": message_id, "reaction_id": reaction_id},
            kind="reaction",
        )
