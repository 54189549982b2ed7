"""Bearer-token authentication shared by the WebSocket and HTTP routes.

A request presents ``Authorization: Bearer <token>`` or ``?token=<token>`` (browsers
cannot set headers on a WebSocket handshake). Tokens are compared in constant time:
the presented token is hashed and compared against every configured digest, without
stopping at the first match.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

ANONYMOUS = b""


class Authenticator:
    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._digests = [hashlib.sha256(token.encode()).digest() for token in tokens]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, headers: Mapping[str, str], query: Mapping[str, str]) -> bytes | None:
        """The owner key of the request: the matching token's digest, `ANONYMOUS` when auth
        is off, or None when a token is required and missing or wrong."""
        if not self._digests:
            return ANONYMOUS
        presented = query.get("token", "")
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            presented = value.strip()
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for known in self._digests:
            if hmac.compare_digest(digest, known):
                found = known
        return found
