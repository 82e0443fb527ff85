"""The sidecar's connection-level limits: one guard for the task-facing ports, one for admin.

IMDS and the container endpoint share one guard, so a task cannot double its connection budget
by spreading over both. The admin port has its own small allowance: a task flooding IMDS must
not make the kubelet's readiness probe fail.
"""

from __future__ import annotations

from collections.abc import Callable

from metaproxy.models import SidecarLimits
from metaproxy.net.connguard import FD_RESERVE, ConnectionGuard, ConnectionLimits, canned_response
from metaproxy.sidecar.state import SidecarState

ADMIN_LIMITS = ConnectionLimits(max_connections=32, max_per_client=16)
# The task-facing cap leaves room for the admin port's connections too.
SIDECAR_FD_RESERVE = FD_RESERVE + ADMIN_LIMITS.max_connections

_ADMIN_429 = canned_response(429, "Too Many Requests", b"too many connections\n", "text/plain")


def admin_reject() -> bytes:
    return _ADMIN_429


_DEFAULT_LIMITS = SidecarLimits()


def task_limits(state: SidecarState) -> Callable[[], ConnectionLimits]:
    """The tenant policy's caps, as delivered with the current credentials (defaults before)."""

    def current() -> ConnectionLimits:
        grant = state.keeper.current()
        limits = grant.limits if grant is not None else _DEFAULT_LIMITS
        return ConnectionLimits(limits.max_connections, limits.max_connections_per_client)

    return current


def refusal_counter(state: SidecarState) -> Callable[[str], None]:
    """metaproxy_sidecar_rejected_total for the guards' refusals, in that metric's reasons."""
    rejected = state.metrics.rejected

    def count(reason: str) -> None:
        label = "header_timeout" if reason == "header_timeout" else "connection_cap"
        rejected.labels(label).inc()

    return count


def build_guards(state: SidecarState) -> tuple[ConnectionGuard, ConnectionGuard]:
    """(task-facing guard, admin guard); the admin allowance comes out of the task's fd room."""
    config = state.config
    count_refusal = refusal_counter(state)
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
