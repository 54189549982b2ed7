"""Who may use the service: bearer tokens and browser origins, for the WebSocket and HTTP routes.

A request presents ``Authorization: Bearer <token>`` or ``?token=<token>`` (browsers
cannot set headers on a WebSocket handshake). Tokens are compared in constant time:
the presented token is hashed and compared against every configured digest, without
stopping at the first match.

A browser adds ``Origin`` to every WebSocket handshake and to cross-site POSTs, and
sends both from any page it shows, with no CORS preflight for a WebSocket or a
form-encoded/multipart POST. So without a token requirement, any web page a developer
opens could drive their local server (cross-site WebSocket hijacking). `admit` is the one
rule for every route: a request needs a valid token when tokens are configured;
otherwise, a request with an ``Origin`` is let in only from the server's own origin
(the host:port of its ``Host`` header: the test page) or from `server.allowed_origins`.
Clients that are not browsers send no ``Origin`` and are let in as before.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from enum import Enum
from urllib.parse import urlsplit

ANONYMOUS = b""
_DEFAULT_PORTS = {"http": "80", "https": "443"}


class Refusal(Enum):
    """Why `admit` refused a request; the value is the wire error code."""

    UNAUTHORIZED = "unauthorized"  # tokens are configured and none valid was presented
    FORBIDDEN_ORIGIN = "forbidden"  # a browser on another site, and that site is not allowed


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` lower-cased without a default port, or None when *origin*
    is not an http(s) origin (``null``, a path, a file: URL)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username or parts.password:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and str(port) != _DEFAULT_PORTS[parts.scheme]:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


class Authenticator:
    def __init__(self, tokens: tuple[str, ...], allowed_origins: Iterable[str] = ()) -> None:
        self._digests = [hashlib.sha256(token.encode()).digest() for token in tokens]
        self._origins = frozenset(filter(None, map(normalize_origin, allowed_origins)))

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

    def admit(self, headers: Mapping[str, str], query: Mapping[str, str]) -> bytes | Refusal:
        """The owner key (as `identify`) of a request that may proceed, else why not.

        With tokens configured, a valid token admits from any origin (a hostile page
        cannot know it). Without, the ``Origin`` header decides (`origin_allowed`)."""
        owner = self.identify(headers, query)
        if owner is None:
            return Refusal.UNAUTHORIZED
        if owner == ANONYMOUS and not self.origin_allowed(headers):
            return Refusal.FORBIDDEN_ORIGIN
        return owner

    def origin_allowed(self, headers: Mapping[str, str]) -> bool:
        """True without an ``Origin`` header (not a browser), for the server's own origin
        (same host:port as ``Host``, http or https) and for `server.allowed_origins`."""
        origin = headers.get("origin")
        if origin is None:
            return True
        normalized = normalize_origin(origin)
        if normalized is None:
            return False  # "null" (sandboxed frames, file: pages) or junk: a browser we cannot place
        if normalized in self._origins:
            return True
        scheme = normalized.partition("://")[0]
        host = normalize_origin(f"{scheme}://{headers.get('host', '')}")
        return host is not None and host == normalized
