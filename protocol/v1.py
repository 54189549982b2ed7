"""WebSocket protocol v1: the names and numbers that server and client must agree on.

docs/protocol.md is the contract; this module is its vocabulary in code. The server
(`server/ws/`, `server/errors.py`, `server/service.py`) and the chat client (`client/`)
both import these definitions, so a code or limit exists once. Nothing here parses,
validates or does I/O: that is each side's own business.

The enums are `StrEnum`/`IntEnum`: a member *is* the string or integer on the wire, so it
compares equal to what a peer sent, goes into JSON as is, and reads as its value in logs.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Final

PROTOCOL_VERSION: Final = 1  # the hello's "protocol"; bumped only for incompatible changes

# -- handshake ------------------------------------------------------------------------------

QUERY_TOKEN: Final = "token"  # the bearer token, for clients that cannot set headers
QUERY_RESUME: Final = "resume"  # a session id from an earlier hello
QUERY_LAST_SEQ: Final = "last_seq"  # with resume: the highest seq the client received
# The handshake response names the session (new or resumed) in this header: not for the client
# (the hello says it too) but for a load balancer that learns which instance owns a session
# and routes its `?resume=` there (docs/scaling.md, docker/haproxy.cfg).
HEADER_SESSION: Final = "X-Vlbridge-Session"

# -- frames ---------------------------------------------------------------------------------


class ClientFrameType(StrEnum):
    """The `type` of a frame the client sends."""

    ASK = "ask"
    CANCEL = "cancel"
    RESET = "reset"
    PING = "ping"
    PONG = "pong"


class ServerFrameType(StrEnum):
    """The `type` of a frame the server sends."""

    HELLO = "hello"  # first frame of every connection, seq 0
    QUEUED = "queued"  # per ask: queued, (reading), started, delta..., then done or error
    READING = "reading"  # an ask with pictures: reading them began (added in v1; old clients ignore it)
    STARTED = "started"
    DELTA = "delta"
    DONE = "done"
    ERROR = "error"  # per ask (with "id") or about a frame of the client's
    PING = "ping"  # the client answers with a pong carrying the same ts
    PONG = "pong"  # the answer to a client ping
    RESET = "reset"  # confirms a client reset


MAX_ID_CHARS: Final = 128  # an ask's "id"
MAX_TEXT_CHARS: Final = 32_768  # an ask's "text"


class ErrorCode(StrEnum):
    """The stable `code` of an error frame (and of the handshake's denial body)."""

    BAD_REQUEST = "bad_request"  # malformed frame or fields; the session stays usable
    BAD_IMAGE = "bad_image"  # a picture that is not valid base64 or cannot be decoded
    TOO_LARGE = "too_large"  # a picture, question or conversation over a limit
    BUSY = "busy"  # queue full or too many running asks; has retry_after
    TIMEOUT = "timeout"  # no complete answer within the server's request timeout
    CANCELLED = "cancelled"  # the client cancelled the ask
    UNAVAILABLE = "unavailable"  # model loading or failed, or shutting down; has retry_after
    INTERNAL = "internal"  # a bug or a device failure on the server
    UNAUTHORIZED = "unauthorized"  # handshake only: the HTTP 403 denial's body


class CloseCode(IntEnum):
    """WebSocket close codes as protocol v1 uses them (RFC 6455 numbers, and 44xx of ours).

    What each means for the session, and what a client should do, is the table in
    docs/protocol.md ("Close codes").
    """

    NORMAL = 1000  # the client is done with the session: nothing is kept
    GOING_AWAY = 1001  # the client went away (page closed): nothing is kept
    PROTOCOL_ERROR = 1002  # RFC 6455; a client does not retry after it
    UNSUPPORTED_DATA = 1003  # RFC 6455; a client does not retry after it
    NO_STATUS = 1005  # RFC 6455: a close frame without a code; never sent
    ABNORMAL = 1006  # RFC 6455: no close frame at all (the connection broke); never sent
    POLICY = 1008  # frame flood: the session is discarded
    TOO_BIG = 1009  # a frame over max_frame_bytes: the session is discarded
    PING_TIMEOUT = 1011  # nothing received for ping_interval + ping_timeout: resume
    RESTART = 1012  # the server is shutting down or restarting: reconnect later
    FULL = 1013  # max_sessions reached: retry later, with backoff
    BAD_REQUEST = 4400  # handshake refused (bad last_seq) where HTTP 400 cannot be sent
    UNAUTHORIZED = 4401  # handshake refused (token) where HTTP 403 cannot be sent
    FORBIDDEN = 4403  # handshake refused (a browser's origin) where HTTP 403 cannot be sent
    SLOW = 4408  # the client does not read its frames: resume
    TAKEN_OVER = 4409  # the session was resumed on another connection: stop using this one
