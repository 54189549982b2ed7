"""FairPool: clients take turns; one client's burst does not hold every thread."""

from __future__ import annotations

import threading

from server.inference.fairpool import FairPool


def test_a_newcomer_runs_next_not_behind_a_burst() -> None:
    pool = FairPool(1, 1, "test-fair")
    release, done = threading.Event(), threading.Event()
    order: list[str] = []

    def job(name: str) -> None:
        if name == "a0":
            release.wait(10)
        order.append(name)
        if len(order) == 6:
            done.set()

    for n in range(5):
        pool.submit("a", lambda n=n: job(f"a{n}"))  # type: ignore[misc]
    pool.submit("b", lambda: job("b0"))
    release.set()
    assert done.wait(10)
    pool.shutdown()
    assert order == ["a0", "b0", "a1", "a2", "a3", "a4"]


def test_one_key_gets_at_most_per_key_threads() -> None:
    pool = FairPool(4, 2, "test-fair")
    lock, two_running, never = threading.Lock(), threading.Event(), threading.Event()
    running, most = 0, 0
    finished = threading.Semaphore(0)

    def job() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            if running == 2:
                two_running.set()
        two_running.wait(10)  # the first two overlap for sure ...
        never.wait(0.05)  # ... and stay long enough for a third thread to join them, were it let
        with lock:
            running -= 1
        finished.release()

    for _ in range(8):
        pool.submit("greedy", job)
    for _ in range(8):
        assert finished.acquire(timeout=10)
    pool.shutdown()
    assert most == 2
