"""The caller's end of one request: an async iterator of events, or a listener.

Shared by the backends (the local executor's worker thread hands events over through the
event loop; the OpenAI-compatible backend pushes them from its own tasks). Events are
pushed on the event loop; the final one (`Done` or `Failed`) closes the handle, and later
pushes are ignored, so a backend may race a cancellation against an answer's end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from server.inference.api import FINAL, Event, Events


class EventHandle:
    """The caller's end: an async iterator (or a listener) fed by a backend on the event loop."""

    __slots__ = ("_closed", "_events", "_listener", "_loop", "_on_cancel", "cancelled", "id")

    def __init__(
        self, request_id: str, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[], None]
    ) -> None:
        self.id = request_id
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._listener: Callable[[Events], None] | None = None
        self._on_cancel = on_cancel
        self._closed = False
        self.cancelled = False

    def push(self, *events: Event) -> None:  # on the event loop
        if self._closed:
            return
        for end, event in enumerate(events, start=1):
            if isinstance(event, FINAL):
                self._closed = True
                events = events[:end]
                break
        listener = self._listener
        if listener is not None:
            if self._closed:
                self._listener = None  # no cycle left through the listener: freed without the GC
            listener(events)
        else:
            for event in events:
                self._events.put_nowait(event)

    def listen(self, callback: Callable[[Events], None]) -> None:
        self._listener = callback
        waiting = []
        while not self._events.empty():
            waiting.append(self._events.get_nowait())
        if waiting:
            callback(waiting)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if not self._closed:  # a finished request has nothing to stop: leave the worker be
                self._on_cancel()

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while True:
                event = await self._events.get()
                yield event
                if isinstance(event, FINAL):
                    return
        finally:
            if not self._events.empty() or not self._closed:
                self.cancel()  # the caller stopped listening: free the slot
