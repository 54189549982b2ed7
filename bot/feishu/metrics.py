"""Prometheus metrics of the Feishu adapter (default registry; the service exposes /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTED = Gauge("vlbridge_feishu_connected", "1 while the Feishu long connection is up")
WS_RESTARTS = Counter("vlbridge_feishu_ws_restarts_total", "Long-connection workers replaced by the watchdog")
EVENTS = Counter("vlbridge_feishu_events_total", "Feishu message events by outcome", ["outcome"])
API_ERRORS = Counter("vlbridge_feishu_api_errors_total", "Feishu Open API calls that failed for good")
ANSWER_SECONDS = Histogram(
    "vlbridge_feishu_answer_seconds",
    "From event arrival to the answer's last update",
    buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160),
)
