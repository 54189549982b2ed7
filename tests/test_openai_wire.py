"""The openai backend's wire with plain values: request bodies, stream chunks, upstream errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from protocol.pictures import decode_base64
from server.inference.api import Failed, InferenceRequest, SamplingParams, Turn
from server.inference.openai_wire import error_of, failed_from, media_type, request_body, sse_chunks
from tests.conftest import make_png


def test_the_request_streams_with_usage_and_sends_pictures_as_data_urls() -> None:
    png = make_png()
    request = InferenceRequest(
        "q1",
        [
            Turn("system", "be brief"),
            Turn.user("what is it?", [png]),
            Turn.assistant("a cat"),
            Turn.user("sure?"),
        ],
        SamplingParams(max_new_tokens=None, temperature=0.5, stop=("\n",), seed=7),
    )
    body = orjson.loads(request_body(request, "Qwen/Qwen3-VL-8B-Instruct", 512))
    assert body["model"] == "Qwen/Qwen3-VL-8B-Instruct" and body["max_tokens"] == 512
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["stop"], body["seed"]) == (0.5, ["\n"], 7) and "min_tokens" not in body
    system, user, assistant, follow = body["messages"]
    assert system == {"role": "system", "content": "be brief"} and follow["content"] == "sure?"
    picture, text = user["content"]
    assert picture["image_url"]["url"].startswith("data:image/png;base64,")
    assert decode_base64(picture["image_url"]["url"], 1, len(png)) == png
    assert text == {"type": "text", "text": "what is it?"} and assistant["content"] == "a cat"


def test_media_types_from_the_first_bytes() -> None:
    assert media_type(make_png()) == "image/png"
    assert media_type(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert media_type(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert media_type(b"GIF89a") == "image/gif"
    assert media_type(b"no idea") == "application/octet-stream"


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def test_stream_chunks_skip_comments_and_end_at_done() -> None:
    chunks = [
        c
        async for c in sse_chunks(
            _lines(": ping", "", 'data: {"a": 1}', "", "data: [DONE]", 'data: {"b": 2}')
        )
    ]
    assert chunks == [{"a": 1}, None]
    with pytest.raises(httpx.RemoteProtocolError, match="not JSON"):
        [c async for c in sse_chunks(_lines("data: {oops"))]


def test_upstream_errors_keep_our_codes_or_map_by_status() -> None:
    vlbridge = error_of(b'{"error": {"code": "bad_image", "message": "picture 1 is not a picture"}}')
    assert failed_from(vlbridge, 400) == Failed("bad_image", "the model server: picture 1 is not a picture")
    openai = error_of(b'{"error": {"message": "too long", "type": "invalid_request_error", "code": null}}')
    assert failed_from(openai, 400).code == "bad_request" and failed_from(openai, 413).code == "too_large"
    old_vllm = error_of(b'{"object": "error", "message": "bad", "type": "BadRequestError", "code": 400}')
    assert failed_from(old_vllm).code == "bad_request"  # in a stream: its code is the status
    assert failed_from({"code": "busy", "message": "full", "retry_after": 3}).retry_after == 3.0
    assert failed_from(error_of(b"<html>oops</html>"), 502).code == "internal"
