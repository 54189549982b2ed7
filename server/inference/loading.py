"""What a model load reports while it runs, and how it is asked to stop.

The executor hands one `LoadProgress` to the engine factory, which runs on the worker
thread; the load calls it between its steps (a download after every chunk it receives)
with a fraction 0..1 and, when the phase changes, a one-line detail ("downloading
Qwen/...: 3.2 of 17.1 GB at 85 MB/s", "loading weights", "warming up"). `/health` shows
both. Once the service asks the load to stop (`stop`), the next report raises
`LoadCancelled`: a download or load ends within one chunk or step instead of holding
the process for minutes.
"""

from __future__ import annotations

import threading

from server.errors import LoadCancelled


class LoadProgress:
    """Callable ``progress(fraction, detail=None)``; thread-safe enough for one writer (the
    loading thread) and readers that only look (plain attribute reads)."""

    def __init__(self) -> None:
        self.fraction = 0.0
        self.detail = ""
        self._stop = threading.Event()

    def __call__(self, fraction: float, detail: str | None = None) -> None:
        """Record *fraction* (clamped to 0..1, never going back) and *detail* when given;
        raise `LoadCancelled` once `stop` was called."""
        self.fraction = max(self.fraction, min(1.0, fraction))
        if detail is not None:
            self.detail = detail
        self.check()

    def check(self) -> None:
        """Raise `LoadCancelled` when the service asked the load to stop."""
        if self._stop.is_set():
            raise LoadCancelled("the service is stopping: model load abandoned")

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()
