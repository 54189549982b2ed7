"""What vlbridge relies on inside uvicorn and websockets, so that an upgrade fails HERE, saying
what changed, instead of as a hang or a lost frame in some WebSocket test.

`server/ws/transport.py` subclasses uvicorn's `WebSocketsSansIOProtocol`, which is not public
API: it overrides four of its methods and reads eight of its attributes, and it frames text
itself where websockets' sans-I/O `ServerProtocol` would. `server/webserver.py` overrides
`uvicorn.Server.shutdown`. uvicorn is pinned to the minor version these were checked against
(pyproject.toml); to raise the pin, run this file against the new version, re-read the
changed uvicorn code and adapt transport.py before changing the expectations here.
websockets' sans-I/O API used there is public and documented (and pinned below 16).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn
import websockets
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from server.webserver import Server
from server.ws.transport import WebSocketProtocol, text_frames

WHERE = "server/ws/transport.py"
BASE = "uvicorn.protocols.websockets.websockets_sansio_impl.WebSocketsSansIOProtocol"


def changed(what: str, where: str = WHERE) -> str:
    return (
        f"uvicorn {uvicorn.__version__} / websockets {websockets.__version__}: {what}. "
        f"{where} relies on it: adapt it to the new version before raising the pin in pyproject.toml"
    )


def parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_protocol_still_subclasses_uvicorns_sansio_websocket_protocol() -> None:
    assert WebSocketProtocol.__bases__ == (WebSocketsSansIOProtocol,), changed(
        f"the base class moved ({BASE})"
    )
    assert issubclass(WebSocketsSansIOProtocol, asyncio.Protocol), changed(f"{BASE} is no asyncio.Protocol")


# name -> (parameters, is a coroutine function): the methods transport.py overrides and calls super() of
OVERRIDDEN = {
    "handle_connect": (["self", "event"], False),
    "send_receive_event_to_app": (["self"], False),
    "receive": (["self"], True),
    "send": (["self", "message"], True),
}


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_overridden_methods_keep_their_signatures(name: str) -> None:
    expected, is_coroutine = OVERRIDDEN[name]
    method = getattr(WebSocketsSansIOProtocol, name, None)
    assert method is not None, changed(f"{BASE}.{name} is gone")
    assert parameters(method) == expected, changed(f"{BASE}.{name} now takes {parameters(method)}")
    assert inspect.iscoroutinefunction(method) is is_coroutine, changed(f"{BASE}.{name} changed sync/async")
    assert name in vars(WebSocketProtocol), f"{WHERE} no longer overrides {name}: drop it from this list"


def test_server_startup_on_given_sockets_still_leaves_the_listening_line_to_us() -> None:
    # `vlbridge serve` binds its socket first (a port in use fails before the model loads) and
    # then logs uvicorn's own "Uvicorn running on" line, which uvicorn skips for given sockets
    for name, params in (("startup", ["self", "sockets"]), ("_log_started_message", ["self", "listeners"])):
        method = getattr(uvicorn.Server, name)
        assert parameters(method) == params, changed(
            f"uvicorn.Server.{name} now takes {parameters(method)}", "server/webserver.py"
        )
    assert "if sockets is None:\n            self._log_started_message" in inspect.getsource(
        uvicorn.Server.startup
    ), changed("uvicorn.Server.startup now logs the listening line for given sockets", "server/webserver.py")
    assert inspect.iscoroutinefunction(uvicorn.Server.on_tick), changed(
        "Server.on_tick is no coroutine", "server/webserver.py"
    )


def test_server_shutdown_keeps_its_signature() -> None:
    shutdown = uvicorn.Server.shutdown
    assert parameters(shutdown) == ["self", "sockets"], changed(
        f"uvicorn.Server.shutdown now takes {parameters(shutdown)}", "server/webserver.py"
    )
    assert inspect.iscoroutinefunction(shutdown), changed(
        "Server.shutdown is no coroutine", "server/webserver.py"
    )
    assert Server.__bases__ == (uvicorn.Server,)


# -- behaviour, on one protocol object fed bytes by hand ------------------------------------------

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class FakeTransport(asyncio.Transport):
    """Records what the protocol writes; reading and closing are flags."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def client_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    """A masked frame, as a client sends it."""
    return Frame(opcode, data, fin).serialize(mask=True)


class Recording(WebSocketsSansIOProtocol):
    """uvicorn's protocol, noting the state it is in when it calls the two hooks vlbridge overrides."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connects: list[Any] = []
        self.hand_overs: list[tuple[str, list[bytes], bool]] = []

    def handle_connect(self, event: Request) -> None:
        self.connects.append(event)
        super().handle_connect(event)

    def send_receive_event_to_app(self) -> None:
        self.hand_overs.append((self.curr_msg_data_type, list(self.frames), self.close_sent))
        super().send_receive_event_to_app()


@pytest.fixture
async def protocol() -> Any:
    app_calls: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        app_calls.append(scope)
        await done.wait()  # the test drives the protocol, not the app

    config = uvicorn.Config(app, ws=Recording, ws_ping_interval=None, ws_ping_timeout=None, lifespan="off")
    config.load()
    state = ServerState()
    proto = Recording(config=config, server_state=state, app_state={})
    transport = FakeTransport()
    proto.connection_made(transport)
    proto.app_calls = app_calls  # type: ignore[attr-defined]
    yield proto
    done.set()
    await asyncio.gather(*state.tasks)


async def test_connection_state_read_by_the_transport(protocol: Any) -> None:
    assert isinstance(protocol.transport, FakeTransport), changed("the transport is no longer `transport`")
    assert isinstance(protocol.conn, ServerProtocol), changed("the websockets protocol is no longer `conn`")
    assert isinstance(protocol.queue, asyncio.Queue), changed("the app's receive queue is no longer `queue`")
    assert isinstance(protocol.writable, asyncio.Event) and protocol.writable.is_set(), changed(
        "flow control is no longer the event `writable`"
    )
    assert (protocol.close_sent, protocol.disconnected) == (False, False), changed(
        "`close_sent` / `disconnected` changed"
    )
    assert protocol.frames == [], changed("received fragments are no longer collected in `frames`")
    assert isinstance(protocol.logger, logging.Logger), changed("`logger` changed")
    protocol.pause_writing()
    assert not protocol.writable.is_set(), changed("pause_writing() no longer clears `writable`")
    protocol.resume_writing()
    assert protocol.writable.is_set(), changed("resume_writing() no longer sets `writable`")


async def test_the_scope_is_still_ours_after_handle_connect(protocol: Any) -> None:
    protocol.data_received(HANDSHAKE)
    [event] = protocol.connects
    assert isinstance(event, Request), changed("handle_connect() no longer gets a websockets Request")
    assert protocol.response.status_code == 101, changed("handle_connect() no longer sets `response`")
    assert isinstance(protocol.scope["extensions"], dict), changed("the scope has no `extensions` dict")
    assert protocol.app_calls == [], changed(
        "the app runs inside handle_connect(): the scope is no longer ours"
    )
    assert protocol.conn.state is State.CONNECTING, changed("the handshake completes before the app accepts")
    await protocol.send({"type": "websocket.accept"})
    assert protocol.conn.state is State.OPEN and protocol.conn.extensions == []
    await asyncio.sleep(0)  # the app task starts: it sees the scope as handle_connect left it
    assert protocol.app_calls == [protocol.scope]


async def test_text_frames_reach_send_receive_event_to_app_whole(protocol: Any) -> None:
    protocol.data_received(HANDSHAKE)
    await protocol.send({"type": "websocket.accept"})
    protocol.data_received(client_frame(Opcode.TEXT, b"hello"))
    protocol.data_received(client_frame(Opcode.TEXT, b"he", fin=False) + client_frame(Opcode.CONT, b"llo"))
    protocol.data_received(client_frame(Opcode.BINARY, b"\x00"))
    assert protocol.hand_overs == [
        ("text", [b"hello"], False),
        ("text", [b"he", b"llo"], False),
        ("bytes", [b"\x00"], False),
    ], changed("send_receive_event_to_app() is no longer called once per message, after `frames` is whole")
    assert protocol.frames == [], changed("send_receive_event_to_app() no longer empties `frames`")
    assert not protocol.transport.reading, changed("a queued message no longer pauses reading")
    received = [await protocol.receive() for _ in range(4)]
    assert received == [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "hello"},
        {"type": "websocket.receive", "text": "hello"},
        {"type": "websocket.receive", "bytes": b"\x00"},
    ], changed("send_receive_event_to_app() no longer queues `websocket.receive` messages")
    assert protocol.transport.reading, changed("receive() no longer resumes reading once the queue is empty")


async def test_our_framing_is_what_websockets_sends_and_the_base_send_refuses_once_disconnected(
    protocol: Any,
) -> None:
    protocol.data_received(HANDSHAKE)
    await protocol.send({"type": "websocket.accept"})
    texts = [b"x", "é".encode() * 70, b"y" * 70_000]
    for text in texts:
        protocol.conn.send_text(text)
    assert b"".join(protocol.conn.data_to_send()) == text_frames(texts), changed(
        "websockets frames a server's text differently from text_frames()"
    )
    protocol.connection_lost(None)
    assert protocol.disconnected and protocol.writable.is_set(), changed("connection_lost() changed")
    with pytest.raises(ClientDisconnected):
        await protocol.send({"type": "websocket.send", "text": "late"})
