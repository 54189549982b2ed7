"""The service's health in one figure, for /health, HAProxy's agent check and balancing.

`assess` turns executor stats, platform health and the drain flag into a status and a
weight 0..100 that falls as the executor fills (100 idle, 1 full while healthy, 0 when
not serving). `agent_line` says the same thing in HAProxy agent-check words.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from server.inference.api import ExecutorState, ExecutorStats


class Status(StrEnum):
    LOADING = "loading"
    HEALTHY = "healthy"
    DEGRADED = "degraded"  # serving, but an IM platform connection is down
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class Assessment:
    status: Status
    weight: int
    draining: bool

    @property
    def serving(self) -> bool:
        return self.status in (Status.HEALTHY, Status.DEGRADED)

    @property
    def http_status(self) -> int:
        return 200 if self.serving else 503


def assess(stats: ExecutorStats, platforms_healthy: bool, draining: bool) -> Assessment:
    if draining or stats.state in (ExecutorState.FAILED, ExecutorState.STOPPED):
        return Assessment(Status.UNHEALTHY, 0, draining)
    if stats.state is ExecutorState.LOADING:
        return Assessment(Status.LOADING, 0, draining)
    status = Status.HEALTHY if platforms_healthy else Status.DEGRADED
    return Assessment(status, max(1, round(100 * (1 - stats.load))), draining)


def agent_line(stats: ExecutorStats, assessment: Assessment) -> str:
    """One HAProxy agent-check reply: ``up 75%``, ``drain`` or ``down`` (`AgentCheck` adds the
    "ready" that ends a drain of its own).

    A full executor (every batch and queue place taken) says "up 0%", not the 1 of /health:
    a new question there would only be refused as busy, and HAProxy's leastconn gives an
    instance with no connection of its own the same rank whatever its weight, unless that
    weight is 0 (then it takes no new work; resumes still reach it by the stick table)."""
    if assessment.serving:
        return f"up {0 if stats.load >= 1 else assessment.weight}%"
    if assessment.draining or stats.state is ExecutorState.LOADING:
        return "drain"
    return "down"


def health_body(
    stats: ExecutorStats,
    assessment: Assessment,
    sessions: Mapping[str, int],
    platforms: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "status": assessment.status.value,
        "weight": assessment.weight,
        "draining": assessment.draining,
        "model": stats.model,
        "device": stats.device,
        "state": stats.state.value,
        "progress": round(stats.load_progress, 3),
        "detail": stats.detail,
        "load": round(stats.load, 3),
        "queue_depth": stats.queue_depth,
        "queue_capacity": stats.queue_capacity,
        "active": stats.active,
        "max_batch": stats.max_batch,
        "tokens_per_second": round(stats.tokens_per_second, 1),
        "gpu_memory": {"used": stats.gpu_memory_used, "total": stats.gpu_memory_total},
        "sessions": dict(sessions),
        "platforms": dict(platforms),
    }
