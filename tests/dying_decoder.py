"""A picture decoder that dies on every picture, for the worker-process tests.

A module of its own that imports nothing heavy: a spawned worker process imports the module of
the function it runs, and the test module imports the executor and with it torch (seconds of a
core per worker started, and that test starts two)."""

from __future__ import annotations

import os


def crash(data: bytes, limits: object, name: str) -> None:
    """Die the way an out-of-memory kill ends a worker."""
    os._exit(1)
