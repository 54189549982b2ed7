"""Sans-I/O codec for the long-connection protocol (protobuf ``pbbp2.Frame``).

Bytes in, plain values out, and back: no sockets, no clock. The encoding is done with the SDK's own
generated module, so the fake cannot drift from what ``lark_oapi.ws.client`` parses.

Wire facts (read in ``lark_oapi/ws/client.py``):

- ``method`` 0 is a control frame (header ``type`` = ``ping`` | ``pong``), 1 a data frame
  (``type`` = ``event`` | ``card``; headers ``message_id``, ``sum``, ``seq``, ``trace_id``).
- A pong may carry a JSON ``ClientConfig`` payload, which the SDK applies at once.
- The SDK acknowledges a data frame by sending the SAME frame back (headers kept, ``biz_rt`` added)
  with the payload replaced by JSON ``{"code": 200}`` (500 when its handler raised or no handler
  was registered). A split event is acknowledged once, on the frame that completed it.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from lark_oapi.ws.pb.pbbp2_pb2 import Frame


class FrameMethod(IntEnum):
    CONTROL = 0
    DATA = 1


class FrameType(StrEnum):
    PING = "ping"
    PONG = "pong"
    EVENT = "event"
    CARD = "card"


@dataclass(frozen=True)
class ClientConfig:
    """What discovery (and optionally each pong) tells the SDK. Times are seconds.

    The real platform sends integers (production: ping 120, reconnect 120, nonce 30, count -1). The
    SDK only feeds these to ``asyncio.sleep`` and ``random() * nonce``, so fractions work and keep
    tests fast; that is the one liberty taken here.
    """

    ping_interval: float = 1
    reconnect_interval: float = 1
    reconnect_nonce: float = 0
    reconnect_count: int = -1

    def to_wire(self) -> dict[str, float]:
        return {
            "PingInterval": self.ping_interval,
            "ReconnectInterval": self.reconnect_interval,
            "ReconnectNonce": self.reconnect_nonce,
            "ReconnectCount": self.reconnect_count,
        }


@dataclass(frozen=True)
class InboundFrame:
    """A frame the client sent, reduced to what the fake acts on."""

    method: FrameMethod
    type: str
    service: int
    headers: dict[str, str]
    payload: bytes

    @property
    def message_id(self) -> str:
        return self.headers.get("message_id", "")

    def ack_code(self) -> int:
        """The ``code`` of an acknowledgement payload; raises ``ValueError`` when it has none."""
        try:
            body = json.loads(self.payload)
            return int(body["code"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"expected an ack payload with a code, got {self.payload[:200]!r}") from exc

    def ack_data(self) -> Any:
        """The handler's answer an acknowledgement carries (base64 JSON in ``data``: a card
        callback's toast), or None."""
        try:
            data = json.loads(self.payload).get("data")
            return json.loads(base64.b64decode(data)) if data else None
        except (ValueError, TypeError, AttributeError):
            return None

    def biz_rt_ms(self) -> int | None:
        raw = self.headers.get("biz_rt")
        return int(raw) if raw is not None and raw.lstrip("-").isdigit() else None


def parse_frame(data: bytes) -> InboundFrame:
    """Decode one binary WebSocket message; raises ``ValueError`` on anything that is not a Frame."""
    frame = Frame()
    try:
        frame.ParseFromString(data)
    except Exception as exc:  # protobuf raises its own DecodeError type
        raise ValueError(f"not a pbbp2.Frame: {exc}") from exc
    try:
        method = FrameMethod(frame.method)
    except ValueError as exc:
        raise ValueError(f"expected frame method 0 or 1, got {frame.method}") from exc
    headers = {h.key: h.value for h in frame.headers}
    return InboundFrame(
        method=method,
        type=headers.get("type", ""),
        service=frame.service,
        headers=headers,
        payload=bytes(frame.payload),
    )


def _encode(
    *,
    method: FrameMethod,
    service: int,
    seq_id: int,
    log_id: int,
    headers: list[tuple[str, str]],
    payload: bytes | None,
) -> bytes:
    frame = Frame()
    frame.SeqID = seq_id
    frame.LogID = log_id
    frame.service = service
    frame.method = int(method)
    for key, value in headers:
        header = frame.headers.add()
        header.key = key
        header.value = value
    if payload is not None:
        frame.payload = payload
    return bytes(frame.SerializeToString())


def pong_frame(service: int, config: ClientConfig | None) -> bytes:
    """A pong; with ``config`` it also carries a ``ClientConfig`` the SDK will adopt."""
    payload = json.dumps(config.to_wire()).encode() if config is not None else None
    return _encode(
        method=FrameMethod.CONTROL,
        service=service,
        seq_id=0,
        log_id=0,
        headers=[("type", FrameType.PONG.value)],
        payload=payload,
    )


def split_payload(payload: bytes, parts: int) -> list[bytes]:
    """Cut ``payload`` into ``parts`` non-empty, nearly equal chunks (in order)."""
    if parts < 1 or parts > max(1, len(payload)):
        raise ValueError(f"expected 1..{max(1, len(payload))} parts, got {parts}")
    size = math.ceil(len(payload) / parts)
    chunks = [payload[i * size : (i + 1) * size] for i in range(parts)]
    if any(not chunk for chunk in chunks):
        # ceil-sized chunks can run out early (e.g. 10 bytes in 4 parts); fall back to floor sizes.
        base, extra = divmod(len(payload), parts)
        chunks, start = [], 0
        for i in range(parts):
            end = start + base + (1 if i < extra else 0)
            chunks.append(payload[start:end])
            start = end
    return chunks


def event_frames(
    payload: bytes,
    *,
    service: int,
    message_id: str,
    trace_id: str,
    seq_id: int,
    log_id: int,
    parts: int = 1,
    frame_type: FrameType = FrameType.EVENT,
) -> list[bytes]:
    """The data frame(s) carrying one event; ``parts`` > 1 splits it with ``sum``/``seq`` headers."""
    chunks = split_payload(payload, parts)
    frames = []
    for seq, chunk in enumerate(chunks):
        headers = [
            ("type", frame_type.value),
            ("message_id", message_id),
            ("sum", str(len(chunks))),
            ("seq", str(seq)),
            ("trace_id", trace_id),
        ]
        frames.append(
            _encode(
                method=FrameMethod.DATA,
                service=service,
                seq_id=seq_id,
                log_id=log_id,
                headers=headers,
                payload=chunk,
            )
        )
    return frames


def ack_frame(data: bytes, code: int = 200, biz_rt_ms: int = 0) -> bytes:
    """What a client sends back for the data frame *data*: the same frame (headers kept, a
    ``biz_rt`` added) with the payload ``{"code": code}``, as ``lark_oapi.ws.client`` does. For
    test clients that speak the protocol without the SDK (it allows one client per process)."""
    frame = Frame()
    frame.ParseFromString(data)
    header = frame.headers.add()
    header.key, header.value = "biz_rt", str(biz_rt_ms)
    frame.payload = json.dumps({"code": code}).encode()
    return bytes(frame.SerializeToString())
