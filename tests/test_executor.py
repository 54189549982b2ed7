"""The real executor with the real (tiny) model: batching correctness, isolation, limits."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.inference.api import (
    Delta,
    Done,
    Event,
    Failed,
    FinishReason,
    InferenceRequest,
    Queued,
    SamplingParams,
    Started,
    Timings,
    Turn,
    Usage,
)
from server.inference.echo import EchoEngine
from server.inference.engine import ReadyTokens, Sequence
from server.inference.executor import ExecutorLimits, InferenceExecutor, coalesce
from server.inference.model.model_engine import EngineOptions, ModelEngine
from tests.conftest import make_png
from tests.executors import demo_executor
from tests.waiting import until

GREEDY = SamplingParams(max_new_tokens=24)


@pytest.fixture
async def executor(demo_model_dir: Path) -> AsyncIterator[InferenceExecutor]:
    options = EngineOptions(max_batch=4, max_context_tokens=4096, max_new_tokens=64)
    ex = demo_executor(demo_model_dir, options, queue_size=8)
    await ex.start()
    await ex.wait_ready(60)
    yield ex
    await ex.stop()


async def collect(ex: InferenceExecutor, request: InferenceRequest) -> list[Event]:
    return [event async for event in ex.submit(request)]


def conversations() -> list[list[Turn]]:
    return [
        [Turn.user("What is in this picture?", [make_png(96, 64, (200, 40, 40))])],
        [Turn.user("Describe it.", [make_png(320, 200, (20, 200, 90))])],
        [Turn.user("hello there")],
        [Turn.user("Two pictures: compare them.", [make_png(64, 64), make_png(128, 300, (0, 0, 250))])],
        [
            Turn.user("What colour?", [make_png(150, 90, (240, 240, 0))]),
            Turn.assistant("It is yellow."),
            Turn.user("Are you sure?"),
        ],
        [Turn.user("A tall one", [make_png(40, 400, (90, 90, 90))])],
    ]


async def test_batched_staggered_and_cancelled_requests_match_running_alone(
    executor: InferenceExecutor,
) -> None:
    convs = conversations()
    alone: list[tuple[int, ...]] = []
    for i, turns in enumerate(convs):
        [*_, done] = await collect(executor, InferenceRequest(f"alone-{i}", turns, GREEDY))
        assert isinstance(done, Done), done
        alone.append(done.token_ids)

    # Stock transformers generate, batched, is the independent reference for the same tokens.
    engine = executor._engine
    assert isinstance(engine, ModelEngine)
    reference = await asyncio.to_thread(engine.runner.generate_reference, convs, GREEDY)
    assert [list(t) for t in alone] == reference

    async def staggered(i: int, turns: list[Turn]) -> list[Event]:
        await asyncio.sleep(0.01 * i)  # arrive while others are already decoding
        return await collect(executor, InferenceRequest(f"batched-{i}", turns, GREEDY))

    async def cancelled_midway(i: int) -> list[Event]:
        handle = executor.submit(InferenceRequest(f"cancel-{i}", convs[i], SamplingParams(max_new_tokens=64)))
        events: list[Event] = []
        async for event in handle:
            events.append(event)
            if sum(isinstance(e, Delta) for e in events) == 3:
                handle.cancel()
        return events

    results = await asyncio.gather(
        *[staggered(i, t) for i, t in enumerate(convs)], cancelled_midway(1), cancelled_midway(3)
    )
    for i, events in enumerate(results[: len(convs)]):
        done = events[-1]
        assert isinstance(done, Done), done
        assert done.token_ids == alone[i], f"request {i} differs when batched"
        assert "".join(e.text for e in events if isinstance(e, Delta)) == done.text
        assert isinstance(events[0], Queued)
        assert any(isinstance(e, Started) for e in events)
    for events in results[len(convs) :]:
        assert isinstance(events[-1], Failed)
        assert events[-1].code == "cancelled"
    assert executor.stats().active == 0
    assert max(executor.batch_sizes) > 1  # it really batched


async def test_two_steps_launched_ahead_answer_as_one_and_fit_their_rows(demo_model_dir: Path) -> None:
    """As on a GPU: the executor launches two decode steps beyond the last it read (`steps_ahead`
    2), so it sees an answer's end two steps late. The same tokens as one step ahead, batched,
    staggered and cancelled; answers that end at their row's last token (the sequence limit)
    do not overrun their pages with the two surplus steps; every page is back afterwards."""
    convs = conversations()
    options = EngineOptions(max_batch=4, max_context_tokens=256, max_new_tokens=64)
    one = demo_executor(demo_model_dir, options, queue_size=8)
    two = demo_executor(demo_model_dir, dataclasses.replace(options, steps_ahead=2), queue_size=8)
    limit = SamplingParams(max_new_tokens=10_000, min_new_tokens=10_000)  # clamped to the row's end
    results: list[list[tuple[int, ...]]] = []

    async def cancelled_midway(ex: InferenceExecutor) -> Event:
        handle = ex.submit(InferenceRequest("cancel", convs[1], SamplingParams(64, min_new_tokens=64)))
        async for event in handle:
            if isinstance(event, Delta):
                handle.cancel()
        return event

    for ex in (one, two):
        await ex.start()
        await ex.wait_ready(60)
        try:
            *answers, end = await asyncio.gather(
                *[collect(ex, InferenceRequest(f"q{i}", t, GREEDY)) for i, t in enumerate(convs)],
                *[collect(ex, InferenceRequest(f"full{i}", convs[i], limit)) for i in (2, 4)],
                cancelled_midway(ex),
            )
            assert isinstance(end, Failed) and end.code == "cancelled", end
            dones = [events[-1] for events in answers]
            assert all(isinstance(done, Done) for done in dones), dones
            results.append([done.token_ids for done in dones if isinstance(done, Done)])
            engine = ex._engine
            assert isinstance(engine, ModelEngine) and engine.steps_ahead == (1 if ex is one else 2)
            for done in dones[-2:]:  # the whole row: prompt + answer = the sequence limit
                assert isinstance(done, Done) and done.finish_reason is FinishReason.LENGTH
                assert done.usage.prompt_tokens + done.usage.completion_tokens == engine.max_sequence_tokens
        finally:
            await ex.stop()
        assert not any(engine.kv.refs)
    assert results[1] == results[0]


async def test_event_loop_stays_responsive_while_decoding(executor: InferenceExecutor) -> None:
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last - 0.005)
            last = now

    tick = asyncio.create_task(ticker())
    convs = conversations()
    for round_ in range(20):  # rounds of answers until the ticker has enough samples taken meanwhile
        await asyncio.gather(
            *[collect(executor, InferenceRequest(f"r{round_}-{i}", t, GREEDY)) for i, t in enumerate(convs)]
        )
        if len(gaps) > 50:
            break
    stop.set()
    await tick
    gaps.sort()
    p99 = gaps[int(len(gaps) * 0.99) - 1]
    assert len(gaps) > 50
    assert p99 < 0.1, f"event loop stalled: p99 extra latency {p99 * 1000:.1f} ms"


def test_coalesce_joins_runs_of_deltas_per_stream_in_order() -> None:
    done = Done("abc", Usage(1, 3), Timings(0, 0, 0))
    batch: list[tuple[str, Event]] = [
        ("a", Started()),
        ("a", Delta("a")),
        ("b", Delta("x")),
        ("a", Delta("b")),
        ("b", Failed("cancelled", "cancelled")),
        ("a", Delta("c")),
        ("a", done),
        ("b", Delta("late")),
    ]
    assert coalesce(batch) == {
        "a": [Started(), Delta("abc"), done],
        "b": [Delta("x"), Failed("cancelled", "cancelled"), Delta("late")],
    }


async def test_deltas_piled_up_behind_a_busy_event_loop_arrive_joined(executor: InferenceExecutor) -> None:
    forty = SamplingParams(max_new_tokens=40, min_new_tokens=40)
    request = InferenceRequest("piled", [Turn.user("hi")], forty)
    events: list[Event] = []
    async for event in executor.submit(request):
        events.append(event)
        if isinstance(event, Delta) and len(events) < 4:
            # Block the loop (as a busy server would) while the worker decodes the rest.
            asyncio.get_running_loop().call_soon(time.sleep, 1.0)
    deltas = [event.text for event in events if isinstance(event, Delta)]
    done = events[-1]
    assert isinstance(done, Done) and done.usage.completion_tokens == 40
    assert "".join(deltas) == done.text
    assert len(deltas) < 10, f"{len(deltas)} deltas for 40 tokens: nothing was joined"


async def test_bad_picture_fails_alone_and_others_finish(executor: InferenceExecutor) -> None:
    good = [
        collect(executor, InferenceRequest(f"ok-{i}", t, GREEDY)) for i, t in enumerate(conversations()[:3])
    ]
    bad = collect(executor, InferenceRequest("bad", [Turn.user("what?", [b"not a picture"])], GREEDY))
    *oks, failed = await asyncio.gather(*good, bad)
    assert all(isinstance(events[-1], Done) for events in oks)
    assert isinstance(failed[-1], Failed)
    assert failed[-1].code == "bad_image"
    assert "picture 1" in failed[-1].message


async def test_full_queue_answers_busy_at_once_with_retry_after(executor: InferenceExecutor) -> None:
    long = SamplingParams(max_new_tokens=64, min_new_tokens=64)
    handles = [executor.submit(InferenceRequest(f"q{i}", [Turn.user("hi")], long)) for i in range(16)]
    firsts = [await anext(aiter(h)) for h in handles]
    busy = [e for e in firsts if isinstance(e, Failed)]
    assert busy, "a queue of 8 behind a batch of 4 cannot take 16"
    assert all(e.code == "busy" and e.retry_after and e.retry_after > 0 for e in busy)
    for handle in handles:
        handle.cancel()


async def test_a_burst_into_free_rows_is_taken_whole(demo_model_dir: Path) -> None:
    """Queue places are for what no free batch row takes: an idle executor with 4 rows and 8
    places takes 12 at once (the Feishu bot hands over as many as rows + places allow: a refusal
    would make a message wait up to 5 s to retry), and refuses the 13th. The first 12 are kept
    listened to and long enough (2048 tokens: seconds a wave) that none ends while the test
    looks, however busy the machine: the test once let their streams go, which cancels them,
    and the 13th was taken when the cancellations ran first (with a core busy)."""
    options = EngineOptions(max_batch=4, max_context_tokens=4096, max_new_tokens=2048)
    executor = demo_executor(demo_model_dir, options, queue_size=8)
    await executor.start()
    try:
        await executor.wait_ready(60)
        long = SamplingParams(max_new_tokens=2048, min_new_tokens=2048)
        handles = [executor.submit(InferenceRequest(f"q{i}", [Turn.user("hi")], long)) for i in range(12)]
        streams = [aiter(h) for h in handles]  # kept: a stream let go of cancels its request
        firsts = [await anext(stream) for stream in streams]
        assert not [e for e in firsts if isinstance(e, Failed)], firsts
        full = (4, 8)  # every row running, every place taken

        def taken() -> tuple[int, int]:
            stats = executor.stats()
            return stats.active, stats.queue_depth

        await until(lambda: taken() == full, "rows and places full")
        more = [executor.submit(InferenceRequest(f"m{i}", [Turn.user("hi")], long)) for i in range(4)]
        refused = [e for e in [await anext(aiter(h)) for h in more] if isinstance(e, Failed)]
        assert len(refused) == 4 and all(e.code == "busy" for e in refused), refused
        for handle in handles + more:
            handle.cancel()
    finally:
        await executor.stop()


async def test_a_fast_executor_that_is_full_says_retry_in_one_second(demo_model_dir: Path) -> None:
    """Once it knows its pace, a refusal names when a place frees up (at least 1 s); the 5 s
    for an executor that has answered nothing yet must not come back because the estimate
    rounds to 0.0 s (a Feishu answer waits `retry_after` before it asks again)."""
    options = EngineOptions(max_batch=4, max_context_tokens=4096, max_new_tokens=64)
    ex = demo_executor(demo_model_dir, options, queue_size=1)
    await ex.start()
    await ex.wait_ready(60)
    try:
        short = SamplingParams(max_new_tokens=1)
        for i in range(4):  # its pace: answers of one token, each in a fraction of a second
            assert isinstance(
                (await collect(ex, InferenceRequest(f"w{i}", [Turn.user("hi")], short)))[-1], Done
            )
        handles = [ex.submit(InferenceRequest(f"q{i}", [Turn.user("hi")], short)) for i in range(8)]
        firsts = [await anext(aiter(h)) for h in handles]
        busy = [e for e in firsts if isinstance(e, Failed)]
        assert busy, "a queue of 1 cannot take 8 at once"
        assert all(e.code == "busy" and e.retry_after == 1.0 for e in busy), busy
        for handle in handles:
            handle.cancel()
    finally:
        await ex.stop()


async def test_mixed_sampling_settings_and_stop_strings_in_one_batch(executor: InferenceExecutor) -> None:
    turns = [Turn.user("Describe it.", [make_png()])]
    [*_, greedy] = await collect(executor, InferenceRequest("g", turns, GREEDY))
    assert isinstance(greedy, Done)
    stop_at = greedy.text[5:8] if len(greedy.text) > 8 else None
    requests = [
        InferenceRequest("greedy", turns, GREEDY),
        InferenceRequest("hot", turns, SamplingParams(max_new_tokens=24, temperature=1.5, top_p=0.9)),
        InferenceRequest("short", turns, SamplingParams(max_new_tokens=3)),
        InferenceRequest("forced", [Turn.user("hi")], SamplingParams(max_new_tokens=20, min_new_tokens=20)),
    ]
    if stop_at:
        requests.append(InferenceRequest("stop", turns, SamplingParams(max_new_tokens=24, stop=(stop_at,))))
    results = await asyncio.gather(*[collect(executor, r) for r in requests])
    done = {r.id: e[-1] for r, e in zip(requests, results, strict=True)}
    assert all(isinstance(d, Done) for d in done.values()), done
    assert done["greedy"].token_ids == greedy.token_ids  # type: ignore[union-attr]
    assert done["short"].usage.completion_tokens == 3  # type: ignore[union-attr]
    assert done["forced"].usage.completion_tokens == 20  # type: ignore[union-attr]
    if stop_at:
        assert done["stop"].text == greedy.text[: greedy.text.index(stop_at)]  # type: ignore[union-attr]


async def test_deadline_and_slot_reuse(executor: InferenceExecutor) -> None:
    long = SamplingParams(max_new_tokens=64, min_new_tokens=64)
    events = await collect(executor, InferenceRequest("slow", [Turn.user("hi")], long, timeout=0.05))
    assert isinstance(events[-1], Failed)
    assert events[-1].code == "timeout"
    [*_, after] = await collect(executor, InferenceRequest("next", [Turn.user("hi")], GREEDY))
    assert isinstance(after, Done)
    engine = executor._engine
    assert isinstance(engine, ModelEngine)
    idle = engine.prefix.idle_pages if engine.prefix is not None else 0
    assert engine.kv.free_pages + idle == engine.kv.pages - 1  # every page came back (or stays cached)
    assert not any(engine.kv.refs)


@pytest.mark.slow
async def test_an_answer_longer_than_a_sequence_holds_is_clamped_not_poison(
    executor: InferenceExecutor,
) -> None:
    """Asking for more tokens than a row's page table holds once failed every row of the step."""
    victim = asyncio.ensure_future(collect(executor, InferenceRequest("victim", [Turn.user("hi")], GREEDY)))
    huge = executor.submit(InferenceRequest("huge", [Turn.user("hi")], SamplingParams(max_new_tokens=10_000)))
    seen: list[Event] = []
    async for event in huge:
        seen.append(event)
        if isinstance(event, Done | Failed) or (victim.done() and isinstance(event, Delta)):
            break
    huge.cancel()  # its clamped answer is thousands of tokens: enough to know it was decoding
    assert not any(isinstance(e, Failed) for e in seen), seen
    assert isinstance((await victim)[-1], Done), (await victim)[-1]


class PoisonedEcho(EchoEngine):
    """Fails every decode step that includes the sequence "poison", as a device error would."""

    def decode(self, seqs: list[Sequence]) -> ReadyTokens:
        if any(seq.id == "poison" for seq in seqs):
            raise IndexError("could not broadcast input array from shape (1563,) into shape (258,)")
        return super().decode(seqs)


async def test_a_step_failing_for_one_row_fails_that_row_only() -> None:
    ex = InferenceExecutor(lambda progress: PoisonedEcho(step_delay=0.005), ExecutorLimits(max_batch=4))
    await ex.start()
    await ex.wait_ready(10)
    try:
        victim = aiter(ex.submit(InferenceRequest("victim", [Turn.user("x" * 200)])))
        victim_events = [await anext(victim)]
        while not isinstance(victim_events[-1], Delta):  # the victim is decoding ...
            victim_events.append(await anext(victim))
        handle = ex.submit(InferenceRequest("poison", [Turn.user("y" * 200)]))  # ... and gets company
        poisoned = [event async for event in handle]
        victim_events += [event async for event in victim]
    finally:
        await ex.stop()
    assert isinstance(poisoned[-1], Failed) and poisoned[-1].code == "internal"
    assert isinstance(victim_events[-1], Done), victim_events[-1]
    assert victim_events[-1].text == "echo: " + "x" * 200


async def test_max_new_tokens_past_the_sequence_limit_is_clamped() -> None:
    ex = InferenceExecutor(lambda progress: EchoEngine(capacity=41), ExecutorLimits())
    await ex.start()
    await ex.wait_ready(10)
    try:
        question = Turn.user("a question much longer than what fits")  # 38 prompt tokens: 2 left
        events = await collect(ex, InferenceRequest("q", [question], SamplingParams(max_new_tokens=100_000)))
    finally:
        await ex.stop()
    done = events[-1]
    assert isinstance(done, Done), done
    assert (done.text, done.finish_reason) == ("ec", FinishReason.LENGTH)
    assert done.usage.prompt_tokens + done.usage.completion_tokens <= 40
