"""Shared pieces of the Feishu adapter tests: configs, a recording executor, adapter startup."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.feishu.adapter import FeishuAdapter
from server.config import Config, load_config
from server.inference.api import Done, Event, Events, Executor, ExecutorStats, InferenceRequest, RequestHandle
from tests.fakefeishu import FakeFeishu
from tests.waiting import DEADLINE, until


def feishu_config(
    fake: FakeFeishu,
    storage: Path,
    *,
    model: str,
    mode: str = "longconn",
    max_new_tokens: int = 16,
    **feishu: Any,
) -> Config:
    """A config pointing the adapter at *fake*, with fast streaming and a watchdog that a busy
    machine does not trip. The worker imports the SDK (10,000 modules, 4 s of CPU): on a 2-core
    machine at load 10 that took 14-25 s, and the watchdog replaces a worker that has not reported
    within max(20 s, 3 intervals), or that is silent or unconnected for 3 intervals. An interval
    of 10 s gives it 30 s; reports then come every 5 s. Tests of the watchdog pass their own."""
    env = {
        "VLBRIDGE_FEISHU_APP_SECRET": fake.app_secret,
        "VLBRIDGE_FEISHU_ENCRYPT_KEY": fake.encrypt_key,
        "VLBRIDGE_FEISHU_VERIFICATION_TOKEN": fake.verification_token,
    }
    config = load_config(None, env)
    values = {
        "enabled": True,
        "app_id": fake.app_id,
        "domain": fake.url,
        "mode": mode,
        "watchdog_interval": 10.0,
        "stream_interval": 0.05,
        **feishu,
    }
    return config.model_copy(
        update={
            "feishu": config.feishu.model_copy(update=values),
            "storage": config.storage.model_copy(update={"path": str(storage)}),
            "model": config.model.model_copy(
                update={"path": model, "device": "cpu", "dtype": "float32", "max_new_tokens": max_new_tokens}
            ),
            "executor": config.executor.model_copy(update={"max_batch": 32, "queue_size": 64}),
        }
    )


@dataclass(eq=False)
class _RecordingHandle:
    inner: RequestHandle
    done: list[Done]

    @property
    def id(self) -> str:
        return self.inner.id

    async def __aiter__(self) -> AsyncIterator[Event]:
        async for event in self.inner:
            self._record(event)
            yield event

    def listen(self, callback: Callable[[Events], None]) -> None:
        def record(events: Events) -> None:
            for event in events:
                self._record(event)
            callback(events)

        self.inner.listen(record)

    def _record(self, event: Event) -> None:
        if isinstance(event, Done):
            self.done.append(event)

    def cancel(self) -> None:
        self.inner.cancel()


@dataclass
class RecordingExecutor:
    """The real executor, plus a record of every request submitted and every Done returned."""

    inner: Executor
    requests: list[InferenceRequest] = field(default_factory=list)
    done: list[Done] = field(default_factory=list)

    def submit(self, request: InferenceRequest) -> RequestHandle:
        self.requests.append(request)
        return _RecordingHandle(self.inner.submit(request), self.done)  # type: ignore[return-value]

    def stats(self) -> ExecutorStats:
        return self.inner.stats()

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self, grace: float = 0.0) -> None:
        await self.inner.stop(grace)


async def started(config: Config, executor: Executor, *, connect: bool = True) -> FeishuAdapter:
    adapter = FeishuAdapter(config, executor)
    await adapter.start()
    if connect and config.feishu.mode == "longconn":
        # A worker start (up to the watchdog's 30 s start limit here), then its next report.
        await until(adapter.healthy, "the adapter to connect", 2 * DEADLINE)
    return adapter


async def settle(adapter: FeishuAdapter, timeout: float = DEADLINE) -> None:
    """Until the adapter has answered everything in its inbox."""
    await until(lambda: adapter.dispatcher.idle, "the adapter to answer everything in its inbox", timeout)
