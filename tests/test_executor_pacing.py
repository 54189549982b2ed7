"""Pacing of the executor: while answers stream, a wave of new prompts is prefilled a bounded
slice at a time; an answer's text reaches the event loop at a bounded rate; timings are logged."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest

from server.inference.api import Delta, Done, Events, InferenceRequest, SamplingParams, Turn
from server.inference.echo import EchoEngine
from server.inference.engine import PreparedPrompt, ReadyTokens, Sequence
from server.inference.executor import ExecutorLimits, InferenceExecutor, prefill_cost, slice_budget
from server.inference.profile import Profile


class RecordingEcho(EchoEngine):
    """The echo engine, noting for each prefill its work and how many rows were decoding then."""

    def __init__(self) -> None:
        super().__init__(step_delay=0.002)
        self.active = 0
        self.prefills: list[tuple[int, int]] = []  # (prefill_cost of the batch, rows decoding)

    def reserve(self, seq: Sequence) -> bool:
        reserved = super().reserve(seq)
        self.active += reserved
        return reserved

    def prefill(self, seqs: list[Sequence]) -> ReadyTokens:
        self.prefills.append((sum(prefill_cost(s.prompt) for s in seqs), self.active - len(seqs)))
        return super().prefill(seqs)

    def release(self, seq: Sequence) -> None:
        if seq.state:
            self.active -= 1
        super().release(seq)


async def answer(ex: InferenceExecutor, request: InferenceRequest) -> Done:
    [*_, done] = [event async for event in ex.submit(request)]
    assert isinstance(done, Done), done
    return done


async def drain(ex: InferenceExecutor, request: InferenceRequest) -> None:
    async for _ in ex.submit(request):
        pass


def test_prefill_cost_counts_picture_tokens_twice() -> None:
    assert prefill_cost(PreparedPrompt(length=1100, image_tokens=1024, data=None)) == 2124
    assert prefill_cost(PreparedPrompt(length=30, image_tokens=0, data=None)) == 30


async def test_a_wave_of_prompts_is_prefilled_in_slices_while_others_decode() -> None:
    engine = RecordingEcho()
    limits = ExecutorLimits(
        max_batch=16,
        queue_size=32,
        max_new_tokens=4096,
        prefill_tokens=4000,
        prefill_tokens_decoding=100,
        prefill_stall_target=0,  # fixed slices (the grown ones: the test below)
    )
    ex = InferenceExecutor(lambda progress: engine, limits, model_name="recording-echo")
    await ex.start()
    await ex.wait_ready(30)
    try:
        # One long answer keeps decoding (forced to 3000 tokens: several seconds of 2 ms steps) ...
        long = SamplingParams(max_new_tokens=3000, min_new_tokens=3000)
        streaming = asyncio.create_task(drain(ex, InferenceRequest("long", [Turn.user("go")], long)))
        while not engine.prefills:  # its prefill ran: it is decoding from now on
            await asyncio.sleep(0.01)
        # ... while 8 prompts of cost 41 each arrive at once: 328 in all, 2 fit in a slice of 100.
        wave = [
            asyncio.create_task(
                answer(ex, InferenceRequest(f"w{i}", [Turn.user(f"{i}" * 40)], SamplingParams(4)))
            )
            for i in range(8)
        ]
        for done in await asyncio.wait_for(asyncio.gather(*wave), 60):
            assert done.text == "echo"  # 4 tokens
        assert not streaming.done(), "the long answer ended before the wave was prefilled: no overlap tested"
        while_decoding = [(cost, rows) for cost, rows in engine.prefills[1:] if rows]
        assert sum(cost for cost, _ in while_decoding) == 8 * 41, engine.prefills
        assert max(cost for cost, _ in while_decoding) <= 100, engine.prefills
        streaming.cancel()  # the caller stops listening: the executor drops the long answer
        await asyncio.gather(streaming, return_exceptions=True)
    finally:
        await ex.stop()


def test_slice_budget_grows_to_what_fits_the_stall_target_between_base_and_ceiling() -> None:
    # 8 us a unit, a 4 ms step, 104 ms target: (0.104 - 0.004) / 8e-6 = 12500 units fit.
    assert slice_budget(8192, 16384, 8e-6, 0.104, 0.004) in (12499, 12500)  # float rounding
    assert slice_budget(8192, 16384, 1e-6, 0.12, 0.004) == 16384  # cheap prefill: the ceiling
    assert slice_budget(8192, 16384, 1e-4, 0.12, 0.004) == 8192  # dear prefill: never below the base
    assert slice_budget(8192, 16384, 0.0, 0.12, 0.004) == 8192  # nothing measured yet
    assert slice_budget(8192, 16384, 1e-6, 0.0, 0.004) == 8192  # target 0: fixed slices
    assert slice_budget(8192, 4096, 1e-6, 0.12, 0.004) == 4096  # the base over the ceiling


class CostlyEcho(RecordingEcho):
    """Prefill costs 1 ms of the worker's time per unit of prefill work."""

    def prefill(self, seqs: list[Sequence]) -> ReadyTokens:
        time.sleep(0.001 * sum(prefill_cost(s.prompt) for s in seqs))
        return super().prefill(seqs)


async def test_slices_grow_with_a_long_queue_while_their_pause_stays_within_the_target() -> None:
    engine = CostlyEcho()
    limits = ExecutorLimits(
        max_batch=16,
        queue_size=32,
        max_new_tokens=4096,
        prefill_tokens=4000,
        prefill_tokens_decoding=50,  # one prompt of 41 a slice at the base
        prefill_stall_target=0.2,  # at 1 ms a unit: ~200 units, 4 prompts a slice
    )
    ex = InferenceExecutor(lambda progress: engine, limits, model_name="costly-echo")
    await ex.start()
    await ex.wait_ready(30)
    try:
        long = SamplingParams(max_new_tokens=6000, min_new_tokens=6000)
        streaming = asyncio.create_task(drain(ex, InferenceRequest("long", [Turn.user("go")], long)))
        while len(ex.step_times) < 8:  # decoding, with a plain step measured
            await asyncio.sleep(0.01)
        wave = [
            asyncio.create_task(
                answer(ex, InferenceRequest(f"w{i}", [Turn.user(f"{i:02}" * 20)], SamplingParams(4)))
            )
            for i in range(12)
        ]
        for done in await asyncio.wait_for(asyncio.gather(*wave), 60):
            assert done.text == "echo"
        assert not streaming.done(), "the long answer ended before the wave was prefilled: no overlap tested"
        slices = [cost for cost, rows in engine.prefills[1:] if rows]
        assert sum(slices) == 12 * 41, engine.prefills
        assert max(slices) > 50, slices  # grew past the base once a slice's cost was measured
        # ~1 ms a unit measured (more on a busy machine: smaller slices), so at most ~200 units
        # fit; wide margin for a step measured slower than this stall's own.
        assert max(slices) <= 300, slices
        assert 0.0005 < ex.unit_seconds < 0.01, (ex.unit_seconds, slices)
        streaming.cancel()
        await asyncio.gather(streaming, return_exceptions=True)
    finally:
        await ex.stop()


def test_profile_logs_percentiles_and_sizes_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    profile = Profile(logging.getLogger("vlbridge.profile"), "executor", interval=3600)
    with caplog.at_level(logging.INFO, logger="vlbridge.profile"):
        for ms in range(1, 101):
            profile.record("decode_step", ms / 1000)
        profile.count("rows", 4)
        profile.count("rows", 8)
        assert not caplog.records  # the interval has not passed
        profile.flush()
        profile.flush()  # nothing recorded since: no second line
    [line] = [r.getMessage() for r in caplog.records]
    assert "decode_step n=100 p50=51.0 p95=96.0 max=100.0" in line, line
    assert "rows mean=6.0 max=8" in line, line


async def test_text_reaches_the_event_loop_at_most_once_per_stream_interval() -> None:
    # 1 ms steps, text handed over every 50 ms: without pacing, about one hand-off per step.
    limits = ExecutorLimits(max_batch=4, queue_size=8, max_new_tokens=400, stream_interval=0.05)
    ex = InferenceExecutor(lambda progress: EchoEngine(step_delay=0.001), limits, model_name="echo")
    await ex.start()
    await ex.wait_ready(30)
    try:
        batches: list[tuple[float, Events]] = []
        ended = asyncio.Event()

        def listener(events: Events) -> None:
            batches.append((time.monotonic(), events))
            if any(isinstance(e, Done) for e in events):
                ended.set()

        forced = SamplingParams(max_new_tokens=300, min_new_tokens=300)
        ex.submit(InferenceRequest("paced", [Turn.user("hi")], forced)).listen(listener)
        await asyncio.wait_for(ended.wait(), 60)
        text = [e for _, events in batches for e in events if isinstance(e, Delta)]
        [done] = [e for _, events in batches for e in events if isinstance(e, Done)]
        assert "".join(d.text for d in text) == done.text and len(done.token_ids) == 300
        with_text = [at for at, events in batches if any(isinstance(e, Delta) for e in events)]
        elapsed = with_text[-1] - with_text[0]
        # the first text at once, then at most one hand-off per interval (the last with `done`)
        assert len(with_text) <= 2 + elapsed / 0.05, (len(with_text), elapsed)
    finally:
        await ex.stop()


async def test_the_engines_objects_are_kept_out_of_the_collectors_full_passes() -> None:
    ex = InferenceExecutor(lambda progress: EchoEngine(), ExecutorLimits(), model_name="echo")
    await ex.start()
    await ex.wait_ready(30)
    try:
        assert gc.get_freeze_count() > 1000  # the modules imported so far, at least
    finally:
        await ex.stop()
    assert gc.get_freeze_count() == 0  # collectable again once the executor stopped
