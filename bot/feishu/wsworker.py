"""The long-connection worker process: hosts one unmodified `lark.ws.Client` and nothing else.

Run as ``python -m bot.feishu.wsworker`` by `bot.feishu.longconn.LongConnection`. Why a
process: the SDK grabs an event loop at import, `start()` blocks forever with no `stop()`,
discovery uses `requests.post` without a timeout, and two clients in one process interfere.
A process can always be stopped (closing its stdin, or a kill), whatever state the SDK is in.

Protocol (JSON lines; all times are ``time.time()`` seconds):
- stdin: one line ``{"app_id", "app_secret", "domain", "heartbeat", "inbox"}`` (``inbox``: a
  `bot.inbox_factory.StoreSpec` as a dict: the SQLite file or the Redis URL); then EOF means "exit".
- stdout: ``{"t": "event", "message_id", "new", "at"}`` per received message, once it is in the
  inbox (``new`` is false for a redelivery); ``{"t": "malformed", "event_id", "why"}`` for an
  event that is not a message this bot can read (acknowledged: a redelivery would not fix it);
  ``{"t": "state", "at", "connected", "unanswered_since"}`` every `heartbeat` seconds and at
  once (within `STATE_TICK`) when the connection comes up or goes down (with
  ``"starting": true`` from the first moment until the SDK is imported, which takes seconds of
  CPU: the watchdog then knows the worker is alive, not hung),
  ``{"t": "log", "level", "msg"}`` for the SDK's info/warning/error lines;
  ``{"t": "action", "action", "verdict", "stop", "new_answer"}`` per button press
  (``card.action.trigger``), once `bot.feishu.actions.act` checked and recorded it; the
  press's toast goes back to the platform in the ack.

Persist before ack: the SDK acknowledges an event when its handler returns, so the handler
commits the message to the inbox (`bot.store.InboxStore`: SQLite or Redis, a few ms) before it returns; the
parent only hears "message X is in the inbox". If the commit fails the handler raises, the SDK
answers the platform with an error and the platform delivers the event again later. Nothing
waits for the parent, so acks stay fast whatever the service is doing.

Pongs are observed through the SDK's own log lines (it receives them but ignores them): no SDK
code is patched.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from typing import IO, Any

from bot.feishu.actions import ActionPolicy, act, parse_action
from bot.feishu.messages import MalformedEvent, is_command, parse_event
from bot.inbox_factory import StoreSpec
from bot.store import StorageError

_out: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()


def _emit(record: dict[str, Any]) -> None:
    _out.put(record)


def _writer(stream: IO[bytes]) -> None:
    while True:
        record = _out.get()
        if record is None:
            return
        stream.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        stream.flush()


class _Pings:
    """Ping/pong bookkeeping fed by the SDK's log records (on the SDK's thread)."""

    def __init__(self) -> None:
        self.unanswered_since = 0.0

    def ping(self, now: float) -> None:
        if not self.unanswered_since:
            self.unanswered_since = now

    def pong(self) -> None:
        self.unanswered_since = 0.0


class _SdkLog(logging.Handler):
    """Watches the SDK's "Lark" logger: pings, pongs, connects; forwards info+ lines."""

    def __init__(self, pings: _Pings) -> None:
        super().__init__(logging.DEBUG)
        self.pings = pings

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed SDK log call must not break the worker
            return
        if msg.startswith("ping success"):
            self.pings.ping(time.time())
        elif msg.startswith(("receive pong", "connected to")):
            self.pings.pong()
        if record.levelno >= logging.INFO and not msg.startswith("receive message"):
            _emit({"t": "log", "level": record.levelname, "msg": msg})


STATE_TICK = 0.1  # seconds between two looks at the SDK's connection (a report only on a change)


def _stdin_watch(stdin: IO[bytes]) -> None:
    stdin.read()  # returns at EOF: the parent closed our stdin or died
    os._exit(0)


def _starting(heartbeat: float, loaded: threading.Event) -> None:
    """Report "alive, starting" until the SDK is imported (an import is no place for a loop)."""
    while not loaded.is_set():
        _emit(
            {"t": "state", "at": time.time(), "connected": False, "unanswered_since": 0.0, "starting": True}
        )
        loaded.wait(heartbeat)


def main() -> int:
    # stdout is the protocol; anything else printing to it (the SDK's default handler) goes to stderr.
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    settings = json.loads(sys.stdin.buffer.readline() or b"{}")
    threading.Thread(target=_writer, args=(protocol,), name="writer", daemon=True).start()
    threading.Thread(target=_stdin_watch, args=(sys.stdin.buffer,), name="stdin", daemon=True).start()
    heartbeat = float(settings.get("heartbeat", 2.0))
    try:
        inbox = StoreSpec.from_dict(settings["inbox"]).open()
        inbox.check()
    except StorageError as exc:
        _emit({"t": "log", "level": "ERROR", "msg": f"cannot receive: {exc}"})
        _out.put(None)
        time.sleep(0.2)
        return 1
    loaded = threading.Event()
    threading.Thread(target=_starting, args=(heartbeat, loaded), name="starting", daemon=True).start()

    import asyncio

    import lark_oapi as lark
    import lark_oapi.ws.client as ws_module
    from lark_oapi.core.log import logger as sdk_logger
    from lark_oapi.event.callback.model.p2_card_action_trigger import P2CardActionTriggerResponse

    pings = _Pings()
    for handler in list(sdk_logger.handlers):
        sdk_logger.removeHandler(handler)
    sdk_logger.addHandler(_SdkLog(pings))
    sdk_logger.propagate = False

    def hand_over(data: Any) -> None:
        raw = lark.JSON.marshal(data)
        body = json.loads(raw)
        try:
            message = parse_event(body)
        except MalformedEvent as exc:
            event_id = (body.get("header") or {}).get("event_id")
            _emit({"t": "malformed", "event_id": event_id, "why": str(exc)})
            return
        at = time.time()
        # A raise here means no ack: the platform delivers the event again.
        new = inbox.receive(message, raw.encode(), at, ordered=not is_command(body))
        _emit({"t": "event", "message_id": message.message_id, "new": new, "at": at})

    def ignore(data: Any) -> None:
        return None

    policy = ActionPolicy.from_dict(settings.get("actions") or {})

    def pressed(data: Any) -> Any:
        # Answered in the ack (the platform waits 3 s): decided from the inbox alone; a raise
        # (storage down) means no ack, and the press comes again.
        body = json.loads(lark.JSON.marshal(data))
        try:
            action = parse_action(body)
        except MalformedEvent as exc:
            _emit({"t": "malformed", "event_id": (body.get("header") or {}).get("event_id"), "why": str(exc)})
            return P2CardActionTriggerResponse()
        decision = act(inbox, action, policy, time.time())
        _emit(
            {
                "t": "action",
                "action": action.kind.value,
                "verdict": decision.verdict.value,
                "stop": decision.stop,
                "new_answer": decision.new_answer,
            }
        )
        return P2CardActionTriggerResponse(decision.response(policy.language))

    # Every type the app may be subscribed to is registered: an unregistered one is acked 500.
    handler = (
        lark.EventDispatcherHandler.builder("", "")
        .register_p2_im_message_receive_v1(hand_over)
        .register_p2_im_message_message_read_v1(ignore)
        .register_p2_im_message_recalled_v1(ignore)
        .register_p2_im_message_reaction_created_v1(ignore)
        .register_p2_im_message_reaction_deleted_v1(ignore)
        .register_p2_im_chat_member_bot_added_v1(ignore)
        .register_p2_im_chat_member_bot_deleted_v1(ignore)
        .register_p2_im_chat_access_event_bot_p2p_chat_entered_v1(ignore)
        .register_p2_card_action_trigger(pressed)
        .build()
    )
    client = lark.ws.Client(
        settings["app_id"],
        settings["app_secret"],
        event_handler=handler,
        domain=settings["domain"],
        log_level=lark.LogLevel.DEBUG,
    )
    loaded.set()

    async def report() -> None:
        last: bool | None = None
        due = 0.0
        while True:
            connected = getattr(client, "_conn", None) is not None  # read-only look at SDK state
            if connected is not last or time.monotonic() >= due:
                _emit(
                    {
                        "t": "state",
                        "at": time.time(),
                        "connected": connected,
                        "unanswered_since": pings.unanswered_since,
                    }
                )
                last, due = connected, time.monotonic() + heartbeat
            await asyncio.sleep(min(heartbeat, STATE_TICK))

    ws_module.loop.create_task(report())
    try:
        client.start()  # blocks for good; returns only by raising
    except Exception as exc:
        _emit({"t": "log", "level": "ERROR", "msg": f"ws client stopped: {type(exc).__name__}: {exc}"})
        _out.put(None)
        time.sleep(0.2)  # let the writer flush the last line
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
