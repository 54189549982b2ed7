"""CardKit v1 routes: card entities for streaming ("typewriter") replies.

Rules enforced, as the platform does:
- ``sequence`` is a positive integer that must be greater than the last one ACCEPTED for the card,
  across content, settings and full updates; otherwise 300317 (a refused call does not advance it);
- streaming content updates need ``streaming_mode`` on (300309 once it is off, or after the streaming
  lifetime, 10 minutes on the platform, configurable here);
- the element must exist (300313) and be a ``markdown`` or ``plain_text`` element;
- a card with ``streaming_mode`` needs card JSON ``schema`` "2.0";
- a card entity is sent in one message only.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from starlette.responses import Response
from starlette.routing import Route as StarletteRoute

from . import codes, ids
from .codes import ApiError
from .faults import Route
from .records import CardOp, CardOpKind, CardRecord, Tables
from .routing import ApiRequest, Endpoints, ok, require

TEXT_TAGS = frozenset({"markdown", "plain_text"})
ELEMENT_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,19}$")
MAX_SEQUENCE = 2**31 - 1


def parse_card_json(card: Any) -> tuple[dict[str, Any], dict[str, str], set[str]]:
    """Validate ``{"type": "card_json", "data": "<card JSON>"}``.

    Returns the card, the initial text of every text element by ``element_id`` and the ids of all
    other elements. Raises ``ApiError`` (300302) on anything the platform would refuse.
    """
    if not isinstance(card, dict) or card.get("type") != "card_json" or not isinstance(card.get("data"), str):
        raise ApiError(codes.CARD_INVALID, 'expected {"type": "card_json", "data": "<card JSON string>"}')
    try:
        data = json.loads(card["data"])
    except ValueError as exc:
        raise ApiError(codes.CARD_INVALID, f"card data is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(codes.CARD_INVALID, "card data must be a JSON object")
    if _streaming(data) and data.get("schema") != "2.0":
        raise ApiError(codes.CARD_INVALID, 'streaming_mode needs card JSON "schema": "2.0"')
    texts: dict[str, str] = {}
    others: set[str] = set()
    for element in _walk(
        data.get("body", {}).get("elements", []) if "body" in data else data.get("elements", [])
    ):
        element_id = element.get("element_id")
        if element_id is None:
            continue
        if not isinstance(element_id, str) or not ELEMENT_ID.match(element_id):
            raise ApiError(codes.CARD_INVALID, f"invalid element_id {element_id!r}")
        if element_id in texts or element_id in others:
            raise ApiError(codes.CARD_INVALID, f"duplicate element_id {element_id!r}")
        if element.get("tag") in TEXT_TAGS:
            texts[element_id] = str(element.get("content", ""))
        else:
            others.add(element_id)
    return data, texts, others


def _streaming(data: dict[str, Any]) -> bool:
    config = data.get("config")
    return isinstance(config, dict) and bool(config.get("streaming_mode", False))


def _walk(elements: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if not isinstance(elements, list):
        return found
    for element in elements:
        if not isinstance(element, dict):
            continue
        found.append(element)
        for key in ("elements", "columns"):
            found.extend(_walk(element.get(key)))
    return found


class CardKit:
    """Card entity store (kept in ``Records`` so tests can read it) and its routes."""

    def __init__(self, endpoints: Endpoints, *, streaming_lifetime_s: float = 600.0) -> None:
        self.ep = endpoints
        self.records = endpoints.records
        self.streaming_lifetime_s = streaming_lifetime_s

    def routes(self) -> list[StarletteRoute]:
        r = self.ep.route
        return [
            r("POST", "/open-apis/cardkit/v1/cards", Route.CARD_CREATE, self.create),
            r("PUT", "/open-apis/cardkit/v1/cards/{card_id}", Route.CARD_UPDATE, self.update),
            r("PATCH", "/open-apis/cardkit/v1/cards/{card_id}/settings", Route.CARD_SETTINGS, self.settings),
            r(
                "PUT",
                "/open-apis/cardkit/v1/cards/{card_id}/elements/{element_id}/content",
                Route.CARD_ELEMENT_CONTENT,
                self.content,
            ),
        ]

    def create(self, req: ApiRequest) -> Response:
        data, texts, _ = parse_card_json(req.body)
        streaming = _streaming(data)
        card = CardRecord(
            card_id=ids.card_id(),
            card=data,
            streaming=streaming,
            element_texts=texts,
            streaming_since=time.monotonic() if streaming else None,
        )
        with self.records.mutate() as t:
            t.cards[card.card_id] = card
        return ok({"card_id": card.card_id})

    def content(self, req: ApiRequest) -> Response:
        element_id = req.path_params["element_id"]
        text = require(req.body, "content")
        with self.records.mutate() as t:
            card = self._card(t, req.path_params["card_id"])
            sequence = self._sequence(card, req.body)
            if not card.streaming:
                raise ApiError(codes.CARD_STREAMING_CLOSED, "streaming mode is closed")
            if element_id not in card.element_texts:
                raise ApiError(codes.CARD_ELEMENT_NOT_FOUND, f"ErrMsg: not find elementID : {element_id}; ")
            card.element_texts[element_id] = text
            card.last_element_id = element_id
            card.last_sequence = sequence
            card.history.append(CardOp(CardOpKind.CONTENT, sequence, element_id=element_id, content=text))
        return ok({})

    def settings(self, req: ApiRequest) -> Response:
        raw = require(req.body, "settings")
        try:
            settings = json.loads(raw)
        except ValueError as exc:
            raise ApiError(codes.CARD_INVALID, f"settings is not JSON: {exc}") from exc
        if not isinstance(settings, dict):
            raise ApiError(codes.CARD_INVALID, "settings must be a JSON object")
        with self.records.mutate() as t:
            card = self._card(t, req.path_params["card_id"])
            sequence = self._sequence(card, req.body)
            config = settings.get("config")
            if isinstance(config, dict):
                card.card.setdefault("config", {}).update(config)
                if "streaming_mode" in config:
                    self._set_streaming(card, bool(config["streaming_mode"]), "settings")
            card.last_sequence = sequence
            card.history.append(CardOp(CardOpKind.SETTINGS, sequence, settings=settings))
        return ok({})

    def update(self, req: ApiRequest) -> Response:
        data, texts, _ = parse_card_json(require(req.body, "card", dict))
        with self.records.mutate() as t:
            card = self._card(t, req.path_params["card_id"])
            sequence = self._sequence(card, req.body)
            card.card = data
            card.element_texts = texts
            card.last_element_id = None
            self._set_streaming(card, _streaming(data), "update")
            card.last_sequence = sequence
            card.history.append(
                CardOp(CardOpKind.UPDATE, sequence, content=json.dumps(data, ensure_ascii=False))
            )
        return ok({})

    def bind(self, card_id: str, message_id: str) -> None:
        """Attach a card to the message that shows it; the platform sends a card entity once."""
        with self.records.mutate() as t:
            card = t.cards.get(card_id)
            if card is None:
                raise ApiError(230099, f"Failed to create card content, card_id {card_id} not found")
            if card.message_id is not None:
                raise ApiError(230099, f"Failed to create card content, card {card_id} was already sent")
            card.message_id = message_id

    def _card(self, t: Tables, card_id: str) -> CardRecord:
        card = t.cards.get(card_id)
        if card is None:
            raise ApiError(codes.CARD_NOT_FOUND, f"card not found: {card_id}")
        if (
            card.streaming
            and card.streaming_since is not None
            and time.monotonic() - card.streaming_since > self.streaming_lifetime_s
        ):
            self._set_streaming(card, False, "timeout")
        return card

    @staticmethod
    def _sequence(card: CardRecord, body: Any) -> int:
        sequence = require(body, "sequence", int)
        if isinstance(sequence, bool) or not 0 < sequence <= MAX_SEQUENCE or sequence <= card.last_sequence:
            raise ApiError(codes.CARD_SEQUENCE_FAILED, "ErrMsg: sequence number compare failed; ")
        return int(sequence)

    @staticmethod
    def _set_streaming(card: CardRecord, on: bool, by: str) -> None:
        if on and not card.streaming:
            card.streaming, card.streaming_since, card.closed_by = True, time.monotonic(), None
        elif not on and card.streaming:
            card.streaming, card.closed_by = False, by
