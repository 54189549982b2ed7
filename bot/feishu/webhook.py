"""Receiving events by webhook: ``POST /feishu/events`` through `lark.EventDispatcherHandler`.

Contract: persist before ack. The SDK's synchronous `handler.do` (decryption, token check,
dispatch) runs on a worker thread, never on the event loop; the events it dispatches are
collected for this one request, and `persist(events)` (the adapter: into the inbox, off the
loop) must succeed before the 200 goes out. If it fails the platform gets a 503 and delivers
the event again later; nothing is half-accepted. A button press (``card.action.trigger``) is
collected the same way and handed to `on_action`, whose answer (a toast) is the response body.

Checks, in order: the body size (counted as it arrives, chunked or not) -> 413; the body is a
JSON object -> 400; whenever an encrypt key is configured and the request is signed, the
signature (``X-Lark-Signature`` = sha256(timestamp + nonce + encrypt_key + body), compared in
constant time) and the signed timestamp's age (at most `MAX_CLOCK_SKEW` either way, so a
captured request cannot be replayed later) -> 401, nothing done; then the SDK (decrypts,
checks the verification token, answers ``url_verification`` with its challenge, dispatches).
Callers are anonymous: refusals answer a fixed sentence, the detail goes to the log only.
ASGI lower-cases header names, the SDK looks them up with exact case: they are mapped back
(`sdk_headers`).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

import lark_oapi as lark
import orjson
from lark_oapi.event.callback.model.p2_card_action_trigger import P2CardActionTriggerResponse

from bot.feishu.actions import is_action
from server.errors import RequestError, TooLarge
from server.platform import HttpRequest, HttpResponse, HttpRoute

log = logging.getLogger("vlbridge.feishu.webhook")

PATH = "/feishu/events"
MAX_BODY = 1024 * 1024
MAX_CLOCK_SKEW = 300.0  # seconds a signed request's timestamp may be from now, either way (as Slack's)
SIGNATURE, TIMESTAMP, NONCE = "X-Lark-Signature", "X-Lark-Request-Timestamp", "X-Lark-Request-Nonce"
_CANONICAL = {name.lower(): name for name in (SIGNATURE, TIMESTAMP, NONCE, "X-Request-Id", "Content-Type")}

Persist = Callable[[list[dict[str, Any]]], Awaitable[None]]
# A button press (``card.action.trigger``) -> the callback's answer (a toast), within 3 s.
OnAction = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

# The events the SDK dispatched while handling the current request (set per request).
_collected: ContextVar[list[dict[str, Any]] | None] = ContextVar("feishu_webhook_events", default=None)


def sdk_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Header names in the exact case lark-oapi reads them with."""
    return {_CANONICAL.get(name.lower(), name): value for name, value in headers.items()}


def signature_ok(headers: Mapping[str, str], body: bytes, encrypt_key: str) -> bool:
    """Check a signed request (headers in SDK case); False when a signature header is missing."""
    timestamp, nonce, signature = headers.get(TIMESTAMP), headers.get(NONCE), headers.get(SIGNATURE)
    if not (timestamp and nonce and signature):
        return False
    expected = hashlib.sha256((timestamp + nonce + encrypt_key).encode() + body).hexdigest()
    return hmac.compare_digest(expected, signature)


def timestamp_fresh(headers: Mapping[str, str], now: float) -> bool:
    """True when the signed timestamp (seconds, headers in SDK case) is within `MAX_CLOCK_SKEW` of *now*."""
    try:
        timestamp = float(headers.get(TIMESTAMP, ""))
    except ValueError:
        return False
    return abs(now - timestamp) <= MAX_CLOCK_SKEW


class Webhook:
    """The webhook endpoint; `routes()` gives the framework-neutral route the service mounts."""

    def __init__(
        self,
        *,
        encrypt_key: str,
        verification_token: str,
        persist: Persist,
        on_action: OnAction | None = None,
    ) -> None:
        self.encrypt_key = encrypt_key
        self.persist = persist
        self.on_action = on_action
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="feishu-webhook")
        self.requests = 0
        self.rejected = 0
        self.last_request_at = 0.0
        self.handler = (
            lark.EventDispatcherHandler.builder(encrypt_key, verification_token)
            .register_p2_im_message_receive_v1(self._hand_over)
            .register_p2_im_message_message_read_v1(_ignore)
            .register_p2_im_message_recalled_v1(_ignore)
            .register_p2_im_message_reaction_created_v1(_ignore)
            .register_p2_im_message_reaction_deleted_v1(_ignore)
            .register_p2_im_chat_member_bot_added_v1(_ignore)
            .register_p2_im_chat_member_bot_deleted_v1(_ignore)
            .register_p2_im_chat_access_event_bot_p2p_chat_entered_v1(_ignore)
            .register_p2_card_action_trigger(self._pressed)
            .build()
        )

    def routes(self) -> list[HttpRoute]:
        return [HttpRoute("POST", PATH, self.endpoint)]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _hand_over(self, data: Any) -> None:
        """Called by the SDK on a pool thread: collect the event for the request being handled."""
        events = _collected.get()
        if events is not None:
            events.append(orjson.loads(lark.JSON.marshal(data)))

    def _pressed(self, data: Any) -> P2CardActionTriggerResponse:
        """A button press, collected like an event; `endpoint` writes the answer after."""
        self._hand_over(data)
        return P2CardActionTriggerResponse()

    async def endpoint(self, request: HttpRequest) -> HttpResponse:
        self.requests += 1
        self.last_request_at = time.time()
        try:
            body = await request.read_body(MAX_BODY)
        except TooLarge:
            return self._refuse(request, 413, "the body is too large", f"over {MAX_BODY} bytes")
        except RequestError as exc:
            return self._refuse(request, 400, "the request could not be read", exc.message)
        try:
            shape_ok = isinstance(orjson.loads(body), dict)
        except orjson.JSONDecodeError:
            shape_ok = False
        if not shape_ok:
            return self._refuse(request, 400, "the body must be a JSON object", "not a JSON object")
        headers = sdk_headers(request.headers)
        if self.encrypt_key and SIGNATURE in headers:
            if not signature_ok(headers, body, self.encrypt_key):
                return self._refuse(request, 401, "signature verification failed", "bad signature")
            if not timestamp_fresh(headers, time.time()):
                reason = f"timestamp {headers.get(TIMESTAMP)!r} is more than {MAX_CLOCK_SKEW:.0f} s from now"
                return self._refuse(
                    request, 401, "the request timestamp is outside the accepted window", reason
                )
        raw = lark.RawRequest()
        raw.uri = request.path
        raw.headers = headers
        raw.body = body
        events: list[dict[str, Any]] = []
        context = contextvars.copy_context()
        context.run(_collected.set, events)
        response = await asyncio.get_running_loop().run_in_executor(
            self._pool, context.run, self.handler.do, raw
        )
        status = int(response.status_code or 500)
        if status != 200:
            detail = (response.content or b"").decode(errors="replace")[:200]
            # Every SDK refusal is about authenticity or shape (our handlers never raise).
            unauthorized = (bool(self.encrypt_key) and SIGNATURE not in headers) or any(
                word in detail for word in ("verification", "signature", "encrypt", "decrypt")
            )
            if unauthorized:
                return self._refuse(request, 401, "the request could not be verified", f"SDK: {detail}")
            return self._refuse(request, 400, "the event could not be read", f"SDK: {detail}")
        content = response.content or b""
        pressed = [event for event in events if is_action(event)]
        events = [event for event in events if not is_action(event)]
        for event in pressed:
            try:
                content = orjson.dumps(await self.on_action(event) if self.on_action is not None else {})
            except Exception as exc:
                log.error(
                    "webhook: a button press not recorded, answering 503 so that it comes again: %s", exc
                )
                return _json(503, "the event could not be stored; deliver it again later")
        if events:
            try:
                await self.persist(events)
            except Exception as exc:
                log.error(
                    "webhook: %d event(s) not stored, answering 503 so that they come again: %s",
                    len(events),
                    exc,
                )
                return _json(503, "the event could not be stored; deliver it again later")
        return HttpResponse(200, content, "application/json; charset=utf-8")

    def _refuse(self, request: HttpRequest, status: int, answer: str, detail: str) -> HttpResponse:
        """Count and log a refused request; *answer* goes to the anonymous caller, *detail* to the log."""
        self.rejected += 1
        log.warning("webhook: refused a request from %s (%d): %s; %s", request.client, status, answer, detail)
        return _json(status, answer)

    def health(self) -> dict[str, Any]:
        return {
            "mode": "webhook",
            "state": "listening",
            "connected": True,
            "requests": self.requests,
            "rejected": self.rejected,
            "last_request_age": round(time.time() - self.last_request_at, 1)
            if self.last_request_at
            else None,
        }


def _ignore(data: Any) -> None:
    return None


def _json(status: int, msg: str) -> HttpResponse:
    return HttpResponse(status, orjson.dumps({"msg": msg}))
