"""The answer gateway: the one way from any route to the model.

WebSocket asks, ``/v1/analyze``, ``/v1/chat/completions`` and the IM platforms'
conversations all submit through `AnswerGateway`. It implements the executor's
`AnswerSource` protocol, so a caller cannot tell it from the executor, and adds what
every route must share:

- every answer is tracked until its stream ends, so a drain waits for all of them
  (a Feishu card finishes on SIGTERM exactly like a WebSocket answer);
- every answer is counted by route and outcome (`server.metrics.count`: an answer whose
  caller left before its end is ``cancelled``, not an error) and its latency and time to
  first token observed;
- while draining, new work is refused with one shared error (`server.errors.SHUTTING_DOWN`), and
  answers still running when the grace is over are cancelled and end with it too
  (`server.errors.shutting_down`).

A caller iterates the returned `Answer` to its final event, or `listen`s; an answer
whose caller stops early is cancelled and untracked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from enum import Enum

from server import errors, metrics
from server.inference.api import (
    FINAL,
    AnswerSource,
    Done,
    Event,
    Events,
    Executor,
    ExecutorStats,
    Failed,
    InferenceRequest,
    RequestHandle,
)

log = logging.getLogger("vlbridge.answers")

CANCEL_WAIT = 5.0  # after the grace: how long cancelled answers get to report their end


class GatewayState(Enum):
    OPEN = "open"
    DRAINING = "draining"
    CLOSED = "closed"


def shutting_down() -> Failed:
    error = errors.shutting_down()
    return Failed(error.code, error.message, error.retry_after)


class _Refused:
    """The handle of a request refused before it reached the executor: one `Failed`."""

    __slots__ = ("id",)

    def __init__(self, request_id: str) -> None:
        self.id = request_id

    async def __aiter__(self) -> AsyncIterator[Event]:
        yield shutting_down()

    def listen(self, callback: Callable[[Events], None]) -> None:
        callback([shutting_down()])

    def cancel(self) -> None:
        return None


class Answer:
    """One submitted request (a `RequestHandle`), tracked by the gateway until its stream ends."""

    __slots__ = ("_gateway", "_listener", "handle", "route", "shutdown")

    def __init__(self, gateway: AnswerGateway, handle: RequestHandle, route: str) -> None:
        self._gateway = gateway
        self._listener: Callable[[Events], None] | None = None
        self.handle = handle
        self.route = route
        self.shutdown = False  # cancelled by the drain: ends with SHUTTING_DOWN, not "cancelled"

    @property
    def id(self) -> str:
        return self.handle.id

    def cancel(self) -> None:
        self.handle.cancel()

    async def __aiter__(self) -> AsyncIterator[Event]:
        """The request's events, the final one last; leaving early cancels the request, and
        counts it as cancelled (a client that went away: an SSE stream closed, a disconnect)."""
        code = ""
        try:
            async for event in self.handle:
                if isinstance(event, FINAL):
                    event, code = self._finish(event)
                yield event
            code = code or metrics.Outcome.INTERNAL.value  # the stream ended without its final event
        except Exception:
            code = metrics.Outcome.INTERNAL.value  # the handle broke (leaving early raises no Exception)
            raise
        finally:
            self._gateway._untrack(self, code or metrics.Outcome.CANCELLED.value)

    def listen(self, callback: Callable[[Events], None]) -> None:
        """The same events as iterating, passed to *callback* in batches as the handle
        delivers them (no task needed). A callback that raises ends the request: it is
        cancelled and untracked, and the error logged."""
        self._listener = callback
        self.handle.listen(self._deliver)

    def _deliver(self, events: Events) -> None:
        listener = self._listener
        if listener is None:  # its listener failed: the rest is of no interest
            return
        code = None
        last = events[-1]
        if isinstance(last, FINAL):
            self._listener = None  # no cycle left through the listener: freed without the GC
            final, code = self._finish(last)
            if final is not last:
                events = [*events[:-1], final]
        try:
            listener(events)
        except Exception:
            log.exception("%s: handling an answer event failed", self.handle.id)
            self._listener = None
            self.handle.cancel()
            self._gateway._untrack(self, metrics.Outcome.INTERNAL.value)
            return
        if code is not None:
            self._gateway._untrack(self, code)

    def _finish(self, event: Done | Failed) -> tuple[Done | Failed, str]:
        """The last event as the caller should see it, and the result code to count."""
        if isinstance(event, Done):
            metrics.LATENCY.observe(event.timings.total, self.route)
            metrics.TTFT.observe(event.timings.first_token, self.route)
            return event, metrics.Outcome.OK.value
        if self.shutdown and event.code == "cancelled":
            event = shutting_down()
        return event, event.code


class AnswerGateway:
    """Implements `AnswerSource` over an `Executor` for every route; owns the executor's
    start and stop. Not thread-safe: call it on the event loop."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.state = GatewayState.OPEN
        self._answers: set[Answer] = set()
        self._idle = asyncio.Event()  # set when the last tracked answer ends

    # ---- AnswerSource --------------------------------------------------------------------------

    def submit(self, request: InferenceRequest, route: str = "api") -> Answer:
        """Submit *request* for *route* (a metrics label: "ws", "feishu", an HTTP path).
        Never raises; while draining the answer is one `Failed` with `server.errors.SHUTTING_DOWN`."""
        handle: RequestHandle = (
            self.executor.submit(request) if self.state is GatewayState.OPEN else _Refused(request.id)
        )
        answer = Answer(self, handle, route)
        self._answers.add(answer)
        self._idle.clear()
        return answer

    def stats(self) -> ExecutorStats:
        return self.executor.stats()

    def route(self, name: str) -> AnswerSource:
        """An `AnswerSource` whose answers count under *name* (what an adapter is given)."""
        return _Route(self, name)

    @property
    def accepting(self) -> bool:
        return self.state is GatewayState.OPEN

    @property
    def running(self) -> int:
        return len(self._answers)

    def _untrack(self, answer: Answer, code: str) -> None:
        if answer not in self._answers:
            return
        self._answers.discard(answer)
        answer.handle.cancel()  # no-op when finished; frees the slot when the caller left early
        metrics.count(answer.route, code)
        if not self._answers:
            self._idle.set()

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.executor.start()

    def close(self) -> None:
        """Refuse new work from now on (answers already running go on)."""
        if self.state is GatewayState.OPEN:
            self.state = GatewayState.DRAINING

    async def drain(self, deadline: float) -> None:
        """Refuse new work; let running answers end until *deadline* (monotonic), then
        cancel the rest (they end with `server.errors.SHUTTING_DOWN`) and wait a little for them."""
        self.close()
        await self._until_idle(deadline - time.monotonic())
        if self._answers:
            log.warning("grace over: cancelling %d running answers", len(self._answers))
            for answer in list(self._answers):
                answer.shutdown = True
                answer.cancel()
            await self._until_idle(CANCEL_WAIT)

    async def _until_idle(self, within: float) -> None:
        if self._answers and within > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), within)

    async def stop(self) -> None:
        self.state = GatewayState.CLOSED
        await self.executor.stop(0.0)

    def health(self) -> dict[str, int]:
        return {"running": len(self._answers)}


class _Route:
    """`AnswerSource` for one route of the gateway."""

    __slots__ = ("_gateway", "name")

    def __init__(self, gateway: AnswerGateway, name: str) -> None:
        self._gateway = gateway
        self.name = name

    def submit(self, request: InferenceRequest) -> Answer:
        return self._gateway.submit(request, self.name)

    def stats(self) -> ExecutorStats:
        return self._gateway.stats()
