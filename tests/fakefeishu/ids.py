"""Identifier shapes as the platform issues them (prefix + random hex)."""

from __future__ import annotations

import secrets
import time


def _hex(n: int = 16) -> str:
    return secrets.token_hex(n)


def message_id() -> str:
    return f"om_{_hex()}"


def chat_id() -> str:
    return f"oc_{_hex()}"


def thread_id() -> str:
    return f"omt_{_hex(8)}"


def open_id() -> str:
    return f"ou_{_hex()}"


def union_id() -> str:
    return f"on_{_hex()}"


def user_id() -> str:
    return _hex(4)


def app_id() -> str:
    return f"cli_{_hex(8)}"


def event_id() -> str:
    return _hex()


def image_key() -> str:
    return f"img_v3_02{_hex(12)}"


def file_key() -> str:
    return f"file_v3_00{_hex(12)}"


def card_id() -> str:
    return f"7{secrets.randbelow(10**18):018d}"


def tenant_token() -> str:
    return f"t-{_hex(20)}"


def reaction_id() -> str:
    return f"ZCaCIjUBVVWSrm5L-3ZTw{_hex(8)}"


def now_ms() -> int:
    return int(time.time() * 1000)
