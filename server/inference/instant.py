"""A zero-cost backend: answers at once on the event loop, with no model and no worker thread.

Selected with ``model.path = "builtin:instant"``. It implements the `Executor` contract
(Queued, Started, Delta, then Done; cancel; busy when stopping) and answers
``echo: <question>``, so that what `bench/ws_sessions.py` measures is the server alone:
transport, sessions, frames. ``builtin:echo`` is the other zero-cost choice: it runs the
real executor (worker thread, batching, detokenizing) with no model behind it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from server.errors import SHUTDOWN_RETRY_AFTER, SHUTTING_DOWN
from server.inference.api import (
    Delta,
    Done,
    Event,
    Events,
    ExecutorState,
    ExecutorStats,
    Failed,
    InferenceRequest,
    Queued,
    Started,
    Timings,
    Turn,
    Usage,
)

INSTANT_PATH = "builtin:instant"
_ZERO = Timings(0.0, 0.0, 0.0)
_QUEUED = Queued(1)
_STARTED = Started()
_CANCELLED = Failed("cancelled", "cancelled")


class _Answer:
    __slots__ = ("cancelled", "events", "id")

    def __init__(self, request_id: str, events: list[Event]) -> None:
        self.id = request_id
        self.events = events
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[Event]:
        for event in self.events:
            if self.cancelled:
                yield _CANCELLED
                return
            yield event

    def listen(self, callback: Callable[[Events], None]) -> None:
        callback((_CANCELLED,) if self.cancelled else self.events)


class InstantExecutor:
    """Implements server.inference.api.Executor with answers that cost nothing."""

    def __init__(self) -> None:
        self._state = ExecutorState.LOADING
        self._requests = 0
        self._tokens = 0

    def submit(self, request: InferenceRequest) -> _Answer:
        if self._state is not ExecutorState.READY:
            failed = Failed("unavailable", SHUTTING_DOWN, SHUTDOWN_RETRY_AFTER)
            return _Answer(request.id, [failed])
        question = request.messages[-1] if request.messages else Turn.user("")
        text = f"echo: {question.text}" + (f" [{len(question.images)} pictures]" if question.images else "")
        if request.params.max_new_tokens is not None:
            text = text[: request.params.max_new_tokens]
        self._requests += 1
        self._tokens += len(text)
        # Usage counts the question only: summing a long context per request is not zero-cost.
        done = Done(text, Usage(len(question.text), len(text), len(question.images)), _ZERO)
        return _Answer(request.id, [_QUEUED, _STARTED, Delta(text), done])

    def stats(self) -> ExecutorStats:
        return ExecutorStats(
            state=self._state,
            load_progress=1.0,
            model=INSTANT_PATH,
            device="none",
            queue_depth=0,
            queue_capacity=1,
            active=0,
            max_batch=1,
            tokens_per_second=0.0,
            requests_total=self._requests,
            tokens_total=self._tokens,
        )

    async def start(self) -> None:
        self._state = ExecutorState.READY

    async def stop(self, grace: float = 0.0) -> None:
        self._state = ExecutorState.STOPPED
