"""Picture decoding in worker processes: off the server's GIL, the pixels back through shared memory.

Decoding a picture (Pillow: JPEG/PNG decode, EXIF orientation, flattening, shrinking, the copy
out to an array) is pure CPU work that gives the GIL back only now and then. On threads it
competes for the GIL with the executor's worker (launching kernels) and the event loop:
with one busy Python thread beside them, 8 preparation threads fell from 214 to 11 pictures
a second (bench/prepare.py, H200 host, 2026-12-01). Here each picture is decoded by
`decode_into_shared` in a process of a `ProcessPoolExecutor` (spawn: no copy of a CUDA
process is ever forked); the process writes the uint8 pixels into a shared-memory segment
named by the caller and answers a few bytes (the shape, or the error). The caller copies the
pixels out (a memcpy without the GIL) and unlinks the segment, so the server's GIL sees one
small message per picture instead of the decoding.

Contracts kept from the threads: the same `decode_image` runs, so a broken picture gets the
same `BadImage` / `TooLarge` with the same sentence; `check` is called while waiting (a
cancelled or expired request stops waiting at once); a worker process that dies
(`BrokenProcessPool`: killed, out of memory) is replaced by a fresh pool and the pictures are
tried once more there, then the request fails with a clear error instead of hanging; every
segment is unlinked, also those of pictures whose request stopped waiting for them (see
`_discard`). No torch here: the worker processes import only Pillow, numpy and the
project's picture checks.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import sys
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from protocol.pictures import ImageLimits
from server.errors import InternalError, RequestError, shutting_down
from server.inference.images import decode_image

log = logging.getLogger("vlbridge.executor")

SEGMENT_PREFIX = "vlb"  # shared-memory names: vlb<server pid>-<n> (tests look for leftovers)
WAIT_SLICE = 0.05  # seconds between two checks of the asker while pictures decode

Check = Callable[[], None]
Into = Callable[[tuple[int, ...]], np.ndarray]  # a writable uint8 array of that shape


@dataclass(frozen=True)
class Rejected:
    """A picture the decoder refused: the `RequestError` to raise, as plain values."""

    code: str
    message: str

    def error(self) -> RequestError:
        return RequestError.from_code(self.code, self.message)


def prepare_processes(configured: int, cores: int) -> int:
    """Worker processes for *configured* (`executor.prepare_processes`) on *cores* CPU cores.

    -1 (auto): half the cores, at most 8, from 8 cores up; none below, where the event loop,
    the worker and the preparation threads already share few cores and a process per picture
    would only add copies."""
    if configured >= 0:
        return configured
    return min(8, cores // 2) if cores >= 8 else 0


def decode_into_shared(data: bytes, limits: ImageLimits, name: str) -> tuple[int, ...] | Rejected:
    """In a worker process: decode *data* and write its (height, width, 3) uint8 pixels into a new
    shared-memory segment called *name*; the shape, or why the picture was refused.

    The segment belongs to the caller from then on (it unlinks it)."""
    try:
        pixels = np.asarray(decode_image(data, limits), dtype=np.uint8)
    except RequestError as exc:
        return Rejected(exc.code, exc.message)
    segment = SharedMemory(name=name, create=True, size=max(1, pixels.nbytes))
    try:
        np.ndarray(pixels.shape, np.uint8, segment.buf)[...] = pixels
    finally:
        segment.close()
    return tuple(int(n) for n in pixels.shape)


_MAIN_LOCK = threading.Lock()  # one swap of __main__ at a time (see _plain_main)


@contextlib.contextmanager
def _plain_main() -> Iterator[None]:
    """While a worker process may be started (`submit` starts one when none is idle): a spawned
    child runs the parent's main script again, as `__mp_main__`, unless the parent was started
    with `-m`. A console script without an `if __name__ == "__main__"` guard around its
    `main()` would start a second server in every worker. The workers need nothing from the
    main script, so they are shown an empty one. Callers hold `_MAIN_LOCK`."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None or not getattr(main, "__file__", None):
        yield  # run with -m (the child imports it as a module, guarded) or interactively
        return
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _ready() -> int:
    return os.getpid()


def unlink(name: str) -> None:
    """Remove the segment *name* if it exists (a decode whose result nobody took)."""
    try:
        segment = SharedMemory(name=name)
    except FileNotFoundError:
        return
    segment.close()
    segment.unlink()


def take(name: str, shape: tuple[int, ...], into: Into) -> np.ndarray:
    """Copy the pixels of segment *name* into `into(shape)` and unlink the segment."""
    segment = SharedMemory(name=name)
    try:
        out = into(shape)
        np.copyto(out, np.ndarray(shape, np.uint8, segment.buf))
    finally:
        segment.close()
        segment.unlink()
    return out


def _discard(name: str) -> Callable[[Future[Any]], None]:
    """A done-callback that unlinks *name*: for decodes whose request stopped waiting. It runs
    once the future has finished (or was cancelled before it started), so the process no
    longer writes the segment; if the process died first, there may be none."""

    def callback(_future: Future[Any]) -> None:
        try:
            unlink(name)
        except OSError:
            log.warning("could not remove shared memory %s", name, exc_info=True)

    return callback


class PictureProcesses:
    """`processes` worker processes decoding pictures; thread-safe; `shutdown` stops them.

    `decode` is called from the preparation threads, each blocking (without the GIL) until
    its pictures are decoded."""

    def __init__(self, processes: int, worker: Callable[..., Any] = decode_into_shared) -> None:
        if processes < 1:
            raise ValueError(f"expected processes >= 1, got {processes}")
        self.processes = processes
        self._worker = worker  # a module-level function (tests swap in one that crashes)
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._pool = self._new_pool()
        self._names = itertools.count()
        self._closed = False
        self.replaced = 0  # pools replaced after a worker process died

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=self._context)

    def start(self) -> list[int]:
        """Start every worker process now (imports included) instead of at the first pictures;
        their process ids."""
        pool = self._current()
        pids = [f.result() for f in [self._submit(pool, _ready) for _ in range(self.processes)]]
        log.info("pictures are decoded in %d worker processes (%s)", len(set(pids)), sorted(set(pids)))
        return pids

    @staticmethod
    def _submit(pool: ProcessPoolExecutor, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        with _MAIN_LOCK, _plain_main():
            return pool.submit(fn, *args)

    def pids(self) -> list[int]:
        """Process ids of the current pool's live workers (tests)."""
        with self._lock:
            pool = self._pool
        processes = getattr(pool, "_processes", None) or {}
        return sorted(p.pid for p in processes.values() if p.pid is not None and p.is_alive())

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise shutting_down()
            return self._pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """A worker of *broken* died: later decodes go to a fresh pool (once per broken pool)."""
        with self._lock:
            if self._closed or self._pool is not broken:
                return
            self._pool = self._new_pool()
            self.replaced += 1
        log.warning("a picture decoding process stopped; started a new pool of %d", self.processes)
        broken.shutdown(wait=False, cancel_futures=True)

    def decode(
        self, datas: Sequence[bytes], limits: ImageLimits, check: Check, into: Into
    ) -> list[np.ndarray | RequestError]:
        """Decode *datas* in parallel: for each, its pixels in `into(shape)` or the error
        `decode_image` raises for it. Raises whatever *check* raises (the decodes left are
        abandoned and their segments removed), InternalError when the processes die twice,
        Unavailable once shut down."""
        try:
            return self._attempt(datas, limits, check, into)
        except BrokenProcessPool:
            return self._retry(datas, limits, check, into)

    def _retry(
        self, datas: Sequence[bytes], limits: ImageLimits, check: Check, into: Into
    ) -> list[np.ndarray | RequestError]:
        try:
            return self._attempt(datas, limits, check, into)
        except BrokenProcessPool:
            raise InternalError(
                "the picture decoder stopped unexpectedly twice; please send the picture again"
            ) from None

    def _attempt(
        self, datas: Sequence[bytes], limits: ImageLimits, check: Check, into: Into
    ) -> list[np.ndarray | RequestError]:
        pool = self._current()
        prefix = f"{SEGMENT_PREFIX}{os.getpid()}-"
        names = [f"{prefix}{next(self._names)}" for _ in datas]
        futures: list[Future[Any]] = []
        results: dict[int, np.ndarray | RequestError] = {}
        try:
            for data, name in zip(datas, names, strict=True):
                futures.append(self._submit(pool, self._worker, data, limits, name))
            pending = set(futures)
            while pending:
                check()
                done, pending = wait(pending, timeout=WAIT_SLICE)
                for future in done:
                    index = futures.index(future)
                    outcome = future.result()  # BrokenProcessPool, CancelledError: below
                    if isinstance(outcome, Rejected):
                        results[index] = outcome.error()
                    else:
                        results[index] = take(names[index], outcome, into)
        except BrokenProcessPool:
            self._abandon(futures, names, results)
            self._replace(pool)
            raise
        except CancelledError:  # shut down under us
            self._abandon(futures, names, results)
            raise shutting_down() from None
        except RuntimeError as exc:  # submit after shutdown
            self._abandon(futures, names, results)
            if self._closed:
                raise shutting_down() from None
            raise InternalError(f"the picture decoder failed: {exc}") from None
        except BaseException:
            self._abandon(futures, names, results)
            raise
        return [results[i] for i in range(len(datas))]

    @staticmethod
    def _abandon(futures: list[Future[Any]], names: list[str], taken: dict[int, Any]) -> None:
        for index, future in enumerate(futures):
            if index not in taken:
                future.cancel()
                future.add_done_callback(_discard(names[index]))

    def shutdown(self) -> None:
        """Stop the processes (running decodes finish; their segments are removed); idempotent."""
        with self._lock:
            self._closed = True
            pool = self._pool
        pool.shutdown(wait=True, cancel_futures=True)
