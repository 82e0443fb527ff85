"""The sidecar's connection-level limits: one guard for the task-facing ports, one for admin.

IMDS and the container endpoint share one guard, so a task cannot double its connection budget
by spreading over both. The admin port has its own small allowance: a task flooding IMDS must
not make the kubelet's readiness probe fail.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from metaproxy.connguard import FD_RESERVE, ConnectionGuard, ConnectionLimits, canned_response
from metaproxy.models import SidecarLimits
from metaproxy.sidecar.state import SidecarState

ADMIN_LIMITS = ConnectionLimits(max_connections=32, max_per_client=16)
# The task-facing cap leaves room for the admin port's connections too.
SIDECAR_FD_RESERVE = FD_RESERVE + ADMIN_LIMITS.max_connections

_IMDS_429 = canned_response(
    429,
    "Too Many Requests",
    b'<?xml version="1.0" encoding="iso-8859-1"?>\n'
    b"<html><head><title>429 - Too Many Requests</title></head>"
    b"<body><h1>429 - Too Many Requests</h1></body></html>\n",
    "text/html",
)
_CONTAINER_429 = canned_response(
    429,
    "Too Many Requests",
    json.dumps({"Code": "TooManyRequests", "Message": "too many connections"}).encode(),
    "application/json",
)
_ADMIN_429 = canned_response(429, "Too Many Requests", b"too many connections\n", "text/plain")


def imds_reject() -> bytes:
    return _IMDS_429


def container_reject() -> bytes:
    return _CONTAINER_429


def admin_reject() -> bytes:
    return _ADMIN_429


def task_limits(state: SidecarState) -> Callable[[], ConnectionLimits]:
    """The tenant policy's caps, as delivered with the current credentials (defaults before)."""

    def current() -> ConnectionLimits:
        grant = state.keeper.current()
        limits = grant.limits if grant is not None else SidecarLimits()
        return ConnectionLimits(limits.max_connections, limits.max_connections_per_client)

    return current


def count_refusal(reason: str) -> None:
    """metaproxy_sidecar_rejected_total, in that metric's reasons."""
    from metaproxy.sidecar import metrics

    label = "header_timeout" if reason == "header_timeout" else "connection_cap"
    metrics.REJECTED.labels(reason=label).inc()


def build_guards(state: SidecarState) -> tuple[ConnectionGuard, ConnectionGuard]:
    """(task-facing guard, admin guard); the admin allowance comes out of the task's fd room."""
    config = state.config
    admin = ConnectionGuard(
        "sidecar-admin",
        lambda: ADMIN_LIMITS,
        header_timeout=config.header_timeout,
        on_refused=count_refusal,
    )
    task = ConnectionGuard(
        "sidecar",
        task_limits(state),
        header_timeout=config.header_timeout,
        fd_reserve=SIDECAR_FD_RESERVE,
        on_refused=count_refusal,
    )
    return task, admin
