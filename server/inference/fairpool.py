"""A thread pool that takes turns between its clients: one client's burst cannot hold every thread.

Jobs are queued per key (a client, a session); a free thread takes the oldest job of the
key served least recently (a newcomer first), and at most `per_key` jobs of one key run
at a time. So a client that
queues sixty-four expensive pictures gets its share of the pool, and a newcomer's job
starts as soon as any thread is free instead of behind the whole burst.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Hashable

log = logging.getLogger("vlbridge.executor")

Job = Callable[[], None]


class FairPool:
    """`workers` daemon threads running jobs submitted with `submit(key, job)`.

    Jobs must not raise (an exception is logged and the thread carries on). After
    `shutdown` no queued job starts; running ones finish.
    """

    def __init__(
        self, workers: int, per_key: int, name: str, on_idle: Callable[[], None] = lambda: None
    ) -> None:
        if workers < 1 or per_key < 1:
            raise ValueError(f"expected workers >= 1 and per_key >= 1, got {workers} and {per_key}")
        self.per_key = per_key
        self._cond = threading.Condition()
        self._queues: dict[Hashable, deque[Job]] = {}
        self._running: Counter[Hashable] = Counter()
        self._served: dict[Hashable, int] = {}  # when each key with work last had a job taken
        self._tick = 0
        self._closed = False
        self._workers = workers
        self._name = name
        self._on_idle = on_idle  # called on a pool thread when the last job of a burst ends
        self._threads: list[threading.Thread] = []  # started by the first job: an idle pool costs none

    def submit(self, key: Hashable, job: Job) -> None:
        with self._cond:
            if self._closed:
                return
            if not self._threads:
                for n in range(self._workers):
                    thread = threading.Thread(target=self._work, name=f"{self._name}-{n}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
            self._queues.setdefault(key, deque()).append(job)
            self._cond.notify()

    def queued(self) -> int:
        with self._cond:
            return sum(len(jobs) for jobs in self._queues.values())

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._queues.clear()
            self._cond.notify_all()

    def _take(self) -> tuple[Hashable, Job] | None:
        eligible = [key for key in self._queues if self._running[key] < self.per_key]
        if not eligible:
            return None
        key = min(eligible, key=lambda k: self._served.get(k, -1))  # ties: the first queued
        jobs = self._queues[key]
        job = jobs.popleft()
        if not jobs:
            del self._queues[key]
        self._tick += 1
        self._served[key] = self._tick
        return key, job

    def _work(self) -> None:
        while True:
            with self._cond:
                taken = self._take()
                while taken is None and not self._closed:
                    self._cond.wait()
                    taken = self._take()
                if taken is None:
                    return
                key, job = taken
                self._running[key] += 1
            try:
                job()
            except Exception:
                log.exception("a preparation job failed")
            with self._cond:
                self._running[key] -= 1
                if not self._running[key]:
                    del self._running[key]
                    if key not in self._queues:
                        self._served.pop(key, None)  # nothing left of this key: forget it
                idle = not self._running and not self._queues
                self._cond.notify()
            if idle:
                try:
                    self._on_idle()
                except Exception:
                    log.exception("the idle hook failed")
