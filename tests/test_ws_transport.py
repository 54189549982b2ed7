"""Frames on the wire: several frames in one write (vlbridge's transport), the plain ASGI
fallback under stock uvicorn, and answers consumed by listeners rather than tasks."""

from __future__ import annotations

import gc

import pytest

from server.inference.api import Delta, Done, Event, Events, Failed, InferenceRequest, Queued, Started, Turn
from server.inference.instant import INSTANT_PATH, InstantExecutor
from server.service import Service
from tests.serving import make_config, serve, slow_echo
from tests.waiting import until
from tests.wsclient import Client

# Answers whose frames need RFC 6455's 7-bit, 16-bit and 64-bit lengths (the last one is
# 25,000 three-byte characters, 75 kB, under the 32,768-character question limit).
QUESTIONS = ("x", "x" * 100, "x" * 200, "中" * 25_000)


@pytest.mark.parametrize("ws", ["vlbridge", "websockets-sansio"])
async def test_answers_of_every_frame_length_arrive_whole_and_in_order(ws: str) -> None:
    config = make_config(INSTANT_PATH, max_frame_bytes=1 << 20)
    extra = {} if ws == "vlbridge" else {"ws": ws}  # stock uvicorn: one ASGI send per frame
    with serve(config, **extra) as running:
        client = await Client.open(running.ws)
        for n, question in enumerate(QUESTIONS):
            await client.ask(f"q{n}", question)
            frames = await client.until_end(f"q{n}")
            assert [f["type"] for f in frames] == ["queued", "started", "delta", "done"]
            assert frames[2]["text"] == frames[3]["text"] == f"echo: {question}"
        seqs = [f["seq"] for f in client.frames]
        assert seqs == list(range(1, len(seqs) + 1))
        await client.close()


async def test_instant_backend_cancel_and_stop() -> None:
    executor = InstantExecutor()
    await executor.start()
    request = InferenceRequest("r", [Turn.user("hi", [b"png"])])
    events: list[Event] = []
    executor.submit(request).listen(events.extend)
    assert [type(e) for e in events] == [Queued, Started, Delta, Done]
    assert events[2] == Delta("echo: hi [1 pictures]")
    cancelled = executor.submit(request)
    cancelled.cancel()
    assert [e async for e in cancelled] == [Failed("cancelled", "cancelled")]
    await executor.stop()
    failed = [e async for e in executor.submit(request)]
    assert len(failed) == 1 and isinstance(failed[0], Failed) and failed[0].code == "unavailable"


async def test_a_listener_that_raises_cancels_and_untracks_its_answer() -> None:
    service = Service(make_config(), slow_echo(step_delay=0.01))
    await service.start()
    try:
        seen: list[Event] = []

        def broken(events: Events) -> None:
            seen.extend(events)
            if any(isinstance(event, Delta) for event in events):
                raise RuntimeError("a bug in a listener")

        answer = service.answers.submit(InferenceRequest("r", [Turn.user("a long enough question")]), "ws")
        answer.listen(broken)
        await until(lambda: service.answers.running == 0, "the failed listener's answer to be untracked")
        assert sum(isinstance(e, Delta) for e in seen) == 1  # nothing after the failure
        assert answer.handle.cancelled  # type: ignore[attr-defined]
    finally:
        await service.stop()


class _Holder:
    """A listener that keeps its answer, as the /ws relay does."""

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.events: list[Event] = []

    def on_events(self, events: Events) -> None:
        self.events.extend(events)


@pytest.mark.parametrize("backend", ["instant", "executor"])
async def test_finished_answers_leave_no_reference_cycles_for_the_collector(backend: str) -> None:
    executor = InstantExecutor() if backend == "instant" else slow_echo(step_delay=0.0)
    service = Service(make_config(), executor)
    await service.start()
    try:
        await aiter(service.answers.submit(InferenceRequest("warm", [Turn.user("hi")]), "ws")).__anext__()
        await until(lambda: service.answers.running == 0, "the warm-up answer to finish")
        gc.collect()
        gc.disable()  # what a finished answer leaves must go by reference counting alone
        holders = []
        for n in range(50):  # within the echo executor's queue
            answer = service.answers.submit(InferenceRequest(f"r{n}", [Turn.user("hi")]), "ws")
            holders.append(_Holder(answer))
            answer.listen(holders[-1].on_events)
        await until(lambda: service.answers.running == 0, "50 answers to finish")
        assert all(isinstance(holder.events[-1], Done) for holder in holders)
        del holders, answer
        assert gc.collect() < 50  # a cycle per answer would leave hundreds of objects
    finally:
        gc.enable()
        await service.stop()
