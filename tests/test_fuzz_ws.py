"""Property-based fuzzing of the protocol v1 frame parser, alone and over a real socket.

1. sans-I/O: `parse_client_frame` on arbitrary bytes and text and on near-valid frames
   (the right keys with wrong types, huge numbers, nested junk, control characters, huge
   strings) returns a typed frame or raises `InvalidFrame` with a known wire code, never
   anything else; what it returns obeys the documented limits.
2. over a real server: a session receives a batch of generated invalid frames, answers
   each with one well-formed error frame in order, and still answers a valid ask.

Deterministic (`derandomize`) and bounded, so the suite stays fast and repeatable.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protocol.v1 import MAX_ID_CHARS, MAX_TEXT_CHARS, ClientFrameType
from server.ws.frames import (
    Ask,
    Cancel,
    FrameLimits,
    InvalidFrame,
    Ping,
    Pong,
    Reset,
    parse_client_frame,
)
from tests.conftest import make_png
from tests.serving import Running, make_config, serve
from tests.wsclient import Client

# Some generated frames are meant to be huge (a 32 KB question): their repr is, too.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

CODES = {"bad_request", "bad_image", "too_large"}  # what the parser may refuse with (docs/protocol.md)
LIMITS = FrameLimits(max_images=2, max_image_bytes=2048)  # small, so "huge" stays cheap
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
FUZZ = settings(derandomize=True, database=None, deadline=None)

# ---- strategies --------------------------------------------------------------------------------

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
numbers = (
    junk
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, -1, 2, 2.5, 10**400, -(10**400), 1e308, True])
)
controls = st.text(st.characters(max_codepoint=0x9F), max_size=8)
ids = (
    junk
    | st.text(max_size=MAX_ID_CHARS + 4)
    | st.builds(lambda a, b: f"{a}{b}", st.text(max_size=4), controls)
    | st.sampled_from(["", "x\nFAKE LOG LINE", "\x1b[2J", "a" * MAX_ID_CHARS, "a" * (MAX_ID_CHARS + 1)])
)
texts = junk | st.text(max_size=40) | st.sampled_from(["", "   ", "x" * (MAX_TEXT_CHARS + 1)])
picture = base64.b64encode(make_png(8, 8)).decode()
image_items = (
    junk
    | st.binary(max_size=64).map(lambda data: base64.b64encode(data).decode())
    | st.text(max_size=12)
    | st.sampled_from(
        [
            picture,
            "data:image/png;base64," + picture,
            "data:image/png," + picture,
            "data:;base64,",
            "A" * (LIMITS.max_image_bytes * 2),
            "====",
        ]
    )
)
images = junk | st.lists(image_items, max_size=LIMITS.max_images + 1)
near_valid = st.fixed_dictionaries(
    {"type": st.sampled_from([str(kind) for kind in ClientFrameType]) | junk},
    optional={
        "id": ids,
        "text": texts,
        "images": images,
        "max_tokens": numbers,
        "temperature": numbers,
        "ts": numbers,
        "extra": junk,
    },
)

# Frames that are valid but for one field: the parser must find that field.
one_bad_field = st.one_of(
    st.builds(lambda i: {"type": "cancel", "id": i}, ids),
    st.builds(lambda i: {"type": "ask", "id": i, "text": "hi"}, ids),
    st.builds(lambda t: {"type": "ask", "id": "q", "text": t}, texts),
    st.builds(lambda m: {"type": "ask", "id": "q", "images": m}, images),
    st.builds(
        lambda n, k: {"type": "ask", "id": "q", "text": "hi", k: n},
        numbers,
        st.sampled_from(["max_tokens", "temperature"]),
    ),
    st.builds(lambda n, k: {"type": k, "ts": n}, numbers, st.sampled_from(["ping", "pong"])),
)


def to_wire(frame: Any, as_bytes: bool) -> str | bytes:
    """JSON as a sloppy client writes it (NaN, Infinity and big integers included)."""
    text = json.dumps(frame)
    return text.encode() if as_bytes else text


frames = (
    st.binary(max_size=200)
    | st.text(max_size=200)
    | st.builds(to_wire, junk, st.booleans())
    | st.builds(to_wire, near_valid, st.booleans())
    | st.builds(to_wire, one_bad_field, st.booleans())
)

# ---- 1. sans-I/O -------------------------------------------------------------------------------


def check_parse(raw: str | bytes, limits: FrameLimits = LIMITS) -> InvalidFrame | None:
    """Parse *raw*; the refusal (checked well-formed), or None for a frame within its limits."""
    try:
        frame = parse_client_frame(raw, limits)
    except InvalidFrame as exc:
        refusal = exc
    else:
        refusal = None
    if refusal is not None:
        assert refusal.code in CODES, refusal.code
        assert isinstance(refusal.message, str) and refusal.message
        assert refusal.ask_id is None or isinstance(refusal.ask_id, str)
        return refusal
    assert isinstance(frame, Ask | Cancel | Reset | Ping | Pong)
    if isinstance(frame, Ask | Cancel):
        assert 0 < len(frame.id) <= MAX_ID_CHARS and not CONTROL.search(frame.id)
    if isinstance(frame, Ask):
        question = frame.question
        assert len(question.text) <= MAX_TEXT_CHARS and len(question.images) <= limits.max_images
        assert question.text.strip() or question.images
        assert all(0 < len(data) <= limits.max_image_bytes for data in question.images)
        params = frame.params
        assert params.max_new_tokens is None or params.max_new_tokens >= 1
        assert 0 <= params.temperature <= 2
    if isinstance(frame, Ping | Pong):
        assert frame.ts is None or isinstance(frame.ts, float)
    return None


@pytest.mark.slow
@settings(FUZZ, max_examples=150)
@given(frames)
def test_the_parser_returns_a_frame_or_a_known_refusal(raw: str | bytes) -> None:
    check_parse(raw)


@pytest.mark.slow
@settings(FUZZ, max_examples=150)
@given(near_valid | one_bad_field)
@example({"type": "ask", "id": "x\nFAKE LOG LINE", "text": "hi"})
def test_near_valid_frames_as_a_dict_too(frame: dict[str, Any]) -> None:
    check_parse(json.dumps(frame))


# ---- 2. over a real socket ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    # Many frames arrive at once: the flood gate is not what this test is about.
    config = make_config(max_frames_per_second=10_000.0, max_images=LIMITS.max_images, max_image_bytes=2048)
    with serve(config) as server:
        yield server


def refused(raw: str | bytes) -> bool:
    """Frames the server must answer with exactly one error (and nothing else)."""
    return isinstance(raw, bytes) or check_parse(raw) is not None


async def _one_session(running: Running, batch: list[str | bytes]) -> None:
    client = await Client.open(running.ws)
    for raw in batch:
        await client.send(raw)
    last_seq = 0
    for raw in batch:
        error = await client.recv(timeout=10)
        assert error["type"] == "error" and error["code"] in CODES, (raw, error)
        assert isinstance(error["message"], str) and error["message"]
        assert error["seq"] > last_seq
        last_seq = error["seq"]
        if isinstance(raw, bytes):
            assert error["code"] == "bad_request" and "id" not in error
        else:
            expected = check_parse(raw)
            assert expected is not None
            assert error["code"] == expected.code
            assert error.get("id") == expected.ask_id
    await client.ask("after", "still answering?")
    assert (await client.until_end("after"))[-1]["type"] == "done"
    await client.close()


@pytest.mark.slow
@settings(FUZZ, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.lists(frames.filter(refused), min_size=1, max_size=25))
def test_a_session_answers_every_invalid_frame_and_stays_usable(
    running: Running, batch: list[str | bytes]
) -> None:
    asyncio.run(_one_session(running, batch))
