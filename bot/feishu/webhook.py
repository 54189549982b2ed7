"""Receiving events by webhook: ``POST /feishu/events`` through `lark.EventDispatcherHandler`.

Contract: the request is answered within milliseconds; the event itself is handled afterwards
(`on_event` schedules work and returns). The SDK's synchronous `handler.do` (decryption,
token check, dispatch) runs on a worker thread, never on the event loop.

Checks, in order: the body size; the signature (``X-Lark-Signature`` =
sha256(timestamp + nonce + encrypt_key + body), compared in constant time) whenever an
encrypt key is configured and the request is signed -> 401 when wrong, nothing done; then the
SDK (decrypts, checks the verification token, answers ``url_verification`` with its
challenge, dispatches). ASGI lower-cases header names, the SDK looks them up with exact
case: they are mapped back (`sdk_headers`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lark_oapi as lark
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

log = logging.getLogger("vlbridge.feishu.webhook")

PATH = "/feishu/events"
MAX_BODY = 1024 * 1024
SIGNATURE, TIMESTAMP, NONCE = "X-Lark-Signature", "X-Lark-Request-Timestamp", "X-Lark-Request-Nonce"
_CANONICAL = {name.lower(): name for name in (SIGNATURE, TIMESTAMP, NONCE, "X-Request-Id", "Content-Type")}

EventCallback = Callable[[dict[str, Any], float], None]


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


class Webhook:
    """The webhook endpoint; `routes()` gives the Starlette route to mount."""

    def __init__(self, *, encrypt_key: str, verification_token: str, on_event: EventCallback) -> None:
        self.encrypt_key = encrypt_key
        self.on_event = on_event
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="feishu-webhook")
        self._loop: asyncio.AbstractEventLoop | None = None
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
            .build()
        )

    def routes(self) -> list[Route]:
        return [Route(PATH, self.endpoint, methods=["POST"])]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _hand_over(self, data: Any) -> None:
        """Called by the SDK on a pool thread: pass the event to the loop and return."""
        body = orjson.loads(lark.JSON.marshal(data))
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self.on_event, body, time.time())

    async def endpoint(self, request: Request) -> Response:
        self.requests += 1
        self.last_request_at = time.time()
        self._loop = asyncio.get_running_loop()
        body = await request.body()
        if len(body) > MAX_BODY:
            return _json(413, "body too large")
        headers = sdk_headers(request.headers)
        if self.encrypt_key and SIGNATURE in headers and not signature_ok(headers, body, self.encrypt_key):
            self.rejected += 1
            log.warning(
                "webhook: bad signature from %s; ignored", request.client.host if request.client else "?"
            )
            return _json(401, "signature verification failed")
        raw = lark.RawRequest()
        raw.uri = request.url.path
        raw.headers = headers
        raw.body = body
        response = await self._loop.run_in_executor(self._pool, self.handler.do, raw)
        status = int(response.status_code or 500)
        if status != 200:
            self.rejected += 1
            detail = (response.content or b"").decode(errors="replace")[:200]
            log.warning("webhook: request refused by the SDK: %s", detail)
            # Every SDK refusal is about authenticity or shape (our handlers never raise).
            unauthorized = (bool(self.encrypt_key) and SIGNATURE not in headers) or any(
                word in detail for word in ("verification", "signature", "encrypt", "decrypt")
            )
            return _json(401 if unauthorized else 400, detail)
        return Response(
            response.content or b"", status_code=200, media_type="application/json; charset=utf-8"
        )

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


def _json(status: int, msg: str) -> Response:
    return Response(orjson.dumps({"msg": msg}), status_code=status, media_type="application/json")
