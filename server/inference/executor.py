"""The inference executor: one worker thread owns the engine; asyncio only enqueues and awaits.

Scheduling is iteration-level (continuous batching): between two decode steps the
worker drops finished, cancelled and expired sequences and admits waiting ones (their
prompts run in one batched prefill), so a long answer never holds newcomers back.
Admission is bounded: past `queue_size` waiting requests, `submit` answers `busy` with a
retry-after estimate at once. A failure in one request is reported on that request
only (a step that fails is retried row by row, so only the row that fails ends); the
worker survives everything but its own shutdown.

Preparation (pictures, chat template, tokenizer) runs on threads: requests without
pictures on their own small pool, so they never wait behind picture decoding; requests
with pictures on a `FairPool` where clients take turns. Preparation stops early, between
its stages, when the asker left or the deadline passed. An answer is at most as long as
fits the sequence limit: `max_new_tokens` past it is clamped (the answer then ends with
finish reason "length"), never a failure of the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import itertools
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

from server.errors import (
    SHUTDOWN_RETRY_AFTER,
    SHUTTING_DOWN,
    Cancelled,
    InternalError,
    LoadCancelled,
    ModelLoadError,
    RequestError,
    Timeout,
    TooLarge,
    Unavailable,
    shutting_down,
)
from server.inference.api import (
    Delta,
    Done,
    Event,
    ExecutorState,
    ExecutorStats,
    Failed,
    FinishReason,
    InferenceRequest,
    Queued,
    Reading,
    Started,
    Timings,
    Usage,
)
from server.inference.detok import IncrementalDetokenizer
from server.inference.engine import Engine, PreparedPrompt, Sequence, StepResult
from server.inference.fairpool import FairPool
from server.inference.handle import EventHandle
from server.inference.loading import LoadProgress
from server.inference.profile import Profile

log = logging.getLogger("vlbridge.executor")
_K = TypeVar("_K", bound=Hashable)  # a stream of events: a request handle

EngineFactory = Callable[[LoadProgress], Engine]  # called on the worker thread


@dataclass(frozen=True, slots=True)
class ExecutorLimits:
    max_batch: int = 32
    queue_size: int = 256
    request_timeout: float = 300.0
    max_new_tokens: int = 512
    default_new_tokens: int | None = None  # the answer length when a request gives none; None: max_new_tokens
    prefill_tokens: int = 16384  # prefill work (prefill_cost units) admitted into one prefill
    # ... while other rows are decoding: a wave of new pictures then runs as several small
    # prefills between decode steps, so it stalls the running answers for a bounded time
    prefill_tokens_decoding: int = 8192
    # ... but more, up to prefill_tokens, as long as a slice's measured cost keeps the pause it
    # makes in the running answers (decode step included) under this many seconds; 0: fixed
    # slices of prefill_tokens_decoding (see slice_budget)
    prefill_stall_target: float = 0.12
    prefill_wait: float = 0.03  # while decoding, wait up to this long for more prompts to batch
    profile_seconds: float = 10.0  # log where the time goes this often while busy (profile.py); 0: off
    # Text of running answers goes to the event loop at most this often (first text, ends and
    # errors at once): at 64 rows and a 4 ms step, every step's deltas would be 16,000 frames a
    # second for the event loop, whose work competes with this thread's for the GIL.
    stream_interval: float = 0.02
    max_turns: int = 1024  # messages of one request; more are refused at once


TRIM_INTERVAL = 30.0  # seconds between two malloc_trim calls at least


def _malloc_trim() -> Callable[[], None]:
    """glibc's `malloc_trim(0)`, at most every `TRIM_INTERVAL` seconds, or a no-op elsewhere.

    Decoding a big picture takes tens of MB in the decoding thread's malloc arena, and glibc
    keeps them: eight 16-megapixel pictures on two threads left the process 84 MB larger,
    malloc_trim gave all of it back (measured 2026-11-30). Called when a burst of picture
    work ends. Not more often: while it walks the arenas it holds their locks, and a thread
    that allocates meanwhile (the worker, holding the GIL) waits; in a steady stream of
    pictures every few requests end a burst (on an H200 host under load a trim took 18-57 ms).
    A trim over 10 ms is logged (`vlbridge.profile`).
    """
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    last = -TRIM_INTERVAL

    def release() -> None:
        nonlocal last
        started = time.monotonic()
        if started - last < TRIM_INTERVAL:
            return
        last = started
        trim(0)
        took = time.monotonic() - started
        if took > 0.01:
            logging.getLogger("vlbridge.profile").info("malloc_trim took %.0f ms", took * 1000)

    return release


release_memory = _malloc_trim()


class Control(Enum):
    """What the event loop tells the worker besides new jobs (the worker's inbox)."""

    CANCEL = "cancel"  # a handle was cancelled: drop it at the next step
    WAKE = "wake"  # look again now (e.g. whether the executor is idle, for a drain)
    STOP = "stop"  # finish the running steps, fail what is left, free the model


LOAD_WAIT = 600.0  # seconds a request being prepared waits for the model to load
# seconds `stop` waits for a load it asked to stop (it ends at its next progress report): past
# that the loading thread (a daemon) is left behind, so that a stalled download never holds a
# SIGTERM or Ctrl-C for long
LOAD_STOP_WAIT = 1.5
MEMORY_SAMPLE_INTERVAL = 1.0  # seconds between the worker's samples of device memory
SWITCH_INTERVAL = 0.001  # seconds: the GIL switch interval the executor sets at most (see start)


def prefill_cost(prompt: PreparedPrompt) -> int:
    """A prompt's prefill work in token units: its picture tokens count twice, because the
    vision encoder runs over them (4 patches each) before the language model does."""
    return prompt.length + prompt.image_tokens


UNIT_COST_WEIGHT = 0.25  # weight of the newest sample in the running estimate of a prefill's cost


def slice_budget(
    base: int, ceiling: int, unit_seconds: float, stall_target: float, step_seconds: float
) -> int:
    """Prefill work (prefill_cost units) for the next slice while answers stream.

    A decode step waits for the prefill launched before it, so a slice of w units pauses every
    running answer for about `step_seconds + w * unit_seconds` (the measured cost of a unit of
    prefill, 0 while unknown). The slice takes as much as fits in *stall_target*, between
    *base* (the configured slice: never less, whatever the measurement says) and *ceiling*
    (the most one prefill takes). A long queue is then admitted in fewer, larger slices, each
    a bounded pause; *stall_target* 0 keeps slices of *base*.
    """
    floor = min(base, ceiling)
    if stall_target <= 0 or unit_seconds <= 0:
        return floor
    fits = int((stall_target - step_seconds) / unit_seconds)
    return max(floor, min(fits, ceiling))


def coalesce(batch: list[tuple[_K, Event]]) -> dict[_K, list[Event]]:
    """Each stream's events in order, with runs of deltas joined into one delta: an event
    loop that fell behind the worker catches up with fewer, larger frames."""
    streams: dict[_K, list[Event]] = {}
    for handle, event in batch:
        events = streams.setdefault(handle, [])
        if events and isinstance(event, Delta) and isinstance(events[-1], Delta):
            events[-1] = Delta(events[-1].text + event.text)
        else:
            events.append(event)
    return streams


@dataclass(eq=False)
class _Job:
    request: InferenceRequest
    handle: EventHandle
    submitted: float
    deadline: float
    prompt: PreparedPrompt | None = None
    error: RequestError | None = None
    seq: Sequence | None = None
    detok: IncrementalDetokenizer | None = None
    prepared: float = 0.0
    started: float = 0.0
    first_token: float = 0.0
    last_position: int = 0
    streamed: bool = False  # some text was emitted
    finished: bool = False
    order: int = field(default_factory=itertools.count().__next__)


@dataclass(eq=False)
class _Launch:
    """A prefill or decode step launched on the engine and not yet collected."""

    kind: str  # "prefill" | "decode"
    jobs: list[_Job]
    result: StepResult


class InferenceExecutor:
    """Implements server.inference.api.Executor over an Engine built on the worker thread."""

    def __init__(
        self,
        engine_factory: EngineFactory,
        limits: ExecutorLimits,
        *,
        model_name: str = "",
        prepare_workers: int = 4,
    ) -> None:
        self._factory = engine_factory
        self.limits = limits
        self._model_name = model_name
        self._engine: Engine | None = None
        self._state = ExecutorState.STOPPED
        self._load = LoadProgress()
        self._detail = ""  # why the load failed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: queue.SimpleQueue[_Job | Control] = queue.SimpleQueue()
        self._waiting: list[_Job] = []  # worker-owned: prepared, not yet running (FIFO)
        self._running: list[_Job] = []  # worker-owned
        self._pending = 0  # submitted and not yet running; guarded by _lock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # Text-only prompts take milliseconds: their own threads, never behind a picture burst.
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="vlbridge-prepare-text")
        self._picture_pool = FairPool(
            prepare_workers, max(1, prepare_workers // 2), "vlbridge-prepare-pictures", release_memory
        )
        self._accepting = False
        self._loaded = threading.Event()  # set once loading ended, well or not
        self._idle = threading.Event()  # set while nothing is waiting or running
        self._outbox: list[tuple[EventHandle, Event]] = []  # worker-owned: this step's events
        self._urgent = False  # worker-owned: the outbox holds more than later text of an answer
        self._handoff = 0.0  # worker-owned: when the outbox was last handed to the event loop
        self._handed: list[tuple[EventHandle, Event]] = []  # for the event loop; guarded by _lock
        self._delivery_due = False  # a _deliver is scheduled on the loop; guarded by _lock
        # counters
        self._requests_total = 0
        self._tokens_total = 0
        self._token_times: deque[tuple[float, int]] = deque()
        self._durations: deque[float] = deque(maxlen=64)
        self.step_times: deque[float] = deque(maxlen=256)  # seconds per decode step
        self.batch_sizes: deque[int] = deque(maxlen=256)
        self._last_kind = ""
        self._last_collect = 0.0
        self._last_decode = 0.0
        # worker-owned: prefill work collected since the last decode step, and the measured cost
        # of one unit of it in the pause it makes between two decode steps (slice_budget)
        self._stall_work = 0
        self.unit_seconds = 0.0
        # worker-owned: time to first token split into its parts, decode cadence, prefill stalls
        self.profile = Profile(logging.getLogger("vlbridge.profile"), "executor", limits.profile_seconds)
        # Recorded on the event loop: how long handed-over events wait for it (`handoff`).
        self.relay_profile = Profile(logging.getLogger("vlbridge.profile"), "relay", limits.profile_seconds)
        self._woken = 0.0  # when the pending _deliver was scheduled; guarded by _lock
        self._memory: tuple[int, int] | None = None  # (used, total) device bytes, sampled by the worker
        self._memory_at = -MEMORY_SAMPLE_INTERVAL

    # ---- asyncio side -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"expected a stopped executor, got state {self._state.value}")
        # The worker feeds the GPU between short waits; with Python's default 5 ms GIL switch
        # interval a preprocessing thread in pure-Python code could keep it from the GIL (and the
        # GPU idle) for 5 ms at a time.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._loop = asyncio.get_running_loop()
        self._state = ExecutorState.LOADING
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="vlbridge-executor", daemon=True)
        self._thread.start()

    async def wait_ready(self, within: float | None = None) -> None:
        """Wait up to *within* seconds for the model to load; raise Unavailable unless it is ready."""
        await asyncio.to_thread(self._loaded.wait, within)
        if self._state is not ExecutorState.READY:
            raise Unavailable(f"the model is {self._state.value}: {self._detail}")

    def submit(self, request: InferenceRequest) -> EventHandle:
        loop = self._loop or asyncio.get_running_loop()
        handle = EventHandle(request.id, loop, lambda: self._inbox.put(Control.CANCEL))
        now = time.monotonic()
        timeout = request.timeout if request.timeout is not None else self.limits.request_timeout
        job = _Job(request, handle, now, now + timeout)
        if not self._accepting:
            handle.push(Failed("unavailable", SHUTTING_DOWN, SHUTDOWN_RETRY_AFTER))
            return handle
        if self._state is ExecutorState.FAILED:
            handle.push(Failed("unavailable", f"the model failed to load: {self._detail}"))
            return handle
        if len(request.messages) > self.limits.max_turns:
            message = (
                f"the conversation has {len(request.messages)} messages; at most "
                f"{self.limits.max_turns} are accepted"
            )
            handle.push(Failed("too_large", message))
            return handle
        with self._lock:
            # Queue places are for requests no batch row is free for: a burst into free rows is
            # taken whole (callers that count their room as rows + places, like the Feishu
            # bot's dispatcher, would otherwise see it refused `busy` and wait to retry).
            free_rows = max(0, self.limits.max_batch - len(self._running))
            if self._pending >= self.limits.queue_size + free_rows:
                retry = self._retry_after()
                handle.push(
                    Failed(
                        "busy",
                        f"all {self.limits.queue_size} queue places are taken; retry in {retry:.0f} s",
                        retry,
                    )
                )
                return handle
            self._pending += 1
            position = self._pending
        handle.push(Queued(position, self._eta(position)))
        if request.image_count:
            self._picture_pool.submit(request.client or request.id, lambda: self._prepare(job))
        else:
            self._pool.submit(self._prepare, job)
        return handle

    def stats(self) -> ExecutorStats:
        now = time.monotonic()
        recent = [n for t, n in list(self._token_times) if now - t <= 5.0]
        memory = self._memory  # sampled by the worker: no device call on the event loop
        return ExecutorStats(
            state=self._state,
            load_progress=self._load.fraction,
            model=self._model_name,
            device=self._engine.device if self._engine is not None else "",
            queue_depth=self._pending,
            queue_capacity=self.limits.queue_size,
            active=len(self._running),
            max_batch=self.limits.max_batch,
            tokens_per_second=sum(recent) / 5.0,
            requests_total=self._requests_total,
            tokens_total=self._tokens_total,
            gpu_memory_used=memory[0] if memory else None,
            gpu_memory_total=memory[1] if memory else None,
            detail=self._detail or (self._load.detail if self._state is ExecutorState.LOADING else ""),
        )

    @property
    def load_failure(self) -> str | None:
        """Why the model could not be loaded, once that is known for good (state FAILED); else None."""
        return self._detail if self._state is ExecutorState.FAILED else None

    @property
    def left_behind(self) -> bool:
        """True when `stop` gave up waiting for a load that did not stop in time (its thread and
        any download threads it started may still run: the process should exit at once)."""
        return self._thread is None and self._state is ExecutorState.LOADING

    async def stop(self, grace: float = 0.0) -> None:
        self._accepting = False
        thread = self._thread
        if thread is None:
            return
        if self._state is ExecutorState.LOADING:
            self._load.stop()  # the load ends at its next progress report
            self._inbox.put(Control.STOP)  # ... or, if it had just finished, the worker stops
            await asyncio.to_thread(thread.join, LOAD_STOP_WAIT)
            if thread.is_alive() and self._state is ExecutorState.LOADING:
                log.warning("the model load did not stop within %.1f s: leaving it behind", LOAD_STOP_WAIT)
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._picture_pool.shutdown()
                self._thread = None
                return
        if grace > 0:
            self._inbox.put(Control.WAKE)  # let the worker see it is idle (or not) right now
            await asyncio.to_thread(self._idle.wait, grace)
        self._inbox.put(Control.STOP)
        await asyncio.to_thread(thread.join, 30.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._picture_pool.shutdown()
        self._thread = None
        self._state = ExecutorState.STOPPED

    # ---- shared helpers -----------------------------------------------------------------------------

    def _rate(self) -> float:
        """Requests completed per second, recently."""
        if not self._durations:
            return 0.0
        mean = sum(self._durations) / len(self._durations)
        return self.limits.max_batch / mean if mean > 0 else 0.0

    def _eta(self, position: int) -> float | None:
        rate = self._rate()
        return round(position / rate, 1) if rate else None

    def _retry_after(self) -> float:
        eta = self._eta(max(1, self._pending - self.limits.max_batch))
        return float(min(60.0, max(1.0, 5.0 if eta is None else eta)))

    def _emit(self, job: _Job, event: Event) -> None:
        if not isinstance(event, Delta) or not job.streamed:
            self._urgent = True  # a first delta is the client's time to first token: never held
        if isinstance(event, Delta):
            job.streamed = True
        self._outbox.append((job.handle, event))

    def _flush(self, force: bool = False) -> None:
        """Hand the events of the steps since the last hand-off to the event loop: at once when
        some are more than an answer's further text, else once `stream_interval` has passed
        (the worker flushes after every step, so text waits at most that long plus a step);
        one wake-up for all the hand-offs that come before the loop gets to them."""
        if not self._outbox or self._loop is None:
            return
        now = time.monotonic()
        if not (force or self._urgent or now - self._handoff >= self.limits.stream_interval):
            return
        self._urgent, self._handoff = False, now
        outbox, self._outbox = self._outbox, []
        self._hand_over(outbox)

    def _hand_over(self, events: list[tuple[EventHandle, Event]]) -> None:
        """Queue *events* for the event loop, after everything handed over before them (any
        thread: the worker's steps and the preparation threads' `Reading` share one list, so
        a request's events arrive in the order they were produced)."""
        assert self._loop is not None
        with self._lock:
            self._handed.extend(events)
            wake, self._delivery_due = not self._delivery_due, True
            if wake:
                self._woken = time.monotonic()
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # on the event loop
        with self._lock:
            batch, self._handed = self._handed, []
            self._delivery_due = False
            woken = self._woken
        self.relay_profile.record("handoff", time.monotonic() - woken)
        for handle, events in coalesce(batch).items():
            handle.push(*events)

    # ---- preparation (thread pool) ------------------------------------------------------------------

    def _prepare(self, job: _Job) -> None:
        engine = self._engine
        try:
            if engine is None:
                if not self._loaded.wait(LOAD_WAIT):
                    raise Unavailable("the model is still loading")
                engine = self._engine
                if engine is None:
                    raise Unavailable(f"the model is not available: {self._detail}")
            self._check(job)
            if job.request.messages and job.request.messages[-1].images:
                # New pictures (earlier turns' are context, mostly cached): before the job
                # reaches the worker, so before its Started. Decoding and resizing large
                # pictures takes a while, and "queued, position 1" would be all the client
                # knew meanwhile.
                self._hand_over([(job.handle, Reading())])
            job.prompt = engine.prepare(job.request.messages, lambda: self._check(job))
        except RequestError as exc:
            job.error = exc
        except Exception as exc:
            log.exception("request %s: preparing failed", job.request.id)
            job.error = InternalError(f"preparing the request failed: {exc}")
        job.prepared = time.monotonic()
        self._inbox.put(job)

    def _check(self, job: _Job) -> None:
        """Raise when preparing *job* is no longer worth it: its asker left or its time is up."""
        if job.handle.cancelled:
            raise Cancelled("cancelled")
        if time.monotonic() > job.deadline:
            raise self._timeout(job)

    # ---- worker thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._engine = self._factory(self._load)
            self._load.check()  # stopped while the load's last step ran
        except LoadCancelled:
            log.info("model load stopped: the service is stopping")
            self._state = ExecutorState.STOPPED
            self._loaded.set()
            self._fail_all_pending(shutting_down())
            if self._engine is not None:
                self._engine.close()
            return
        except Exception as exc:
            if isinstance(exc, ModelLoadError):  # its message says what to do; no trace needed
                log.error("model failed to load: %s", exc)
            else:
                log.exception("model failed to load")
            self._detail = str(exc)
            self._state = ExecutorState.FAILED
            self._loaded.set()
            self._fail_all_pending(Unavailable(f"the model failed to load: {self._detail}"))
            return
        self._load.fraction, self._load.detail = 1.0, ""
        self._sample_memory(self._engine)
        # The model, its tokenizer and every module imported so far live as long as the engine.
        # Frozen, they stay out of the cyclic collector's full passes, which otherwise walk them
        # all while holding the GIL (~0.4 M objects with the demo model: 200+ ms on a slow core)
        # every few seconds under load, stopping the worker, the event loop and the preparation
        # threads at once. Garbage first, so none of it is frozen.
        gc.collect()
        gc.freeze()
        self._state = ExecutorState.READY
        self._loaded.set()
        log.info("executor ready: %s on %s", self._model_name, self._engine.device)
        try:
            self._loop_forever(self._engine)
        finally:
            self._engine.close()
            gc.unfreeze()  # what the engine held can be collected again

    def _fail_all_pending(self, error: RequestError) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=0.5 if self._pending else 0)
            except queue.Empty:
                break
            if isinstance(item, _Job):
                self._finish(item, error)
        self._flush(force=True)

    def _sample_memory(self, engine: Engine) -> None:
        """Read device memory at most once a second, between steps (stats() only reads the copy)."""
        now = time.monotonic()
        if now - self._memory_at >= MEMORY_SAMPLE_INTERVAL:
            self._memory_at = now
            self._memory = engine.memory()

    def _loop_forever(self, engine: Engine) -> None:
        stop = False
        inflight: deque[_Launch] = deque()
        while not stop:
            stop = self._drain_inbox(block=not (self._running or self._admissible() or inflight))
            now = time.monotonic()
            for job in [j for j in self._running + self._waiting if now > j.deadline or j.handle.cancelled]:
                self._finish(job, Cancelled("cancelled") if job.handle.cancelled else self._timeout(job))
            self._admit(engine, inflight)
            if self._running:
                self._launch_step(engine, inflight)
            # Collect all but the newest launches: the device works on those meanwhile.
            keep = engine.steps_ahead if self._running else 0
            while len(inflight) > keep:
                self._collect(inflight.popleft())
            self._publish_positions()
            self._flush()
            self._sample_memory(engine)
            if self._pending or self._running or inflight:
                self._idle.clear()
            else:
                self._idle.set()
        for launch in inflight:
            with contextlib.suppress(Exception):
                launch.result.tokens()  # let the device finish before anything is freed
        for job in self._running + self._waiting:
            self._finish(job, shutting_down())
        while True:  # jobs still being prepared
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job):
                self._finish(item, shutting_down())
        self._flush(force=True)
        self.profile.flush()

    def _timeout(self, job: _Job) -> Timeout:
        limit = job.deadline - job.submitted
        return Timeout(f"no complete answer within {limit:.0f} s")

    def _admissible(self) -> bool:
        return bool(self._waiting) and len(self._running) < self.limits.max_batch

    def _drain_inbox(self, block: bool) -> bool:
        """Take new jobs and cancellations; True when asked to stop."""
        while True:
            try:
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return False
            block = False
            if item is Control.STOP:
                return True
            if isinstance(item, Control):  # CANCEL/WAKE: the flags are set already; just look again
                continue
            if item.error is not None:
                self._finish(item, item.error)
            elif item.handle.cancelled:
                self._finish(item, Cancelled("cancelled"))
            else:
                self._waiting.append(item)
                self._waiting.sort(key=lambda j: j.order)

    def _worth_waiting(self) -> bool:
        """While a batch decodes, hold a small prefill back briefly if more prompts are on their way.

        One prefill of many pictures costs much less than many prefills of one (fixed costs
        per forward, small GEMMs); the running batch keeps decoding meanwhile.
        """
        if not self._running or not self._waiting:
            return False
        preparing = self._pending - len(self._waiting)
        ready = sum(prefill_cost(j.prompt) for j in self._waiting if j.prompt is not None)
        young = time.monotonic() - self._waiting[0].prepared < self.limits.prefill_wait
        base = min(self.limits.prefill_tokens, self.limits.prefill_tokens_decoding)
        return preparing > 0 and ready < base // 2 and young

    def _prefill_budget(self) -> int:
        """Prefill work for the next prefill: all a prefill may take when nothing decodes, a
        slice sized by `slice_budget` while answers are streaming (every decode step waits for
        the prefill launched before it)."""
        if not self._running:
            return self.limits.prefill_tokens
        steps = sorted(self.step_times)
        return slice_budget(
            self.limits.prefill_tokens_decoding,
            self.limits.prefill_tokens,
            self.unit_seconds,
            self.limits.prefill_stall_target,
            steps[len(steps) // 2] if steps else 0.0,
        )

    def _measure_stall(self, stall: float) -> None:
        """Learn a unit of prefill's cost from a decode step that waited for prefills: the pause
        less a plain step, per unit. Only slices of at least a quarter of the configured one
        count: a prefill's fixed costs would make a tiny one's units look dear."""
        work, self._stall_work = self._stall_work, 0
        if work < max(1, self.limits.prefill_tokens_decoding // 4) or not self.step_times:
            return
        steps = sorted(self.step_times)
        sample = max(0.0, stall - steps[len(steps) // 2]) / work
        if not self.unit_seconds:
            self.unit_seconds = sample
        else:
            self.unit_seconds += UNIT_COST_WEIGHT * (sample - self.unit_seconds)

    def _admit(self, engine: Engine, inflight: deque[_Launch]) -> None:
        if self._worth_waiting():
            return
        chosen: list[_Job] = []
        budget = self._prefill_budget()
        while self._waiting and len(self._running) + len(chosen) < self.limits.max_batch:
            job = self._waiting[0]
            assert job.prompt is not None
            if chosen and prefill_cost(job.prompt) > budget:
                break
            wanted = (
                job.request.params.max_new_tokens
                or self.limits.default_new_tokens
                or self.limits.max_new_tokens
            )
            max_new = min(wanted, engine.max_sequence_tokens - job.prompt.length)
            if max_new < 1:
                self._waiting.pop(0)
                self._finish(
                    job, TooLarge(f"the conversation is {job.prompt.length} tokens: no room for an answer")
                )
                continue
            seq = Sequence(job.request.id, job.prompt, job.request.params, max_new)
            if not engine.reserve(seq):
                if not self._running and not chosen:
                    self._waiting.pop(0)
                    self._finish_unreserved(job, seq)
                    continue
                break
            self._waiting.pop(0)
            job.seq = seq
            budget -= prefill_cost(job.prompt)
            chosen.append(job)
        if not chosen:
            return
        now = time.monotonic()
        with self._lock:
            self._pending -= len(chosen)
        for job in chosen:
            job.started = now
            job.detok = IncrementalDetokenizer(engine.detokenize, job.request.params.stop)
            self._emit(job, Started())
        self._prefill(engine, chosen, inflight)

    def _finish_unreserved(self, job: _Job, seq: Sequence) -> None:
        self._finish(
            job, TooLarge(f"the request needs {seq.prompt.length + seq.max_new_tokens} tokens of memory")
        )

    def _prefill(self, engine: Engine, jobs: list[_Job], inflight: deque[_Launch]) -> None:
        try:
            result = engine.prefill([j.seq for j in jobs if j.seq is not None])
        except Exception:
            if len(jobs) == 1:
                log.exception("request %s: prefill failed", jobs[0].request.id)
                self._finish(jobs[0], InternalError("the model failed on this request"))
                return
            log.warning("batched prefill of %d failed; retrying one by one", len(jobs), exc_info=True)
            for job in jobs:
                self._prefill(engine, [job], inflight)
            return
        self._running.extend(jobs)
        inflight.append(_Launch("prefill", jobs, result))

    def _launch_step(self, engine: Engine, inflight: deque[_Launch], jobs: list[_Job] | None = None) -> None:
        jobs = list(self._running) if jobs is None else jobs
        try:
            result = engine.decode([j.seq for j in jobs if j.seq is not None])
        except Exception:
            if len(jobs) == 1:
                log.exception("request %s: decode step failed", jobs[0].request.id)
                self._finish(jobs[0], InternalError("the model failed while answering"))
                return
            # A failed launch changed nothing (Engine.decode is atomic): find the row that fails.
            log.warning("decode step of %d failed; retrying one by one", len(jobs), exc_info=True)
            for job in jobs:
                self._launch_step(engine, inflight, [job])
            return
        self.batch_sizes.append(len(jobs))
        inflight.append(_Launch("decode", jobs, result))

    def _collect(self, launch: _Launch) -> None:
        try:
            tokens = launch.result.tokens()
        except Exception:
            log.exception("a %s of %d requests failed on the device", launch.kind, len(launch.jobs))
            for job in launch.jobs:
                self._finish(job, InternalError("the model failed while answering"))
            return
        now = time.monotonic()
        if launch.kind == "decode" and self._last_kind == "decode" and now - self._last_collect < 1.0:
            self.step_times.append(now - self._last_collect)  # decode cadence, no prefill between
            self.profile.record("decode_step", now - self._last_collect)
        elif launch.kind == "decode" and now - self._last_decode < 5.0:
            self.profile.record("decode_stall", now - self._last_decode)  # a prefill (or a pause) in between
            self._measure_stall(now - self._last_decode)
        if launch.kind == "decode":
            self._last_decode = now
            self._stall_work = 0
            self.profile.count("decode_rows", len(launch.jobs))
        else:
            work = sum(prefill_cost(j.prompt) for j in launch.jobs if j.prompt)
            self._stall_work += work
            self.profile.count("prefill_rows", len(launch.jobs))
            self.profile.count("prefill_cost", work)
            self.profile.count("slice_budget", self._prefill_budget())
            for job in launch.jobs:
                # submit -> prepared -> admitted -> first token on the host: the parts of TTFT
                self.profile.record("prepare", job.prepared - job.submitted)
                self.profile.record("queue", job.started - job.prepared)
                self.profile.record("prefill", now - job.started)
        self._last_kind, self._last_collect = launch.kind, now
        for job, token in zip(launch.jobs, tokens, strict=True):
            if job.finished:
                continue  # finished or cancelled while this step was running: its token is surplus
            if launch.kind == "prefill":
                job.first_token = now
            self._accept_token(job, token)

    def _accept_token(self, job: _Job, token: int) -> None:
        seq, detok = job.seq, job.detok
        assert seq is not None and detok is not None and self._engine is not None
        seq.tokens.append(token)
        self._tokens_total += 1
        self._token_times.append((time.monotonic(), 1))
        while self._token_times and time.monotonic() - self._token_times[0][0] > 5.0:
            self._token_times.popleft()
        eos = token in self._engine.eos_token_ids and len(seq.tokens) > seq.params.min_new_tokens
        if not eos:
            piece = detok.push(token)
            if piece:
                self._emit(job, Delta(piece))
        if eos or detok.stopped or len(seq.tokens) >= seq.max_new_tokens:
            reason = FinishReason.LENGTH if not (eos or detok.stopped) else FinishReason.STOP
            self._complete(job, reason)

    def _complete(self, job: _Job, reason: FinishReason) -> None:
        assert job.seq is not None
        assert job.detok is not None
        assert job.prompt is not None
        tail = job.detok.finish()
        if tail:
            self._emit(job, Delta(tail))
        now = time.monotonic()
        usage = Usage(job.prompt.length, len(job.seq.tokens), job.prompt.image_tokens)
        timings = Timings(
            queued=round(job.started - job.submitted, 4),
            first_token=round(job.first_token - job.submitted, 4),
            total=round(now - job.submitted, 4),
        )
        self._durations.append(now - job.started)
        self._requests_total += 1
        self._emit(job, Done(job.detok.text, usage, timings, reason, tuple(job.seq.tokens)))
        self._release(job)
        log.debug("request %s done: %d tokens in %.2f s", job.request.id, len(job.seq.tokens), timings.total)

    def _finish(self, job: _Job, error: RequestError) -> None:
        if job.finished:
            return
        if job in self._waiting:
            self._waiting.remove(job)
        if job.seq is None:
            with self._lock:
                self._pending -= 1
        self._emit(job, Failed(error.code, error.message, error.retry_after))
        self._release(job)
        if error.code not in ("cancelled",):
            log.info("request %s failed: %s: %s", job.request.id, error.code, error.message)

    def _release(self, job: _Job) -> None:
        job.finished = True
        if job in self._running:
            self._running.remove(job)
        if job.seq is not None and self._engine is not None:
            try:
                self._engine.release(job.seq)
            except Exception:
                log.exception("request %s: releasing failed", job.request.id)

    def _publish_positions(self) -> None:
        for position, job in enumerate(self._waiting, start=1):
            if position != job.last_position:
                job.last_position = position
                self._emit(job, Queued(position, self._eta(position)))
