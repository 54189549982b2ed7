"""Prometheus metrics of the Feishu adapter, on the service's registry (rendered by /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from server.metrics import REGISTRY

CONNECTED = Gauge("vlbridge_feishu_connected", "1 while the Feishu long connection is up", registry=REGISTRY)
WS_RESTARTS = Counter(
    "vlbridge_feishu_ws_restarts_total", "Long-connection workers replaced by the watchdog", registry=REGISTRY
)
EVENTS = Counter(
    "vlbridge_feishu_events_total", "Feishu message events by outcome", ["outcome"], registry=REGISTRY
)
API_ERRORS = Counter(
    "vlbridge_feishu_api_errors_total", "Feishu Open API calls that failed for good", registry=REGISTRY
)
ANSWER_SECONDS = Histogram(
    "vlbridge_feishu_answer_seconds",
    "From event arrival to the answer's last update",
    buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160),
    registry=REGISTRY,
)
API_CALLS = Counter(
    "vlbridge_feishu_api_calls_total",
    "Feishu Open API calls made (every attempt: each counts against the tenant's quota), by kind",
    ["kind"],
    registry=REGISTRY,
)
CARD_ACTIONS = Counter(
    "vlbridge_feishu_card_actions_total",
    "Buttons pressed on answer cards, by action and outcome",
    ["action", "outcome"],
    registry=REGISTRY,
)
