"""Pictures decoded in worker processes (server/inference/picture_processes.py): the same answers
and errors as on the threads, cancellation, a dead worker replaced, no shared memory left over."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from protocol.pictures import ImageLimits
from server.errors import BadImage, Cancelled, InternalError, RequestError
from server.inference.api import Done, Event, Failed, InferenceRequest, Turn
from server.inference.executor import InferenceExecutor
from server.inference.images import decode_image
from server.inference.model.model_engine import EngineOptions, ModelEngine
from server.inference.picture_processes import SEGMENT_PREFIX, PictureProcesses, prepare_processes
from tests.conftest import make_png
from tests.dying_decoder import crash
from tests.executors import demo_executor
from tests.test_executor import GREEDY, collect, conversations
from tests.waiting import DEADLINE, until, until_blocking

SHM = Path("/dev/shm")


def segments() -> list[str]:
    """This process's shared-memory segments still there."""
    prefix = f"{SEGMENT_PREFIX}{os.getpid()}-"
    return sorted(p.name for p in SHM.iterdir() if p.name.startswith(prefix)) if SHM.is_dir() else []


def array(shape: tuple[int, ...]) -> np.ndarray:
    return np.empty(shape, np.uint8)


def never_stop() -> None:
    pass


@pytest.fixture
def processes() -> Iterator[PictureProcesses]:
    pool = PictureProcesses(2)
    yield pool
    pool.shutdown()


def test_auto_size_uses_processes_only_on_machines_with_cores_to_spare() -> None:
    assert prepare_processes(-1, 2) == 0  # the development machine: threads, as before
    assert prepare_processes(-1, 4) == 0
    assert prepare_processes(-1, 8) == 4
    assert prepare_processes(-1, 16) == 8
    assert prepare_processes(-1, 128) == 8
    assert prepare_processes(3, 2) == 3  # what is configured, is used
    assert prepare_processes(0, 128) == 0


def test_pixels_and_errors_are_those_of_the_threads(processes: PictureProcesses) -> None:
    limits = ImageLimits()
    pictures = [make_png(96, 64), b"not a picture", make_png(40, 400, (90, 90, 90))]
    out = processes.decode(pictures, limits, never_stop, array)
    assert isinstance(out[0], np.ndarray) and isinstance(out[2], np.ndarray)
    assert np.array_equal(out[0], np.asarray(decode_image(pictures[0], limits)))
    assert np.array_equal(out[2], np.asarray(decode_image(pictures[2], limits)))
    assert isinstance(out[1], BadImage)
    with pytest.raises(BadImage) as on_thread:
        decode_image(pictures[1], limits)
    assert out[1].message == on_thread.value.message
    processes.shutdown()
    assert segments() == []


def test_a_stopped_request_abandons_its_pictures_and_leaves_no_segment(processes: PictureProcesses) -> None:
    processes.start()
    pictures = [make_png(900, 900, (i, 0, 0)) for i in range(6)]

    def stop() -> None:
        raise Cancelled("cancelled")

    with pytest.raises(Cancelled):
        processes.decode(pictures, ImageLimits(), stop, array)
    processes.shutdown()  # running decodes finish; whatever they wrote is removed
    assert segments() == []


def test_a_killed_worker_process_is_replaced(processes: PictureProcesses) -> None:
    first = processes.start()
    os.kill(first[0], signal.SIGKILL)
    expected = np.asarray(decode_image(make_png(), ImageLimits()))

    def decoded_on_a_new_pool() -> bool:
        [pixels] = processes.decode([make_png()], ImageLimits(), never_stop, array)
        assert isinstance(pixels, np.ndarray) and np.array_equal(pixels, expected)  # never an error
        return processes.replaced == 1

    until_blocking(decoded_on_a_new_pool, "the broken pool replaced", poll=0.05)
    assert first[0] not in processes.pids()
    processes.shutdown()
    assert segments() == []


def test_a_worker_that_dies_on_every_picture_gives_a_clear_error_not_a_hang() -> None:
    pool = PictureProcesses(1, worker=crash)
    try:
        with pytest.raises(InternalError, match="decoder stopped unexpectedly"):
            pool.decode([make_png()], ImageLimits(), never_stop, array)
        assert pool.replaced == 2
    finally:
        pool.shutdown()
    assert segments() == []


def test_after_shutdown_decoding_is_refused_as_unavailable(processes: PictureProcesses) -> None:
    processes.shutdown()
    with pytest.raises(RequestError) as refused:
        processes.decode([make_png()], ImageLimits(), never_stop, array)
    assert refused.value.code == "unavailable"


def processes_executor(demo_model_dir: Path, prepare_processes: int) -> InferenceExecutor:
    options = EngineOptions(
        max_batch=4, max_context_tokens=4096, max_new_tokens=64, prepare_processes=prepare_processes
    )
    return demo_executor(demo_model_dir, options)


@pytest.fixture
async def two_executors(demo_model_dir: Path) -> AsyncIterator[tuple[InferenceExecutor, InferenceExecutor]]:
    threads, processes = processes_executor(demo_model_dir, 0), processes_executor(demo_model_dir, 2)
    for ex in (threads, processes):
        await ex.start()
        await ex.wait_ready(120)
    try:
        yield threads, processes
    finally:
        await threads.stop()
        await processes.stop()


def bad_requests() -> list[list[Turn]]:
    return [
        [Turn.user("what?", [b"not a picture"])],
        [Turn.user("and this?", [make_png(), make_png(64, 64)[:60]])],  # the second one truncated
    ]


async def test_executor_with_processes_answers_and_fails_exactly_as_with_threads(
    two_executors: tuple[InferenceExecutor, InferenceExecutor],
) -> None:
    threads, processes = two_executors
    engine = processes._engine
    assert isinstance(engine, ModelEngine) and engine.picture_processes is not None
    pids = engine.picture_processes.pids()
    assert len(pids) == 2  # started at warm-up

    async def run(ex: InferenceExecutor, name: str) -> list[Event]:
        requests = [*conversations(), *bad_requests()]
        results = await asyncio.gather(
            *[collect(ex, InferenceRequest(f"{name}-{i}", t, GREEDY)) for i, t in enumerate(requests)]
        )
        return [events[-1] for events in results]

    on_threads, on_processes = await run(threads, "t"), await run(processes, "p")
    for a, b in zip(on_threads, on_processes, strict=True):
        if isinstance(a, Done):
            assert isinstance(b, Done), b
            assert b.token_ids == a.token_ids
        else:
            assert isinstance(a, Failed) and isinstance(b, Failed), (a, b)
            assert (b.code, b.message) == (a.code, a.message)
    assert [e.code for e in on_processes if isinstance(e, Failed)] == ["bad_image", "bad_image"]
    last = on_processes[-1]
    assert isinstance(last, Failed) and "picture 2" in last.message

    # A worker killed between requests: the next picture is decoded by a fresh pool, no error.
    os.kill(pids[0], signal.SIGKILL)

    deadline = time.monotonic() + DEADLINE
    for n in itertools.count():  # the pool sees the death at the latest when it is next asked
        if engine.picture_processes.replaced == 1:
            break
        assert time.monotonic() < deadline, "the killed worker's pool was never replaced"
        turns = [Turn.user("And now?", [make_png(80, 72, (n % 256, 90, 10))])]  # never decoded before
        answers = [await collect(ex, InferenceRequest(f"after-{n}", turns, GREEDY)) for ex in two_executors]
        on_thread, on_process = (events[-1] for events in answers)
        assert isinstance(on_thread, Done) and isinstance(on_process, Done), on_process
        assert on_process.token_ids == on_thread.token_ids
    new_pids = engine.picture_processes.pids()
    assert new_pids and pids[0] not in new_pids
    await processes.stop()
    assert segments() == []
    for pid in [*pids, *new_pids]:
        await until(lambda pid=pid: not alive(pid), f"worker {pid} gone after stop")


def alive(pid: int) -> bool:
    """Whether process *pid* runs (a zombie waiting to be reaped does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


def test_workers_do_not_run_an_unguarded_main_script_again(tmp_path: Path) -> None:
    # A console script calling main() without an `if __name__ == "__main__"` guard, as some
    # installers write them: a spawned worker would run it again (a second server).
    runs = tmp_path / "runs"
    script = tmp_path / "entry"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        f"open({str(runs)!r}, 'a').write(__name__ + '\\n')\n"
        "from server.inference.picture_processes import PictureProcesses\n"
        "pool = PictureProcesses(2)\n"
        "pool.start()\n"
        "pool.shutdown()\n"
    )
    subprocess.run([sys.executable, str(script)], check=True, timeout=DEADLINE * 4, cwd=tmp_path)
    assert runs.read_text().split() == ["__main__"]
