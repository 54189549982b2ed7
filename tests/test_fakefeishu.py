"""The fake Feishu platform is faithful to what lark-oapi sends and expects."""

from __future__ import annotations

import json

import pytest
from lark_oapi.ws.pb.pbbp2_pb2 import Frame

from tests.fakefeishu import frames


def test_split_payload_covers_every_byte() -> None:
    for size, parts in [(10, 4), (7, 7), (100, 3), (1, 1)]:
        payload = bytes(range(size))
        chunks = frames.split_payload(payload, parts)
        assert len(chunks) == parts
        assert all(chunks)
        assert b"".join(chunks) == payload
    with pytest.raises(ValueError, match="parts"):
        frames.split_payload(b"ab", 3)


def test_parse_frame_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="Frame"):
        frames.parse_frame(b"\xff\x00not protobuf")


def test_event_frames_decode_as_the_sdk_reads_them() -> None:
    encoded = frames.event_frames(
        b'{"a": 1}', service=7, message_id="m1", trace_id="t1", seq_id=3, log_id=9, parts=2
    )
    decoded = []
    for data in encoded:
        frame = Frame()
        frame.ParseFromString(data)
        decoded.append((frame.method, frame.service, {h.key: h.value for h in frame.headers}, frame.payload))
    assert [d[2]["seq"] for d in decoded] == ["0", "1"]
    assert {d[2]["sum"] for d in decoded} == {"2"}
    assert {(d[0], d[1], d[2]["type"], d[2]["message_id"], d[2]["trace_id"]) for d in decoded} == {
        (1, 7, "event", "m1", "t1")
    }
    assert b"".join(d[3] for d in decoded) == b'{"a": 1}'


def test_pong_carries_client_config() -> None:
    config = frames.ClientConfig(ping_interval=2, reconnect_interval=3, reconnect_nonce=0)
    pong = frames.parse_frame(frames.pong_frame(5, config))
    assert (pong.method, pong.type, pong.service) == (frames.FrameMethod.CONTROL, "pong", 5)
    assert json.loads(pong.payload) == {
        "PingInterval": 2,
        "ReconnectInterval": 3,
        "ReconnectNonce": 0,
        "ReconnectCount": -1,
    }
