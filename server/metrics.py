"""Prometheus metrics: module-level objects in one module-level registry.

Counters and histograms are updated where things happen; gauges that mirror the
executor and the session registry are set at scrape time by `render`. Objects live at
module level so that several apps in one process (tests) never register twice.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from server.inference.api import ExecutorStats

__all__ = ["CONTENT_TYPE", "REGISTRY", "render"]

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_open_fds, process_resident_memory_bytes, cpu seconds

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)


class LoopCounter:
    """A labelled counter without locks, for counts updated on the event loop's thread only.

    prometheus_client's metrics take a lock per update and build a label key per call,
    which was about a tenth of the server's CPU per WebSocket answer; these are plain
    dict updates, exposed by a collector at scrape time in the same text format.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry = REGISTRY
    ) -> None:
        self._family = (name, documentation, list(labelnames))
        self._values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, *labels: str) -> None:
        self._values[labels] = self._values.get(labels, 0.0) + 1.0

    def collect(self) -> Iterator[Metric]:
        name, documentation, labelnames = self._family
        family = CounterMetricFamily(name, documentation, labels=labelnames)
        for labels, value in list(self._values.items()):
            family.add_metric(list(labels), value)
        yield family


class LoopHistogram:
    """A labelled histogram without locks (see LoopCounter)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._family = (name, documentation, list(labelnames))
        self._bounds = (*map(float, buckets), math.inf)
        self._values: dict[tuple[str, ...], list[float]] = {}  # a count per bucket, then the sum
        registry.register(self)

    def observe(self, value: float, *labels: str) -> None:
        counts = self._values.get(labels)
        if counts is None:
            counts = self._values[labels] = [0.0] * (len(self._bounds) + 1)
        counts[bisect.bisect_left(self._bounds, value)] += 1.0
        counts[-1] += value

    def collect(self) -> Iterator[Metric]:
        name, documentation, labelnames = self._family
        family = HistogramMetricFamily(name, documentation, labels=labelnames)
        for labels, counts in list(self._values.items()):
            cumulative = list(itertools.accumulate(counts[:-1]))
            buckets = [(floatToGoString(b), c) for b, c in zip(self._bounds, cumulative, strict=True)]
            family.add_metric(list(labels), buckets, counts[-1])
        yield family


REQUESTS = LoopCounter(
    "vlbridge_requests_total",
    "Answers requested, by route and result code ('ok' or an error code)",
    ["route", "code"],
)
ERRORS = LoopCounter(
    "vlbridge_errors_total",
    "Requests and frames answered with an error, by route and code",
    ["route", "code"],
)
LATENCY = LoopHistogram(
    "vlbridge_request_duration_seconds", "Submission to the last token, by route", ["route"], _LATENCY_BUCKETS
)
TTFT = LoopHistogram(
    "vlbridge_time_to_first_token_seconds",
    "Submission to the first token, by route",
    ["route"],
    _TTFT_BUCKETS,
)
QUEUE_DEPTH = Gauge("vlbridge_queue_depth", "Requests waiting for a batch place", registry=REGISTRY)
QUEUE_CAPACITY = Gauge(
    "vlbridge_queue_capacity",
    "Queue places (executor.queue_size): a full queue answers busy",
    registry=REGISTRY,
)
BATCH_SIZE = Gauge("vlbridge_batch_size", "Requests in the running batch", registry=REGISTRY)
MAX_BATCH = Gauge("vlbridge_batch_capacity", "Batch places", registry=REGISTRY)
TOKENS_PER_SECOND = Gauge(
    "vlbridge_tokens_per_second", "Output tokens per second, recently", registry=REGISTRY
)
MODEL_READY = Gauge("vlbridge_model_ready", "1 when the model is loaded and serving", registry=REGISTRY)
LOAD = Gauge("vlbridge_load_ratio", "Executor load 0..1 (batch and queue)", registry=REGISTRY)
GPU_MEMORY_USED = Gauge("vlbridge_gpu_memory_used_bytes", "Device memory in use", registry=REGISTRY)
GPU_MEMORY_TOTAL = Gauge("vlbridge_gpu_memory_total_bytes", "Device memory in all", registry=REGISTRY)
WS_SESSIONS = Gauge(
    "vlbridge_ws_sessions", "WebSocket sessions by state (connected, parked)", ["state"], registry=REGISTRY
)
WS_OPENED = Counter("vlbridge_ws_connections_total", "WebSocket connections accepted", registry=REGISTRY)
WS_CLOSED = Counter(
    "vlbridge_ws_closes_total", "WebSocket connections closed, by close code", ["code"], registry=REGISTRY
)
WS_RESUMED = Counter(
    "vlbridge_ws_resumes_total", "Sessions resumed, by outcome", ["outcome"], registry=REGISTRY
)
PINGS_SENT = Counter("vlbridge_ws_pings_sent_total", "Protocol pings sent", registry=REGISTRY)
PINGS_MISSED = Counter(
    "vlbridge_ws_pings_missed_total",
    "Pings not answered before the next one or the timeout",
    registry=REGISTRY,
)
PING_RTT = Histogram(
    "vlbridge_ws_ping_rtt_seconds",
    "Round-trip time of protocol pings",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
# Set by bot.dispatch each time it reads the inbox (every few seconds): a shared (Redis) inbox
# reports the same numbers from every instance, so alert rules take the max, not the sum.
INBOX_MESSAGES = Gauge(
    "vlbridge_inbox_messages", "IM messages in the inbox, by state", ["state"], registry=REGISTRY
)


def render(stats: ExecutorStats, connected: int, parked: int) -> bytes:
    """Set the mirrored gauges from *stats* and the session counts; the exposition text."""
    QUEUE_DEPTH.set(stats.queue_depth)
    QUEUE_CAPACITY.set(stats.queue_capacity)
    BATCH_SIZE.set(stats.active)
    MAX_BATCH.set(stats.max_batch)
    TOKENS_PER_SECOND.set(stats.tokens_per_second)
    MODEL_READY.set(1 if stats.state.value == "ready" else 0)
    LOAD.set(stats.load)
    GPU_MEMORY_USED.set(stats.gpu_memory_used or 0)
    GPU_MEMORY_TOTAL.set(stats.gpu_memory_total or 0)
    WS_SESSIONS.labels("connected").set(connected)
    WS_SESSIONS.labels("parked").set(parked)
    return generate_latest(REGISTRY)
