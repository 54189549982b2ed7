"""Webhook-mode helpers: encrypt and sign event bodies exactly as Feishu does.

- Encryption: AES-256-CBC, key = sha256(encrypt_key), random 16-byte IV prepended, PKCS7 padding,
  base64; the body is ``{"encrypt": "<base64>"}``.
- Signature: ``X-Lark-Signature`` = sha256_hex(timestamp + nonce + encrypt_key + raw body), with
  ``X-Lark-Request-Timestamp`` (seconds) and ``X-Lark-Request-Nonce``. The SDK reads these header
  names case-sensitively, and it does not check signatures of ``url_verification`` bodies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from Crypto.Cipher import AES

SIGNATURE = "X-Lark-Signature"
TIMESTAMP = "X-Lark-Request-Timestamp"
NONCE = "X-Lark-Request-Nonce"


def encrypt(plaintext: bytes, encrypt_key: str, iv: bytes | None = None) -> str:
    """Base64 of IV + AES-256-CBC(PKCS7(plaintext)) under sha256(encrypt_key)."""
    iv = iv if iv is not None else os.urandom(AES.block_size)
    if len(iv) != AES.block_size:
        raise ValueError(f"expected a {AES.block_size}-byte IV, got {len(iv)} bytes")
    key = hashlib.sha256(encrypt_key.encode()).digest()
    pad = AES.block_size - len(plaintext) % AES.block_size
    cipher = AES.new(key, AES.MODE_CBC, iv)
    return base64.b64encode(iv + cipher.encrypt(plaintext + bytes([pad]) * pad)).decode()


def signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode() + body).hexdigest()


@dataclass(frozen=True)
class WebhookRequest:
    """A body and the headers to POST it with (``Content-Type`` included)."""

    body: bytes
    headers: dict[str, str]


def build_request(
    event: Mapping[str, Any],
    *,
    encrypt_key: str = "",
    sign: bool = True,
    timestamp: str | None = None,
    nonce: str | None = None,
) -> WebhookRequest:
    """The request Feishu would send for ``event``.

    With an ``encrypt_key`` the body is encrypted and (unless ``sign`` is False) signed; without
    one it is sent in clear and unsigned, as the platform does for apps with no encrypt key.
    """
    plain = json.dumps(dict(event), ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json; charset=utf-8"}
    if not encrypt_key:
        return WebhookRequest(plain, headers)
    body = json.dumps({"encrypt": encrypt(plain, encrypt_key)}).encode()
    if sign:
        ts = timestamp if timestamp is not None else str(int(time.time()))
        nc = nonce if nonce is not None else secrets.token_hex(8)
        headers.update({TIMESTAMP: ts, NONCE: nc, SIGNATURE: signature(ts, nc, encrypt_key, body)})
    return WebhookRequest(body, headers)
