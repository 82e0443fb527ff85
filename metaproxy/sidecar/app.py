"""The sidecar's handlers, wired in one place: the data plane of each face (IMDS, container
credentials; see `face`) and admin.

All are served by `http1` (see why there); admin (health, readiness, metrics) has its own
listener and connection guard. A client in a tight loop is refused (503, Retry-After) from the
pod's token bucket before any work is done (the incident this project starts from: a shared
metadata service looped to death), and inside that bucket the pod's connections get a fair share
(`fairness`), so one looping container cannot starve another.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from metaproxy.clock import Clock, SystemClock
from metaproxy.models import SidecarLimits
from metaproxy.sidecar import container_creds, diagnosis, instrument
from metaproxy.sidecar.config import SidecarConfig, authorization_token_mode
from metaproxy.sidecar.credentials_cache import CredentialKeeper
from metaproxy.sidecar.face import Face, RateClass
from metaproxy.sidecar.fairness import FairShare
from metaproxy.sidecar.imds_view import render_view
from metaproxy.sidecar.lifecycle import TerminationNotice
from metaproxy.sidecar.metrics import SidecarMetrics
from metaproxy.sidecar.rebinding import HostCheck
from metaproxy.sidecar.state import PerGrant, SidecarState
from metaproxy.sidecar.tokens import TokenAuthority, load_or_create_key
from metaproxy.sidecar.wire import http1

log = logging.getLogger("metaproxy.sidecar")

# A client over its rate gets its refusal (503 + Retry-After, which every SDK retries) this much
# later. A looping client waits for each answer before it sends again, so this caps what one
# connection costs the sidecar at a few refusals a second instead of thousands, and the task's
# other clients keep a responsive event loop. SDKs give IMDS and the container endpoint 1 s, so
# they see the same refusal.
TARPIT_SECONDS = 0.25

_DEFAULT_LIMITS = SidecarLimits()
MAX_CACHED_PATHS = 256


def data_plane(state: SidecarState, face: Face, listener: str) -> http1.Handler:
    """The handler behind one face on one listener: the pod's fair share of its rate, the
    DNS-rebinding check, then the face's own handler, with every answer counted and timed by
    path class and listener. No framework in between: this is the hot path."""
    handle, metrics, keeper, limiters = face.handle, state.metrics, state.keeper, state.limiters
    rate_limited = metrics.rejected.labels("rate_limited")
    classes: dict[str, RateClass] = {}  # by request path: an SDK asks the same few paths

    def dispatch(request: http1.Request) -> http1.Response | Awaitable[http1.Response]:
        started = time.perf_counter()
        rate_class = classes.get(request.path)
        if rate_class is None:
            if len(classes) >= MAX_CACHED_PATHS:
                classes.clear()
            rate_class = classes[request.path] = face.rate_class(request.path)
        cls = rate_class.name
        grant = keeper.current()
        limits = grant.limits if grant is not None else _DEFAULT_LIMITS
        share = limiters.get(cls)
        if share is None:
            share = limiters[cls] = FairShare()
        wait = share.take(request.connection, rate_class.rate(limits), limits.burst)
        if wait:
            throttled = face.too_many(max(1, round(wait)))
            rate_limited.value += 1
            # Counted apart from the path's own answers: a client over its pod's rate is not
            # the sidecar failing it, so the availability and latency SLOs leave it out.
            instrument.count_request(metrics, "throttled", throttled.status, started, listener)
            return _tarpit(throttled)
        if state.hosts.refuses(request.headers):
            instrument.count_request(metrics, cls, 403, started, listener)
            return face.refused
        answer = handle(state, request)
        if isinstance(answer, http1.Response):
            instrument.count_request(metrics, cls, answer.status, started, listener)
            return answer
        return instrument.counted(metrics, answer, cls, started, listener)

    return dispatch


async def _tarpit(response: http1.Response) -> http1.Response:
    await asyncio.sleep(TARPIT_SECONDS)
    return response


def build_state(
    config: SidecarConfig,
    clock: Clock | None = None,
    on_started: Callable[[], None] | None = None,
) -> SidecarState:
    """`on_started`: called once, when the first credentials are in."""
    clock = clock or SystemClock()
    metrics = SidecarMetrics()
    client = instrument.TimedBrokerClient(config, metrics)
    keeper = CredentialKeeper(
        client, config, clock, on_grant=instrument.GrantObserver(clock, metrics, on_started)
    )
    notice = TerminationNotice()
    state = SidecarState(
        config=config,
        tokens=TokenAuthority(load_or_create_key(config.imds_token_key_file)),
        keeper=keeper,
        authorization_token=container_creds.load_or_create_token(
            config.authorization_token_file, authorization_token_mode(config)
        ),
        client=client,
        metrics=metrics,
        imds_view=PerGrant(functools.partial(render_view, notice=notice)),
        container_document=PerGrant(container_creds.render_document),
        hosts=HostCheck(config.allowed_hosts),
        clock=clock,
        notice=notice,
        started=http1.http_date(time.time()),
        relative_path=config.container_credentials_path.encode(),
    )
    if config.host_metadata_allow:  # no allow-list: the host's IMDS is never even contacted
        from metaproxy.sidecar.host_metadata import HostMetadata

        state.host_metadata = HostMetadata(
            config.host_metadata_url,
            config.host_metadata_allow,
            interface=config.host_metadata_interface,
        )
        client.node_facts = state.host_metadata.facts
    if config.link_local_check:
        from metaproxy.sidecar.link_local import LinkLocalCheck

        state.link_local = LinkLocalCheck(state.tokens)
    return state


def admin_plane(state: SidecarState) -> http1.Handler:
    """/healthz, /readyz and /metrics on the same small server as the data plane, and the pod's
    preStop hook (`/lifecycle/terminate`). No rate limit: health probes must never be refused
    because of other clients (its guard caps connections)."""

    def dispatch(request: http1.Request) -> http1.Response | Awaitable[http1.Response]:
        started = time.perf_counter()
        answer: http1.Response | Awaitable[http1.Response]
        if request.method not in ("GET", "HEAD"):
            answer = _plain(405, "method not allowed", ("Allow", "GET, HEAD"))
        elif request.path == "/healthz":
            answer = healthz(state)
        elif request.path == "/readyz":
            answer = readyz(state)
        elif request.path == "/metrics":
            answer = metrics(state)
        elif request.path == "/lifecycle/terminate" and state.config.lifecycle_token:
            answer = terminate(state, request)
        else:
            answer = _plain(404, "not found")
        if isinstance(answer, http1.Response):
            instrument.count_request(state.metrics, "admin", answer.status, started, "admin")
            return answer
        return instrument.counted(state.metrics, answer, "admin", started, "admin")

    return dispatch


def terminate(
    state: SidecarState, request: http1.Request
) -> http1.Response | Awaitable[http1.Response]:
    """The pod is being deleted (Kubernetes runs the app containers' preStop hooks first, and
    stops a native sidecar only after the apps have exited): announce the task's end now, and
    hold the hook for the notice period, so the apps see `spot/instance-action` before their
    SIGTERM. Authenticated: the admin port is reachable from the node and the cluster."""
    supplied = request.headers.get("x-metaproxy-lifecycle-token", "").encode("latin-1", "replace")
    if not hmac.compare_digest(supplied, state.config.lifecycle_token.encode()):
        return _plain(403, "forbidden")
    state.begin_termination()
    if state.config.termination_notice_seconds <= 0:
        return _plain(200, "terminating")
    return _after_notice(state.config.termination_notice_seconds)


async def _after_notice(seconds: float) -> http1.Response:
    await asyncio.sleep(seconds)
    return _plain(200, "terminating")


def _plain(status: int, text: str, *headers: tuple[str, str]) -> http1.Response:
    return http1.Response(status, text.encode(), "text/plain; charset=utf-8", headers)


def admin_error_page(status: int) -> http1.Response:
    return _plain(status, http1.REASONS.get(status, "error").lower())


def healthz(state: SidecarState) -> http1.Response:
    """Fails when the refresh loop has stopped, or cannot make progress until a file is fixed
    (unreadable CA bundle or identity token): a restart or an operator is needed."""
    problem = state.keeper.health()
    if problem:
        return _plain(503, f"unhealthy: {problem}")
    return _plain(200, "ok")


def readyz(state: SidecarState) -> http1.Response:
    """Ready only with valid credentials in hand: the app must not start before that. When not
    ready, the one line says why (the same line the log has)."""
    if state.draining:
        return _plain(503, "not ready: draining")
    if state.keeper.current() is None:
        return _plain(503, f"not ready: {state.keeper.problem or diagnosis.WAITING}")
    if state.link_local is not None and state.link_local.problem:
        return _plain(503, f"not ready: {state.link_local.problem}")
    return _plain(200, "ready")


def metrics(state: SidecarState) -> http1.Response:
    instrument.refresh_gauges(state)
    return http1.Response(200, state.metrics.render(), state.metrics.content_type)
