"""The executor in a process of its own (server/inference/model_process.py), over the real pipe:
the demo model answers there exactly as in this process; cancellations, refusals and stats cross
the pipe; a model process that dies fails what was open and ends `vlbridge serve` with one line."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from server.backend import build_executor, build_local_executor, in_own_process
from server.config import Config, ExecutorConfig, ModelConfig, StorageConfig
from server.inference.api import (
    Delta,
    Done,
    Event,
    Executor,
    ExecutorState,
    Failed,
    InferenceRequest,
    Queued,
    SamplingParams,
    Started,
    Turn,
)
from server.inference.echo import ECHO_PATH
from server.inference.model_process import ModelProcess
from tests.conftest import make_png
from tests.haproxy import free_port
from tests.waiting import until

DEADLINE = 120.0  # seconds for a model process to start and load the demo model on a busy core
GREEDY = SamplingParams(max_new_tokens=24)
LONG = SamplingParams(max_new_tokens=400, min_new_tokens=400)  # seconds of decoding on a CPU


def demo_config(model_dir: Path, storage: Path) -> Config:
    return Config(
        model=ModelConfig(path=str(model_dir), device="cpu", dtype="float32", max_new_tokens=400),
        executor=ExecutorConfig(max_batch=4, model_process=True),
        storage=StorageConfig(path=str(storage)),
    )


async def collect(executor: Executor, request: InferenceRequest) -> list[Event]:
    return [event async for event in executor.submit(request)]


async def started(config: Config) -> ModelProcess:
    executor = build_executor(config)
    assert isinstance(executor, ModelProcess)
    await executor.start()
    await executor.wait_ready(DEADLINE)
    return executor


def test_a_model_on_a_gpu_runs_in_a_process_of_its_own_unless_configured_otherwise() -> None:
    def config(path: str = "", device: str = "auto", setting: bool | str = "auto") -> Config:
        return Config(
            model=ModelConfig(path=path, device=device), executor=ExecutorConfig(model_process=setting)
        )

    assert in_own_process(config("/models/qwen", "cuda")) and in_own_process(config(device="cuda:1"))
    assert not in_own_process(config("/models/qwen", "cuda", False))
    assert not in_own_process(config("/models/qwen", "cpu")) and not in_own_process(config(ECHO_PATH, "cuda"))
    assert in_own_process(config(ECHO_PATH, "cpu", True)) and in_own_process(
        config("/models/qwen", "cpu", True)
    )
    # auto on a machine with NVIDIA GPUs (without importing torch), e.g. the demo model of `make run`
    assert in_own_process(config()) == Path("/dev/nvidiactl").exists()


async def test_answers_cancellations_and_refusals_cross_the_pipe(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    config = demo_config(demo_model_dir, tmp_path)
    conversations = [
        [Turn.user("Describe it", [make_png(64, 48)])],
        [Turn.user("Just text, no picture")],
        [Turn.user("Two", [make_png(32, 32, (10, 200, 10)), make_png(48, 64, (10, 10, 200))])],
    ]
    # The reference: the same configuration's executor in this process.
    local = build_local_executor(config)
    await local.start()
    await local.wait_ready(DEADLINE)
    try:
        expected = []
        for i, turns in enumerate(conversations):
            *_, done = await collect(local, InferenceRequest(f"local-{i}", turns, GREEDY))
            assert isinstance(done, Done), done
            expected.append(done.token_ids)
    finally:
        await local.stop()

    executor = await started(config)
    try:
        assert executor.stats().state is ExecutorState.READY and executor.stats().model == str(demo_model_dir)
        # Together, batched in the model process: each answer token for token as in this process.
        results = await asyncio.gather(
            *[collect(executor, InferenceRequest(f"far-{i}", t, GREEDY)) for i, t in enumerate(conversations)]
        )
        for events, tokens in zip(results, expected, strict=True):
            assert isinstance(events[0], Queued), events
            assert any(isinstance(e, Started) for e in events)
            done = events[-1]
            assert isinstance(done, Done), done
            assert done.token_ids == tokens
            assert "".join(e.text for e in events if isinstance(e, Delta)) == done.text

        # A cancellation reaches the model process and frees the row; the counts here follow.
        handle = executor.submit(InferenceRequest("long", conversations[1], LONG))
        assert executor.stats().queue_depth == 1  # counted at once, before the model process saw it
        events: list[Event] = []
        async for event in handle:
            events.append(event)
            if isinstance(event, Delta):
                handle.cancel()
        assert isinstance(events[-1], Failed) and events[-1].code == "cancelled", events[-1]
        assert executor.stats().active == 0 and executor.stats().queue_depth == 0

        # A refusal keeps its code and sentence; the model process goes on answering.
        *_, refused = await collect(
            executor, InferenceRequest("bad", [Turn.user("what?", [b"not a picture"])])
        )
        assert isinstance(refused, Failed) and refused.code == "bad_image", refused
        assert "picture" in refused.message
        *_, done = await collect(executor, InferenceRequest("after", conversations[1], GREEDY))
        assert isinstance(done, Done) and done.token_ids == expected[1]
        await until(
            lambda: executor.stats().requests_total == 4, "the model process's stats snapshot", DEADLINE
        )

        # A stop lets the running answer finish within its grace; then nothing is taken.
        running = asyncio.ensure_future(collect(executor, InferenceRequest("last", conversations[1], LONG)))
        await until(lambda: executor.stats().active == 1, "the last answer to start", DEADLINE)
        await executor.stop(grace=DEADLINE)
        assert isinstance((await running)[-1], Done)
        assert executor.stats().state is ExecutorState.STOPPED
        assert executor.pid is not None and not _alive(executor.pid)
        *_, late = await collect(executor, InferenceRequest("late", conversations[1], GREEDY))
        assert isinstance(late, Failed) and late.code == "unavailable", late
    finally:
        await executor.stop()


async def test_a_model_process_that_dies_fails_what_was_open(demo_model_dir: Path, tmp_path: Path) -> None:
    executor = await started(demo_config(demo_model_dir, tmp_path))
    try:
        handle = executor.submit(InferenceRequest("long", [Turn.user("go on")], LONG))
        events: list[Event] = []
        async for event in handle:
            events.append(event)
            if isinstance(event, Delta) and len(events) < 5 and executor.pid is not None:
                os.kill(executor.pid, signal.SIGKILL)  # as the kernel's OOM killer would
        end = events[-1]
        assert isinstance(end, Failed) and end.code == "unavailable", end
        assert end.message == "the model process ended unexpectedly (exit code -9)"
        assert executor.stats().state is ExecutorState.FAILED and executor.lost
        assert executor.load_failure == end.message
        *_, refused = await collect(executor, InferenceRequest("after", [Turn.user("hello")]))
        assert isinstance(refused, Failed) and refused.message == end.message
    finally:
        await executor.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"


def test_vlbridge_serve_ends_with_one_line_when_its_model_process_dies(tmp_path: Path) -> None:
    """The echo engine in a model process (no torch, quick to start); the process is killed as the
    OOM killer would: `vlbridge serve` ends, non-zero, with the reason as its last line."""
    port = free_port()
    env = {
        **os.environ,
        "VLBRIDGE_MODEL_PATH": ECHO_PATH,
        "VLBRIDGE_EXECUTOR_MODEL_PROCESS": "true",
        "VLBRIDGE_STORAGE_PATH": str(tmp_path),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        health: dict[str, object] = {}
        while health.get("state") != "ready":
            assert time.monotonic() < deadline and server.poll() is None, "no ready model process"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
            except httpx.TransportError:
                time.sleep(0.1)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hello"}]},
            timeout=30,
        )
        assert answer.status_code == 200 and "echo: hello" in answer.text, answer.text
        children = subprocess.run(
            ["pgrep", "-P", str(server.pid), "-f", "spawn_main"], capture_output=True, text=True
        ).stdout.split()
        assert len(children) == 1, children
        os.kill(int(children[0]), signal.SIGKILL)
        _, stderr = server.communicate(timeout=DEADLINE)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    lines = stderr.strip().splitlines()
    assert server.returncode == 1, stderr
    assert lines[-1] == "vlbridge: the model process ended unexpectedly (exit code -9)", stderr
    assert "Traceback" not in stderr
