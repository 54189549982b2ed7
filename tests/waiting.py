"""Waiting for something to happen, with deadlines generous enough for a busy machine.

Tests wait for events, never for time. Where there is an event to await (a frame, a closed
connection, a process ending) they await it; where the effect is only visible as state (a
session parked, an answer no longer running) they poll it with `until`. Either way the
deadline only bounds a failure: a passing wait returns as soon as the thing happened, so
the deadline can be long. `DEADLINE` is long enough for a 2-core machine with every core
busy; nothing in the suite is expected to take more than a few seconds of it.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE = 30.0  # seconds a test waits for an event before it fails
_POLL = 0.01  # seconds between two looks at a condition


async def until(predicate: Callable[[], T], what: str, timeout: float = DEADLINE) -> T:
    """Poll *predicate* until it returns something truthy and return that; fail naming *what*
    (with the last value seen) after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(_POLL)
    return value


def until_blocking(
    predicate: Callable[[], T], what: str, timeout: float = DEADLINE, *, poll: float = _POLL
) -> T:
    """`until` for synchronous tests: blocks this thread between looks (*poll* seconds apart:
    longer for a look that is costly)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        time.sleep(poll)
    return value


def stop_process(process: subprocess.Popen[bytes], timeout: float = DEADLINE) -> None:
    """Ask *process* to end (SIGTERM) and wait for it; killed if it is still there after
    *timeout* seconds."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
