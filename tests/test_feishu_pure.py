"""Pure helpers of the Feishu adapter: webhook header mapping and signatures, card JSON."""

from __future__ import annotations

import hashlib
import json

from bot.feishu.cards import ELEMENT_ID, clip, closing_settings, streaming_card
from bot.feishu.webhook import NONCE, SIGNATURE, TIMESTAMP, sdk_headers, signature_ok


def test_header_names_mapped_back_to_sdk_case() -> None:
    headers = sdk_headers({"x-lark-signature": "s", "x-lark-request-timestamp": "1", "x-other": "o"})
    assert headers == {SIGNATURE: "s", TIMESTAMP: "1", "x-other": "o"}


def test_signature() -> None:
    body = b'{"encrypt":"abc"}'
    sig = hashlib.sha256(b"1700000000" + b"nonce" + b"key" + body).hexdigest()
    headers = {TIMESTAMP: "1700000000", NONCE: "nonce", SIGNATURE: sig}
    assert signature_ok(headers, body, "key")
    assert not signature_ok(headers, body + b" ", "key")
    assert not signature_ok({**headers, SIGNATURE: "0" * 64}, body, "key")
    assert not signature_ok({TIMESTAMP: "1"}, body, "key")


def test_streaming_card_json() -> None:
    card = streaming_card("思考中…")
    assert card["schema"] == "2.0"
    assert card["config"]["streaming_mode"] is True
    element = card["body"]["elements"][0]
    assert (element["tag"], element["element_id"], element["content"]) == ("markdown", ELEMENT_ID, "思考中…")
    json.dumps(card)
    settings = closing_settings("A long\nanswer " * 20)
    assert settings["config"]["streaming_mode"] is False
    assert len(settings["config"]["summary"]["content"]) <= 60
    assert clip("x" * 10, 5) == "xxxx…"
