"""Pytest fixtures for the fake; ``tests/conftest.py`` re-exports them.

- ``fake_feishu``: a started ``FakeFeishu`` with fast long-connection timing (ping 1 s, reconnect
  0.2 s, no jitter), stopped after the test.
- ``lark_ws``: a factory ``lark_ws(handler, **kw) -> LarkWsThread`` that runs the SDK's long-connection
  client against ``fake_feishu``; every client it started is stopped before the fake is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .fake import FakeFeishu
from .frames import ClientConfig
from .sdkthread import LarkWsThread

FAST = ClientConfig(ping_interval=1, reconnect_interval=0.2, reconnect_nonce=0)


@pytest.fixture
def fake_feishu() -> Iterator[FakeFeishu]:
    fake = FakeFeishu(client_config=FAST).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def lark_ws(fake_feishu: FakeFeishu) -> Iterator[Callable[..., LarkWsThread]]:
    started: list[LarkWsThread] = []

    def start(event_handler: Any, **kwargs: Any) -> LarkWsThread:
        thread = LarkWsThread(
            app_id=fake_feishu.app_id,
            app_secret=fake_feishu.app_secret,
            domain=fake_feishu.url,
            event_handler=event_handler,
            **kwargs,
        )
        started.append(thread)
        return thread.start()

    yield start
    for thread in reversed(started):
        thread.stop()
