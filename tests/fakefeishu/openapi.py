"""HTTP Open API routes: tenant token, bot info and the IM messages the bot sends.

Behaviour that matters to a bridge, as the platform does it:
- replies land in the chat of the message replied to; ``reply_in_thread`` (or a parent already in a
  thread) puts them in that thread; ``root_id`` is the parent's root (or the parent);
- a ``uuid`` already used for a send returns the first message and sends nothing (idempotency);
- content is validated per ``msg_type`` and size (text 150 KB, card 30 KB);
- a resource is served only for the message whose content names it, with ``type`` matching;
- ``GET /im/v1/messages/{id}`` answers ``{"items": [message]}``; for a bundle (``merge_forward``)
  every message inside it follows, nested bundles' too, each with ``upper_message_id``; a group's
  message needs the ``im:message.group_msg`` scope (230027 without), any message one of
  ``im:message`` / ``im:message:readonly`` (99991672 without, naming them).
With ``strict_messages`` (default) replies, patches and reactions need a message the fake knows: one
pushed or registered by the test, or one the bot sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from starlette.routing import Route as StarletteRoute

from . import codes, ids
from .codes import ApiError
from .content import parse_content
from .faults import Route
from .records import MessagePatch, Reaction, SendKind, SentMessage
from .routing import ApiRequest, Endpoints, binary_response, json_response, ok, require
from .state import KnownMessage

RECEIVE_ID_TYPES = frozenset({"open_id", "user_id", "union_id", "email", "chat_id"})


@dataclass(frozen=True)
class BotIdentity:
    open_id: str
    app_name: str
    tenant_key: str


class OpenApi:
    """Route handlers for auth, bot and IM.

    ``bind_card(card_id, message_id)`` is called when an interactive message references a CardKit
    card; it raises ``ApiError`` to refuse the send.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        bot: BotIdentity,
        *,
        strict_messages: bool,
        bind_card: Callable[[str, str], None],
    ) -> None:
        self.ep = endpoints
        self.state = endpoints.state
        self.records = endpoints.records
        self.bot = bot
        self.strict = strict_messages
        self._bind_card = bind_card

    def routes(self) -> list[StarletteRoute]:
        r = self.ep.route
        return [
            r(
                "POST",
                "/open-apis/auth/v3/tenant_access_token/internal",
                Route.TENANT_TOKEN,
                self.tenant_token,
                auth=False,
            ),
            r("GET", "/open-apis/bot/v3/info", Route.BOT_INFO, self.bot_info),
            r("POST", "/open-apis/im/v1/messages", Route.MESSAGE_CREATE, self.create),
            r("POST", "/open-apis/im/v1/messages/{message_id}/reply", Route.MESSAGE_REPLY, self.reply),
            r("PATCH", "/open-apis/im/v1/messages/{message_id}", Route.MESSAGE_PATCH, self.patch),
            r("GET", "/open-apis/im/v1/messages/{message_id}", Route.MESSAGE_GET, self.get),
            r(
                "POST",
                "/open-apis/im/v1/messages/{message_id}/reactions",
                Route.REACTION_CREATE,
                self.add_reaction,
            ),
            r(
                "DELETE",
                "/open-apis/im/v1/messages/{message_id}/reactions/{reaction_id}",
                Route.REACTION_DELETE,
                self.delete_reaction,
            ),
            r(
                "GET",
                "/open-apis/im/v1/messages/{message_id}/resources/{file_key}",
                Route.MESSAGE_RESOURCE,
                self.resource,
            ),
        ]

    # -- auth and bot -----------------------------------------------------------------------------

    def tenant_token(self, req: ApiRequest) -> Response:
        token = self.state.issue_token(require(req.body, "app_id"), require(req.body, "app_secret"))
        with self.records.mutate() as t:
            t.token_grants.append(token)
        return json_response(
            {"code": 0, "msg": "ok", "tenant_access_token": token, "expire": self.state.token_expire_s}
        )

    def bot_info(self, req: ApiRequest) -> Response:
        # The real answer has ``bot`` at the top level, not under ``data``.
        return json_response(
            {
                "code": 0,
                "msg": "ok",
                "bot": {
                    "activate_status": 2,
                    "app_name": self.bot.app_name,
                    "avatar_url": "",
                    "ip_white_list": [],
                    "open_id": self.bot.open_id,
                },
            }
        )

    # -- sending ----------------------------------------------------------------------------------

    def reply(self, req: ApiRequest) -> Response:
        parent = self._message(req.path_params["message_id"])
        msg_type, content = self._content(req.body)
        reply_in_thread = bool(req.body.get("reply_in_thread", False))
        uuid = str(req.body.get("uuid") or "")
        chat_id = parent.chat_id if parent else ids.chat_id()
        thread_id = parent.thread_id if parent else ""
        if reply_in_thread and not thread_id:
            thread_id = ids.thread_id()
        root_id = (parent.root_id or parent.message_id) if parent else req.path_params["message_id"]
        sent = SentMessage(
            message_id=ids.message_id(),
            kind=SendKind.REPLY,
            msg_type=msg_type,
            content=content,
            chat_id=chat_id,
            parent_id=req.path_params["message_id"],
            root_id=root_id,
            thread_id=thread_id,
            reply_in_thread=reply_in_thread,
            uuid=uuid,
        )
        return self._send(sent, parent.chat_type if parent else "p2p")

    def create(self, req: ApiRequest) -> Response:
        receive_id_type = req.query.get("receive_id_type", "")
        if receive_id_type not in RECEIVE_ID_TYPES:
            raise ApiError(
                codes.FIELD_VALIDATION_FAILED, f"field validation failed: receive_id_type={receive_id_type}"
            )
        receive_id = require(req.body, "receive_id")
        msg_type, content = self._content(req.body)
        chat_id = receive_id if receive_id_type == "chat_id" else f"oc_p2p_{receive_id}"
        sent = SentMessage(
            message_id=ids.message_id(),
            kind=SendKind.CREATE,
            msg_type=msg_type,
            content=content,
            chat_id=chat_id,
            receive_id=receive_id,
            receive_id_type=receive_id_type,
            uuid=str(req.body.get("uuid") or ""),
        )
        return self._send(sent, "group" if receive_id_type == "chat_id" else "p2p")

    def _send(self, sent: SentMessage, chat_type: str) -> Response:
        earlier_id = self.state.claim_send_uuid(sent.uuid, sent.message_id)
        if earlier_id is not None:
            with self.records.mutate() as t:
                t.deduped_sends += 1
                earlier = next(m for m in t.sent if m.message_id == earlier_id)
            return ok(self._message_data(earlier))
        card_id = sent.card_id
        if card_id is not None:
            self._bind_card(card_id, sent.message_id)
        self.state.add_message(
            KnownMessage(
                message_id=sent.message_id,
                chat_id=sent.chat_id,
                chat_type=chat_type,
                msg_type=sent.msg_type,
                content=sent.content,
                root_id=sent.root_id,
                thread_id=sent.thread_id,
                from_bot=True,
            )
        )
        with self.records.mutate() as t:
            t.sent.append(sent)
        return ok(self._message_data(sent))

    def _message_data(self, sent: SentMessage) -> dict[str, Any]:
        now = str(ids.now_ms())
        data: dict[str, Any] = {
            "message_id": sent.message_id,
            "msg_type": sent.msg_type,
            "create_time": now,
            "update_time": now,
            "deleted": False,
            "updated": False,
            "chat_id": sent.chat_id,
            "sender": {
                "id": self.state.app_id,
                "id_type": "app_id",
                "sender_type": "app",
                "tenant_key": self.bot.tenant_key,
            },
            "body": {"content": sent.content},
        }
        if sent.root_id:
            data["root_id"] = sent.root_id
        if sent.parent_id:
            data["parent_id"] = sent.parent_id
        if sent.thread_id:
            data["thread_id"] = sent.thread_id
        return data

    def _content(self, body: Any) -> tuple[str, str]:
        msg_type, content = require(body, "msg_type"), require(body, "content")
        parse_content(msg_type, content)
        return msg_type, content

    def _message(self, message_id: str) -> KnownMessage | None:
        known = self.state.message(message_id)
        if known is None and self.strict:
            raise ApiError(codes.IM_INVALID_PARAM, f"invalid message_id: {message_id}")
        return known

    # -- reading ----------------------------------------------------------------------------------

    def get(self, req: ApiRequest) -> Response:
        message_id = req.path_params["message_id"]
        known = self.state.message(message_id)
        if known is None:
            raise ApiError(codes.IM_INVALID_PARAM, f"invalid message_id: {message_id}")
        self.state.check_read(known)
        items = [known]
        if known.msg_type == "merge_forward":
            items.extend(self.state.forwarded_in(message_id))
        return ok({"items": [self._item(m) for m in items]})

    def _item(self, known: KnownMessage) -> dict[str, Any]:
        created = known.create_time or str(ids.now_ms())
        if known.from_bot or not known.sender_open_id:
            sender = {"id": self.state.app_id, "id_type": "app_id", "sender_type": "app"}
        else:
            sender = {"id": known.sender_open_id, "id_type": "open_id", "sender_type": "user"}
        item: dict[str, Any] = {
            "message_id": known.message_id,
            "msg_type": known.msg_type,
            "create_time": created,
            "update_time": created,
            "deleted": False,
            "updated": False,
            "chat_id": known.chat_id,
            "sender": {**sender, "tenant_key": self.bot.tenant_key},
            "body": {"content": known.content},
        }
        for key in ("root_id", "parent_id", "thread_id", "upper_message_id"):
            if getattr(known, key):
                item[key] = getattr(known, key)
        if known.mentions:
            item["mentions"] = [dict(m) for m in known.mentions]
        return item

    # -- edits and reactions ----------------------------------------------------------------------

    def patch(self, req: ApiRequest) -> Response:
        message_id = req.path_params["message_id"]
        known = self._message(message_id)
        content = require(req.body, "content")
        if known is not None and (not known.from_bot or known.msg_type != "interactive"):
            raise ApiError(codes.IM_INVALID_PARAM, "only interactive messages sent by the bot can be patched")
        parse_content("interactive", content)
        with self.records.mutate() as t:
            t.patches.append(MessagePatch(message_id=message_id, content=content))
        return ok({})

    def add_reaction(self, req: ApiRequest) -> Response:
        message_id = req.path_params["message_id"]
        self._message(message_id)
        reaction_type = require(req.body, "reaction_type", dict)
        emoji_type = require(reaction_type, "emoji_type")
        reaction = Reaction(reaction_id=ids.reaction_id(), message_id=message_id, emoji_type=emoji_type)
        with self.records.mutate() as t:
            t.reactions[reaction.reaction_id] = reaction
        return ok(
            {
                "reaction_id": reaction.reaction_id,
                "operator": {"operator_id": self.state.app_id, "operator_type": "app"},
                "action_time": str(ids.now_ms()),
                "reaction_type": {"emoji_type": emoji_type},
            }
        )

    def delete_reaction(self, req: ApiRequest) -> Response:
        reaction_id = req.path_params["reaction_id"]
        with self.records.mutate() as t:
            reaction = t.reactions.get(reaction_id)
            if (
                reaction is None
                or reaction.message_id != req.path_params["message_id"]
                or reaction.deleted_at
            ):
                raise ApiError(231003, "The reaction does not exist.")
            reaction.deleted_at = time.monotonic()
        return ok({"reaction_id": reaction_id, "reaction_type": {"emoji_type": reaction.emoji_type}})

    # -- resources --------------------------------------------------------------------------------

    def resource(self, req: ApiRequest) -> Response:
        message_id, key = req.path_params["message_id"], req.path_params["file_key"]
        kind = req.query.get("type", "")
        if kind not in ("image", "file"):
            raise ApiError(codes.RESOURCE_INVALID_PARAM, f"Invalid request param: type={kind!r}")
        resource = self.state.resource(message_id, key)
        if resource is None:
            raise ApiError(codes.RESOURCE_NOT_IN_MESSAGE, "File not in msg.")
        if resource.kind != kind:
            raise ApiError(
                codes.RESOURCE_INVALID_PARAM, f"Invalid request param: {key} is not of type {kind}"
            )
        return binary_response(resource.data, resource.content_type, resource.file_name)
