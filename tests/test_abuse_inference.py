"""Abuse suite, inference side: no single request may hurt other users.

Each probe runs against a real server over real sockets (the demo model on the CPU, or
the echo engine where the model does not matter): an answer length past the context, a
conversation of ten thousand messages, pictures that are cheap to send and costly to
decode, garbage pictures. The victim's answer must come normally; the abuser gets a
clear error or a bounded answer.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from server.inference.api import Turn
from server.inference.echo import EchoEngine
from server.inference.engine import Check, PreparedPrompt, keep_going
from server.inference.executor import ExecutorLimits, InferenceExecutor
from tests.serving import Running, make_config, serve
from tests.wsclient import Client


def _png(side: int) -> bytes:
    """A single-colour square PNG: a few kB to send, side * side pixels to decode."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (30, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


# A sequence holds at most 64 + 16 tokens; the KV cache holds 4 * 81: a request for 200 tokens
# fits the cache but not one sequence's page table (as 100,000 does with the default settings).
CONTEXT, ANSWER, ROW_OVERFLOW = 64, 16, 200


@pytest.fixture(scope="module")
def demo(demo_model_dir: Path) -> Iterator[Running]:
    config = make_config(str(demo_model_dir), executor={"max_batch": 4, "prepare_workers": 2})
    model = {"max_context_tokens": CONTEXT, "max_new_tokens": ANSWER, "max_pixels": 64 * 32 * 32}
    config = config.model_copy(update={"model": config.model.model_copy(update=model)})
    with serve(config) as running:
        yield running


async def _wait_idle(running: Running, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while running.service.answers.stats().queue_depth or running.service.answers.stats().active:
        assert time.monotonic() < deadline, running.service.answers.stats()
        await asyncio.sleep(0.02)


# ---- 1. an answer length past the context ---------------------------------------------------------


@pytest.mark.slow
async def test_huge_max_tokens_on_ws_does_not_fail_the_other_answers_in_the_batch(demo: Running) -> None:
    victim, attacker = await Client.open(demo.ws), await Client.open(demo.ws)
    await victim.ask("v", "tell me a long story", max_tokens=12)
    while (await victim.recv(30))["type"] != "delta":  # the victim is decoding ...
        pass
    await attacker.ask("e", "hi", max_tokens=ROW_OVERFLOW)  # ... when the attacker joins its batch
    victim_frames, attacker_frames = await asyncio.gather(
        victim.until_end("v", 60), attacker.until_end("e", 60)
    )
    assert victim_frames[-1]["type"] == "done", victim_frames[-1]
    # Clamped to the room the prompt leaves: max_context_tokens + max_new_tokens in all.
    assert attacker_frames[-1]["type"] == "done", attacker_frames[-1]
    assert attacker_frames[-1]["usage"]["total_tokens"] <= CONTEXT + ANSWER
    await victim.close()
    await attacker.close()
    await _wait_idle(demo)


@pytest.mark.slow
async def test_huge_max_tokens_over_http_is_not_a_500_and_spares_the_victim(demo: Running) -> None:
    url = demo.http + "/v1/chat/completions"
    question = {"model": "demo", "messages": [{"role": "user", "content": "tell me a long story"}]}
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", url, json={**question, "max_tokens": 12, "stream": True}) as victim:
            assert victim.status_code == 200
            lines = victim.aiter_lines()
            while '"content"' not in await anext(lines):  # the victim is decoding ...
                pass
            attacker = await http.post(url, json={**question, "max_tokens": ROW_OVERFLOW})  # ... joins
            rest = [line async for line in lines]
        analyze = await http.post(
            demo.http + "/v1/analyze?stream=false",
            files={"image": ("a.png", _png(64), "image/png")},
            data={"prompt": "hi", "max_tokens": "100000"},
        )
    assert attacker.status_code == 200, attacker.text
    assert attacker.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert attacker.json()["usage"]["total_tokens"] <= CONTEXT + ANSWER
    assert "data: [DONE]" in rest and not any('"error"' in line for line in rest), rest
    assert analyze.status_code == 200, analyze.text
    await _wait_idle(demo)


# ---- 2. ten thousand messages ---------------------------------------------------------------------


def _chat(count: int) -> dict[str, object]:
    messages = [{"role": "user" if n % 2 == 0 else "assistant", "content": "word"} for n in range(count)]
    return {"model": "demo", "messages": messages, "max_tokens": 4}


def test_ten_thousand_messages_are_refused_at_once(demo: Running) -> None:
    started = time.monotonic()
    response = httpx.post(demo.http + "/v1/chat/completions", json=_chat(10_001), timeout=60)
    elapsed = time.monotonic() - started
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "too_large"
    assert "10001 messages" in response.json()["error"]["message"]
    assert elapsed < 10, f"{elapsed:.1f} s"


@pytest.mark.slow
def test_ten_thousand_messages_when_allowed_are_answered_in_seconds(demo_model_dir: Path) -> None:
    config = make_config(str(demo_model_dir), max_turns=20_000)
    # A short context: what is measured is fitting the conversation, not a long prefill on a CPU.
    config = config.model_copy(update={"model": config.model.model_copy(update={"max_context_tokens": 512})})
    with serve(config) as running:
        started = time.monotonic()
        response = httpx.post(running.http + "/v1/chat/completions", json=_chat(10_001), timeout=120)
        elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert elapsed < 20, f"{elapsed:.1f} s"  # it took more than nine minutes


class SlowToPrepare(EchoEngine):
    """Preparing takes a minute in small stages, checking between them, like pictures would."""

    def prepare(self, messages: list[Turn], check: Check = keep_going) -> PreparedPrompt:
        for _ in range(3000):
            check()
            time.sleep(0.02)
        return super().prepare(messages, check)


def _slow_to_prepare(timeout: float = 300.0) -> InferenceExecutor:
    return InferenceExecutor(
        lambda progress: SlowToPrepare(),
        ExecutorLimits(queue_size=16, request_timeout=timeout),
        model_name="slow-to-prepare",
    )


async def test_a_client_that_leaves_frees_its_preparation() -> None:
    with serve(make_config(), executor=_slow_to_prepare()) as running:
        client = await Client.open(running.ws)
        await client.ask("long", "a long conversation")
        assert (await client.recv())["type"] == "queued"
        await client.close()  # gone while its prompt is being prepared
        started = time.monotonic()
        while running.service.answers.stats().queue_depth:
            assert time.monotonic() - started < 10, "the preparation went on after the client left"
            await asyncio.sleep(0.02)


async def test_preparation_stops_at_the_deadline() -> None:
    with serve(make_config(), executor=_slow_to_prepare(timeout=1.0)) as running:
        client = await Client.open(running.ws)
        await client.ask("long", "a long conversation")
        end = (await client.until_end("long", timeout=20))[-1]
        assert (end["type"], end["code"]) == ("error", "timeout")
        assert running.service.answers.stats().queue_depth == 0
        await client.close()


# ---- 3. pictures just under the limits ------------------------------------------------------------


_SERIAL = itertools.count()  # every flood picture distinct, across clients and tests


def _variant(png: bytes, n: int) -> bytes:
    """*png* with a text chunk holding *n*: the same pixels in other bytes, so that nothing
    keyed by a picture's content (the preprocessed-picture cache) spares decoding it."""
    body = b"tEXtn\x00" + str(n).encode()
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return png[:-12] + chunk + png[-12:]  # before IEND, the last 12 bytes


async def _abuse(url: str, side: int, asks: int = 4, pictures: int = 8) -> Client:
    client = await Client.open(url)
    data = _png(side)
    for n in range(asks):
        await client.ask(f"abuse{n}", "look", [_variant(data, next(_SERIAL)) for _ in range(pictures)])
    return client


async def test_pictures_costly_to_decode_are_refused_at_once(demo: Running) -> None:
    client = await _abuse(demo.ws, 9400)
    frames = [await client.recv(10) for _ in range(4)]
    assert [(f["type"], f["code"]) for f in frames] == [("error", "too_large")] * 4, frames
    assert "megapixels" in frames[0]["message"]
    assert demo.service.answers.stats().queue_depth == 0
    await client.close()


@pytest.mark.slow
async def test_text_answers_promptly_while_two_sessions_flood_pictures(demo: Running) -> None:
    process = psutil.Process()
    rss_before = process.memory_info().rss
    # 4,000 x 4,000: under the decoding budget, about a second of CPU and 50 MB each.
    abusers = [await _abuse(demo.ws, 4000), await _abuse(demo.ws, 4000)]
    while demo.service.answers.stats().queue_depth < 8:  # the flood is in
        await asyncio.sleep(0.01)
    rss_peak = process.memory_info().rss
    user = await Client.open(demo.ws)
    started = time.monotonic()
    await user.ask("q", "a question without pictures", max_tokens=2)
    end = (await user.until_end("q", 60))[-1]
    elapsed = time.monotonic() - started
    assert end["type"] == "done", end
    assert elapsed < 5, f"a text question took {elapsed:.1f} s behind the picture flood"
    for _ in range(20):
        rss_peak = max(rss_peak, process.memory_info().rss)
        await asyncio.sleep(0.05)
    for abuser in abusers:
        await abuser.close()  # their preparations stop between pictures
    await _wait_idle(demo, 30)
    assert rss_peak - rss_before < 600 * 2**20, f"{(rss_peak - rss_before) / 2**20:.0f} MB"
    await user.close()


# ---- 6. garbage pictures on /ws ---------------------------------------------------------------------


async def test_garbage_pictures_on_ws_take_no_queue_place(demo: Running) -> None:
    client = await Client.open(demo.ws)
    garbage = base64.b64encode(b"\x89PNG but not really" * 50).decode()
    for n in range(12):
        await client.send({"type": "ask", "id": f"g{n}", "text": "look", "images": [garbage]})
        assert demo.service.answers.stats().queue_depth == 0
    frames = [await client.recv(10) for _ in range(12)]
    assert {(f["type"], f["code"]) for f in frames} == {("error", "bad_image")}, frames
    assert not any(f["type"] == "queued" for f in client.frames)
    assert demo.service.answers.stats().queue_depth == 0
    await client.close()
