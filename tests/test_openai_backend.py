"""The openai backend against real OpenAI-compatible upstreams: `vlbridge serve` processes with
the demo model (the service is itself a valid upstream). No fakes between the two."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest

from server.backend import build_executor
from server.config import Config, ExecutorConfig, ModelConfig, load_config
from server.errors import ConfigError
from server.inference.api import (
    Delta,
    Done,
    Event,
    Executor,
    Failed,
    InferenceRequest,
    Queued,
    SamplingParams,
    Started,
    Turn,
)
from server.inference.openai_backend import OpenAIExecutor
from tests.conftest import make_png
from tests.feishu_service import Service
from tests.openai_upstreams import (
    UPSTREAM_KEY,
    answers_counted,
    base_url,
    spawned,
    spawned_together,
    upstream_config,
)
from tests.test_config import run_cli
from tests.waiting import DEADLINE

T = TypeVar("T")
LONG = 400  # tokens: seconds of answer on the demo model, time to act mid-answer


@pytest.fixture(scope="module")
def upstreams(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Service]]:
    """Two demo-model servers, shared by the module (each takes seconds to start)."""
    root = tmp_path_factory.mktemp("upstreams")
    configs = [upstream_config(root / f"{name}.toml", demo_model_dir, root / name) for name in ("a", "b")]
    with spawned_together(configs) as (a, b):
        yield a, b


def bridge(urls: list[str], model: dict[str, Any] | None = None, **executor: Any) -> OpenAIExecutor:
    """The backend as `vlbridge serve` builds it from its configuration."""
    config = Config(
        model=ModelConfig(
            backend="openai",
            **{
                "base_urls": tuple(urls),
                "model": "demo",
                "max_new_tokens": 64,
                "api_key": UPSTREAM_KEY,
                "eject_seconds": 60.0,
                **(model or {}),
            },
        ),
        executor=ExecutorConfig(**executor),
    )
    built = build_executor(config)
    assert isinstance(built, OpenAIExecutor)
    return built


async def started(executor: Executor) -> None:
    await executor.start()
    await eventually(lambda: executor.stats().load_progress == 1.0, "every upstream's first probe")


async def eventually(check: Callable[[], T], what: str) -> T:
    """*check* (which may block: it runs on a thread) until truthy, within the deadline."""
    deadline = time.monotonic() + DEADLINE
    while not (value := await asyncio.to_thread(check)):
        assert time.monotonic() < deadline, f"timed out waiting for {what} (last: {value!r})"
        await asyncio.sleep(0.05)
    return value


def ask(text: str, max_tokens: int, images: tuple[bytes, ...] = ()) -> InferenceRequest:
    return InferenceRequest(f"q-{time.monotonic_ns()}", [Turn.user(text, images)], SamplingParams(max_tokens))


async def until_delta(events: AsyncIterator[Event]) -> list[Event]:
    seen: list[Event] = []
    while not seen or not isinstance(seen[-1], Delta):
        seen.append(await asyncio.wait_for(anext(events), DEADLINE))
        assert not isinstance(seen[-1], Done | Failed), seen
    return seen


async def rest(events: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in events]


def test_serve_streams_through_the_bridge_as_the_upstream_answers_without_torch(
    upstreams: tuple[Service, Service], tmp_path: Path
) -> None:
    upstream = upstreams[0]
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[server]\nport = 0\n[model]\nbackend = "openai"\nbase_urls = ["{base_url(upstream)}"]\n'
        f'model = "demo"\n[storage]\npath = "{tmp_path / "storage"}"\n'
    )
    url = "data:image/png;base64," + base64.b64encode(make_png()).decode()
    body = {
        "model": "demo", "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": "what is it?"}]}],
    }  # fmt: skip
    direct = httpx.post(base_url(upstream) + "/chat/completions", json=body, timeout=DEADLINE,
                        headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}).json()  # fmt: skip
    env = {"VLBRIDGE_MODEL_API_KEY": UPSTREAM_KEY}
    with spawned(config, ["-X", "importtime"], env) as bridged:
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"http://127.0.0.1:{bridged.port}/v1/chat/completions", json=streamed,
                          timeout=DEADLINE) as response:  # fmt: skip
            assert response.status_code == 200
            chunks = [orjson.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        health = bridged.health()
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    texts = [text for text in texts if text]
    assert len(texts) >= 2, chunks  # streamed, not one block at the end
    assert "".join(texts) == direct["choices"][0]["message"]["content"]  # greedy: the same tokens
    assert chunks[-1]["usage"] == direct["usage"]  # the upstream's count, passed on
    assert health["state"] == "ready" and "1/1 upstreams healthy" in health["detail"], health
    imported = [line.rsplit("|", 1)[1].strip() for line in bridged.lines if line.startswith("import time:")]
    assert "server.inference.openai_backend" in imported  # the check below sees the imports
    assert not [name for name in imported if name.split(".")[0] in ("torch", "transformers")]
    assert not any(UPSTREAM_KEY in line for line in bridged.lines), "the API key must never be logged"


async def test_cancelling_closes_the_upstream_stream_and_frees_its_slot(
    upstreams: tuple[Service, Service],
) -> None:
    upstream = upstreams[0]
    executor = bridge([base_url(upstream)])
    await started(executor)
    counted = await asyncio.to_thread(upstream.metrics)
    before, ok_before = answers_counted(counted), answers_counted(counted, "ok")
    handle = executor.submit(ask("tell me a long story", LONG))
    events = aiter(handle)
    await until_delta(events)
    await eventually(lambda: upstream.health()["active"] == 1, "the upstream to be answering")
    handle.cancel()
    assert (await rest(events))[-1] == Failed("cancelled", "cancelled")
    await eventually(lambda: upstream.health()["active"] == 0, "the upstream's slot to be free")
    counted = await eventually(
        lambda: text if answers_counted(text := upstream.metrics()) == before + 1 else "",
        "the upstream's count",
    )
    # Had the stream stayed open, the upstream would have finished the answer and counted it ok.
    assert answers_counted(counted, "ok") == ok_before
    await executor.stop()


async def test_least_outstanding_requests_balance_two_upstreams(upstreams: tuple[Service, Service]) -> None:
    a, b = upstreams
    executor = bridge([base_url(a), base_url(b)], max_batch=8)
    await started(executor)
    first, second = executor.pool.upstreams
    long = executor.submit(ask("a long story", LONG))
    events = aiter(long)
    await until_delta(events)
    assert (first.outstanding, second.outstanding) == (1, 0)
    for _ in range(2):  # one at a time: each goes where fewer are in flight, i.e. not to a
        done = (await rest(aiter(executor.submit(ask("short", 4)))))[-1]
        assert isinstance(done, Done), done
    assert (first.requests, second.requests) == (1, 2)
    long.cancel()
    await rest(events)
    many = [executor.submit(ask(f"question {n}", 6)) for n in range(6)]
    results = await asyncio.gather(*(rest(aiter(handle)) for handle in many))
    assert all(isinstance(result[-1], Done) for result in results), results
    assert (first.requests, second.requests) == (4, 5)  # three each, submitted together
    await executor.stop()


async def test_busy_when_the_bridges_own_queue_is_full(upstreams: tuple[Service, Service]) -> None:
    executor = bridge([base_url(upstreams[1])], max_batch=1, queue_size=1)
    await started(executor)
    running = executor.submit(ask("a long story", LONG))
    running_events = aiter(running)
    await until_delta(running_events)
    waiting = executor.submit(ask("next", 4))
    waiting_events = aiter(waiting)
    assert await anext(waiting_events) == Queued(1)
    refused = await rest(aiter(executor.submit(ask("one too many", 4))))
    assert len(refused) == 1 and isinstance(refused[0], Failed) and refused[0].code == "busy", refused
    assert refused[0].retry_after is not None and refused[0].retry_after >= 1
    assert executor.stats().queue_depth == 1 and executor.stats().active == 1
    running.cancel()  # its place goes to the waiting one
    assert await asyncio.wait_for(anext(waiting_events), DEADLINE) == Started()
    assert isinstance((await rest(waiting_events))[-1], Done)
    await executor.stop()


async def test_an_upstream_killed_mid_answer_fails_it_and_before_the_first_text_is_retried(
    upstreams: tuple[Service, Service], demo_model_dir: Path, tmp_path: Path
) -> None:
    healthy = upstreams[0]
    with spawned(upstream_config(tmp_path / "victim.toml", demo_model_dir, tmp_path / "victim")) as victim:
        urls = [base_url(victim), base_url(healthy)]  # the victim first: ties go to it
        streaming, unaware = bridge(urls), bridge(urls)
        await started(streaming)
        await started(unaware)
        handle = streaming.submit(ask("a long story", LONG))
        events = aiter(handle)
        await until_delta(events)
        await asyncio.to_thread(victim.kill_group)
    end = await rest(events)
    assert len(end) >= 1 and isinstance(end[-1], Failed), end
    assert end[-1].code == "unavailable" and "broke off the answer" in end[-1].message, end[-1]
    assert f"{base_url(victim)} ejected" in streaming.stats().detail
    # `unaware` still counts the victim healthy: its request goes there, finds nobody, and is
    # answered by the other upstream; the caller sees one answer.
    answer = await rest(aiter(unaware.submit(ask("short", 4))))
    assert isinstance(answer[-1], Done) and not [e for e in answer if isinstance(e, Failed)], answer
    dead, alive = unaware.pool.upstreams
    assert (dead.requests, alive.requests) == (1, 1) and dead.health.value == "ejected"
    assert unaware.stats().state.value == "ready"
    await streaming.stop()
    await unaware.stop()


async def test_no_reachable_upstream_is_unavailable_at_once() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    executor = bridge([f"http://127.0.0.1:{port}/v1"])
    await started(executor)
    stats = executor.stats()
    assert stats.state.value == "failed" and f"127.0.0.1:{port}/v1 ejected" in stats.detail, stats
    refused = await rest(aiter(executor.submit(ask("anyone?", 4))))
    assert len(refused) == 1 and isinstance(refused[0], Failed) and refused[0].code == "unavailable"
    assert refused[0].retry_after is not None and refused[0].retry_after > 1
    await executor.stop()


def test_the_api_key_comes_only_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text('[model]\nbackend = "openai"\nbase_urls = ["http://gpu:8000/v1/"]\napi_key = "sk-1"\n')
    with pytest.raises(ConfigError, match="VLBRIDGE_MODEL_API_KEY"):
        load_config(path)
    path.write_text('[model]\nbackend = "openai"\nbase_urls = ["http://gpu:8000/v1/"]\n')
    config = load_config(path, {"VLBRIDGE_MODEL_API_KEY": "sk-1"})
    assert config.model.api_key.get_secret_value() == "sk-1" and "sk-1" not in repr(config)
    assert config.model.base_urls == ("http://gpu:8000/v1",)
    checked = run_cli("check-config", str(path))
    assert "OK" in checked.stdout and "model the upstreams' first at http://gpu:8000/v1" in checked.stdout
    path.write_text('[model]\nbackend = "openai"\n')
    with pytest.raises(ConfigError, match=r'model.base_urls: backend "openai" needs at least one URL'):
        load_config(path)


async def test_a_request_the_upstream_refuses_fails_with_its_code_and_is_not_retried(
    upstreams: tuple[Service, Service],
) -> None:
    a, b = upstreams
    executor = bridge([base_url(a), base_url(b)])
    await started(executor)
    events = await rest(aiter(executor.submit(ask("what is it?", 4, (b"GIF89a not really a picture",)))))
    assert isinstance(events[-1], Failed) and events[-1].code == "bad_image", events
    assert [u.requests for u in executor.pool.upstreams] == [1, 0]  # the other would refuse it too
    assert executor.stats().detail == "2/2 upstreams healthy"  # a bad request says nothing of its server
    await executor.stop()


async def test_timeouts_end_the_answer_and_free_the_upstream(upstreams: tuple[Service, Service]) -> None:
    upstream = upstreams[1]
    executor = bridge([base_url(upstream)])
    impatient = bridge([base_url(upstream)], {"first_token_timeout": 0.001})
    await started(executor)
    await started(impatient)
    ok_before = answers_counted(await asyncio.to_thread(upstream.metrics), "ok")
    request = ask("a long story", LONG)
    # The whole answer's time: far less than LONG tokens take (0.67 s on an idle 2-core VM,
    # where 1.0 s let the answer finish first).
    request.timeout = 0.2
    events = await rest(aiter(executor.submit(request)))
    assert isinstance(events[-1], Failed) and events[-1].code == "timeout", events[-1]
    first = await rest(aiter(impatient.submit(ask("a long story", LONG))))
    assert first[-1] == Failed("timeout", "no text within 0 s"), first
    assert not [event for event in first if isinstance(event, Delta)]
    await eventually(lambda: upstream.health()["active"] == 0, "the upstream's slots to be free")
    assert answers_counted(await asyncio.to_thread(upstream.metrics), "ok") == ok_before
    assert executor.stats().detail == impatient.stats().detail == "1/1 upstreams healthy"
    await executor.stop()
    await impatient.stop()


async def test_an_upstream_that_stops_answering_is_ejected_and_probed_back(
    upstreams: tuple[Service, Service],
) -> None:
    a, b = upstreams
    executor = bridge([base_url(a), base_url(b)], {"eject_seconds": 0.2, "connect_timeout": 0.5})
    os.kill(b.process.pid, signal.SIGSTOP)  # connections queue in the kernel; nothing answers
    try:
        await started(executor)
        assert executor.stats().detail.startswith(f"1/2 upstreams healthy; {base_url(b)} ejected: probe:")
        answers = [await rest(aiter(executor.submit(ask(f"q{n}", 4)))) for n in range(2)]
        assert all(isinstance(events[-1], Done) for events in answers), answers
        assert [u.requests for u in executor.pool.upstreams] == [2, 0]  # none sent to the ejected one
    finally:
        os.kill(b.process.pid, signal.SIGCONT)
    await eventually(lambda: executor.stats().detail == "2/2 upstreams healthy", "the probe to take it back")
    many = [executor.submit(ask(f"question {n}", 4)) for n in range(2)]
    results = await asyncio.gather(*(rest(aiter(handle)) for handle in many))
    assert all(isinstance(events[-1], Done) for events in results), results
    assert [u.requests for u in executor.pool.upstreams] == [3, 1]
    await executor.stop()
