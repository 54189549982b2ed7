"""Prometheus metrics: module-level objects in one module-level registry.

Counters and histograms are updated where things happen; gauges that mirror the
executor and the session registry are set at scrape time by `render`. Objects live at
module level so that several apps in one process (tests) never register twice.

The request families, and what their labels mean:

- ``vlbridge_requests_total{route, code}``: every answer asked for on any route (WebSocket
  asks, ``/v1/analyze``, ``/v1/chat/completions``, Feishu messages), by how it ended, and
  every request or frame refused with an error (a 400, a 404, a busy ask, a denied
  handshake). Successful plain reads (``/health``, ``/metrics``, ``/v1/models``, the test
  page) are not counted.
- ``vlbridge_errors_total{route, code}``: the subset of those that ended in an error. Both
  counters move together, in `count`: for every error ``code``,
  ``errors_total{route, code} == requests_total{route, code}``. ``ok`` and ``cancelled``
  (the client cancelled or went away: nothing went wrong) appear in requests only.
- ``code`` is an `Outcome`: ``ok``, ``cancelled`` or an error code (server/http/errors.py
  gives each its HTTP status). An unknown code counts as ``internal``.
- ``route`` is ``ws``, ``feishu``, or the path template of the Starlette route an HTTP
  request matched (``/v1/analyze``; a 405 matched one too); a request that matched no route
  (404: scanners asking for ``/wp-admin`` or ``/.env``) is ``unmatched``, so that unknown
  URLs never become series of their own.
- ``vlbridge_request_duration_seconds{route}`` and ``vlbridge_time_to_first_token_seconds{route}``
  observe answers that ended ``ok``.
- ``vlbridge_build_info{version, python, torch}`` is 1: what this process runs.
"""

from __future__ import annotations

import bisect
import itertools
import math
import platform
from collections.abc import Iterator, Sequence
from enum import StrEnum
from importlib import metadata

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

__all__ = ["CONTENT_TYPE", "REGISTRY", "UNMATCHED", "Outcome", "count", "render"]

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


class Outcome(StrEnum):
    """How a request ended: the ``code`` label of the request and error counters."""

    OK = "ok"
    CANCELLED = "cancelled"  # the client cancelled or went away: counted, not an error
    BAD_REQUEST = "bad_request"
    BAD_IMAGE = "bad_image"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"
    BUSY = "busy"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"

    @property
    def error(self) -> bool:
        return self not in (Outcome.OK, Outcome.CANCELLED)


UNMATCHED = "unmatched"  # the route label of a request no route matched (a 404)

REQUESTS = LoopCounter(
    "vlbridge_requests_total",
    "Answers asked for, and requests or frames refused, by route and outcome "
    "('ok', 'cancelled' or an error code)",
    ["route", "code"],
)
ERRORS = LoopCounter(
    "vlbridge_errors_total",
    "The requests of vlbridge_requests_total that ended in an error, by route and code",
    ["route", "code"],
)
_OUTCOMES = {outcome.value: outcome for outcome in Outcome}


def count(route: str, code: str) -> None:
    """Count one request on *route* that ended with *code* (an `Outcome` value; anything else
    counts as internal): the one place both request counters move, so they always agree."""
    outcome = _OUTCOMES.get(code, Outcome.INTERNAL)
    REQUESTS.inc(route, outcome.value)
    if outcome.error:
        ERRORS.inc(route, outcome.value)


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version("vlbridge")
BUILD_INFO = Gauge(
    "vlbridge_build_info",
    "Always 1: the vlbridge version this process runs, with its Python and torch versions",
    ["version", "python", "torch"],
    registry=REGISTRY,
)
BUILD_INFO.labels(VERSION, platform.python_version(), _version("torch")).set(1)
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
