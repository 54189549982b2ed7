"""Prefix and vision-encoder caches: answers identical token for token with and without them.

The demo model in float32 with greedy decoding, through the real executor: follow-ups that
reuse a cached conversation, the same picture with another question, another picture of
the same size at the same place (must not match past the picture's start), a batch mixing
hits and misses, and a pool so small that cached pages must be evicted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest
import torch

from server.inference.api import Done, InferenceRequest, SamplingParams, Turn
from server.inference.executor import InferenceExecutor
from server.inference.model.kvcache import PAGE, PagedKVCache, SeqCache
from server.inference.model.model_engine import EngineOptions, ModelEngine
from server.inference.model.prefix import PrefixCache, full_block_keys, identity, picture_start, picture_token
from tests.conftest import make_png
from tests.executors import demo_executor

GREEDY = SamplingParams(max_new_tokens=20)
RED = make_png(320, 256, (200, 40, 40))  # 80 visual tokens: a picture across a page boundary
BLUE = make_png(320, 256, (30, 60, 220))  # same size, other content


async def start(
    model_dir: Path,
    *,
    caches: bool,
    max_batch_tokens: int = 262_144,
    kv_cache_dtype: Literal["auto", "fp8"] = "auto",
) -> InferenceExecutor:
    options = EngineOptions(
        max_batch=4,
        max_batch_tokens=max_batch_tokens,
        max_context_tokens=1024,
        max_new_tokens=64,
        prefix_cache=caches,
        vision_cache_bytes=64 * 2**20 if caches else 0,
        kv_cache_dtype=kv_cache_dtype,
    )
    executor = demo_executor(model_dir, options, request_timeout=120)
    await executor.start()
    await executor.wait_ready(60)
    return executor


async def answer(executor: InferenceExecutor, turns: list[Turn], name: str) -> Done:
    events = [event async for event in executor.submit(InferenceRequest(name, turns, GREEDY))]
    done = events[-1]
    assert isinstance(done, Done), done
    return done


async def scenario(executor: InferenceExecutor) -> list[tuple[int, ...]]:
    """The same sequence of requests for both runs; every answer's token ids in order."""
    out: list[tuple[int, ...]] = []
    first = [Turn.user("What is in this picture?", [RED])]
    one = await answer(executor, first, "first")
    out.append(one.token_ids)
    follow = [*first, Turn.assistant(one.text), Turn.user("And what colour is it?")]
    two = await answer(executor, follow, "follow-up")
    out.append(two.token_ids)
    third = [*follow, Turn.assistant(two.text), Turn.user("Say it again, briefly.")]
    out.append((await answer(executor, third, "third")).token_ids)
    out.append(
        (await answer(executor, [Turn.user("Describe the picture.", [RED])], "same picture")).token_ids
    )
    out.append((await answer(executor, [Turn.user("What is in this picture?", [BLUE])], "other")).token_ids)
    batch = [
        follow,  # a full hit again
        [Turn.user("What is in this picture?", [BLUE]), Turn.assistant("x"), Turn.user("hm?")],
        [Turn.user("plain text, nothing cached")],
        [Turn.user("Two of them", [RED, BLUE])],
    ]
    dones = await asyncio.gather(*[answer(executor, turns, f"batch-{i}") for i, turns in enumerate(batch)])
    out.extend(done.token_ids for done in dones)
    return out


@pytest.fixture
async def cached(demo_model_dir: Path) -> AsyncIterator[InferenceExecutor]:
    executor = await start(demo_model_dir, caches=True)
    yield executor
    await executor.stop()


@pytest.mark.slow
async def test_caches_change_no_token_and_are_used(cached: InferenceExecutor, demo_model_dir: Path) -> None:
    plain = await start(demo_model_dir, caches=False)
    try:
        expected = await scenario(plain)
    finally:
        await plain.stop()
    got = await scenario(cached)
    assert got == expected
    engine = cached._engine
    assert isinstance(engine, ModelEngine) and engine.prefix is not None
    assert engine.prefix.hits >= 4, engine.prefix.hits  # follow-ups, same picture, the batch
    assert engine.prefix.reused_tokens > 4 * PAGE
    assert engine.vision.hits >= 1  # RED encoded once, then found (the two-picture prompt)


@pytest.mark.slow
async def test_eviction_under_memory_pressure_keeps_answers_exact(demo_model_dir: Path) -> None:
    """A pool of a few requests' worth of pages: cached pages are evicted to admit new ones."""
    plain = await start(demo_model_dir, caches=False, max_batch_tokens=1024)
    tight = await start(demo_model_dir, caches=True, max_batch_tokens=1024)
    try:
        expected = await scenario(plain)
        got = await scenario(tight)
        engine = tight._engine
        assert isinstance(engine, ModelEngine) and engine.prefix is not None
        assert got == expected
        assert engine.prefix.evictions > 0 and engine.prefix.hits > 0
        assert not any(engine.kv.refs)
        assert engine.kv.free_pages + engine.prefix.idle_pages == engine.kv.pages - 1
    finally:
        await plain.stop()
        await tight.stop()


@pytest.mark.slow
async def test_a_float8_kv_cache_gives_the_same_answers_with_and_without_the_caches(
    demo_model_dir: Path,
) -> None:
    """`model.kv_cache_dtype = "fp8"`: keys and values written, gathered for the prefill, copied
    between pages and read by the decode step as float8 (the CPU paths; the CUDA kernels are
    checked at start-up on a GPU, `attention.float8_cache_agrees`): a reused prefix is the same
    bytes as a recomputed one."""
    plain = await start(demo_model_dir, caches=False, kv_cache_dtype="fp8")
    cached = await start(demo_model_dir, caches=True, kv_cache_dtype="fp8")
    wide = await start(demo_model_dir, caches=False)
    try:
        expected = await scenario(plain)
        assert await scenario(cached) == expected
        engine = cached._engine
        assert isinstance(engine, ModelEngine) and engine.prefix is not None
        assert engine.prefix.hits >= 4
        assert all(pool.dtype == torch.float8_e4m3fn for pool in (*engine.kv.keys, *engine.kv.values))
        assert expected != await scenario(wide)  # the float8 rounding shows in greedy answers: it is used
    finally:
        for executor in (plain, cached, wide):
            await executor.stop()


# ---- the pure parts -----------------------------------------------------------------------------------


def test_identity_tells_pictures_apart_and_keeps_text() -> None:
    pad = 7
    ids = [1, 2, pad, pad, 3, 4, pad, pad, pad, 5]
    red, blue = b"r" * 16, b"b" * 16
    ident = identity(ids, pad, [red, blue])
    assert ident[:2] == [1, 2] and ident[4:6] == [3, 4] and ident[9] == 5
    assert ident[2] == ident[3] == picture_token(red) < 0
    assert ident[6] == ident[8] == picture_token(blue) != picture_token(red)
    with pytest.raises(ValueError, match="expected 1 pictures"):
        identity(ids, pad, [red])


def test_a_reused_prefix_never_ends_inside_a_picture() -> None:
    ident = [1, 2, -5, -5, -5, 3]
    assert picture_start(ident, 3) == 2  # inside: back to the picture's first token
    assert picture_start(ident, 4) == 2
    assert picture_start(ident, 2) == 2  # at its start: the picture is computed whole
    assert picture_start(ident, 5) == 5  # right after it
    assert picture_start(ident, 1) == 1


def test_index_shares_full_pages_copies_the_rest_stops_before_a_picture_and_evicts() -> None:
    kv = PagedKVCache(1, 1, 4, 8, torch.float32, torch.device("cpu"))  # 7 usable pages
    cache = PrefixCache(kv)
    first = SeqCache()
    text = list(range(1, 2 * PAGE + 11))  # two full blocks and a partial one
    assert kv.allocate(first, len(text))
    cache.register(first.pages, text)
    kv.free(first)
    assert kv.free_pages + cache.idle_pages == 7 and cache.idle_pages == 3

    longer = [*text, 999, 1000]
    hit = cache.match(longer, full_block_keys(longer))
    assert hit is not None and hit.length == len(text)  # two pages shared, 10 tokens copied
    assert len(hit.shared) == 2 and hit.source is not None and hit.source not in hit.shared

    picture = picture_token(b"p" * 16)
    # A picture starting at token 100 runs past the cached text: the match stops at its start.
    other = [*text[:100], *([picture] * 40)]
    hit = cache.match(other, full_block_keys(other))
    assert hit is not None and hit.length == 100

    cache.use(hit)  # pinned: not evicted below
    second = SeqCache()
    assert kv.allocate(second, 7 * PAGE - 2 * PAGE)  # more than the free list: idle pages evicted
    assert cache.evictions >= 1 and set(hit.shared).isdisjoint(second.pages)
    assert not kv.allocate(SeqCache(), 2 * PAGE)  # everything left is in use
