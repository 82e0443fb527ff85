"""The sidecar's handlers: the data plane of each face (IMDS, container credentials; see
`face`) and admin. `process` builds the parts they share and puts them on listeners.

All are served by `http1` (see why there); admin (health, readiness, metrics) has its own
listener and connection guard. A client in a tight loop is refused (503, Retry-After) from the
pod's token bucket before any work is done (the incident this project starts from: a shared
metadata service looped to death), and inside that bucket the pod's connections get a fair share
(`fairness`), so one looping container cannot starve another.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from metaproxy.models import SidecarLimits
from metaproxy.sidecar import diagnosis, instrument
from metaproxy.sidecar.face import Face, RateClass
from metaproxy.sidecar.fairness import FairShare
from metaproxy.sidecar.state import SidecarState
from metaproxy.sidecar.wire.exposition import HistogramSeries, Series
from metaproxy.sidecar.wire.messages import REASONS, Handler, RepeatHandler, Request, Response

# A client over its rate gets its refusal (503 + Retry-After, which every SDK retries) this much
# later. A looping client waits for each answer before it sends again, so this caps what one
# connection costs the sidecar at a few refusals a second instead of thousands, and the task's
# other clients keep a responsive event loop. SDKs give IMDS and the container endpoint 1 s, so
# they see the same refusal.
TARPIT_SECONDS = 0.25

_DEFAULT_LIMITS = SidecarLimits()
MAX_CACHED_PATHS = 256


class DataPlane(NamedTuple):
    """One face's handlers on one listener, for `http1.protocol_factory`."""

    handle: Handler  # one request
    repeats: RepeatHandler  # copies of one request that arrived together


def data_plane(state: SidecarState, face: Face, listener: str) -> DataPlane:
    """The handler behind one face on one listener: the pod's fair share of its rate, the
    DNS-rebinding check, then the face's own handler, with every answer counted and timed by
    path class and listener. No framework in between: this is the hot path."""
    handle, metrics, keeper = face.handle, state.metrics, state.keeper
    hosts, answered, clock = state.hosts, metrics.answered, time.perf_counter
    rate_limited = metrics.rejected.labels("rate_limited")
    classes, classify = _classifier(face, state.limiters)

    def dispatch(request: Request) -> Response | Awaitable[Response]:
        started = clock()
        rate_class, share = classes.get(request.path) or classify(request.path)
        cls = rate_class.name
        grant = keeper.current()
        limits = grant.limits if grant is not None else _DEFAULT_LIMITS
        wait = share.take(request.connection, rate_class.rate(limits), limits.burst)
        if wait:
            throttled = face.too_many(max(1, round(wait)))
            rate_limited.value += 1
            # Counted apart from the path's own answers: a client over its pod's rate is not
            # the sidecar failing it, so the availability and latency SLOs leave it out.
            instrument.count_request(metrics, "throttled", throttled.status, started, listener)
            return _tarpit(throttled)
        if hosts.refuses(request.headers):
            instrument.count_request(metrics, cls, 403, started, listener)
            return face.refused
        answer = handle(state, request)
        if isinstance(answer, Response):
            count, timing = answered(cls, answer.status, listener)
            count.value += 1
            timing.observe(clock() - started)
            return answer
        return instrument.counted(metrics, answer, cls, started, listener)

    # The last answer `repeats` counted, its path class and their series: the same again is
    # then counted without a lookup (most connections repeat one request, with one answer).
    last_counted: tuple[Response, str, tuple[Series, HistogramSeries]] | None = None

    def repeats(request: Request, copies: int) -> Response | Awaitable[Response] | None:
        """`copies` of `request` that arrived in one read, answered as `dispatch` answers each:
        every copy passes the rate limit (all of them, or none is taken and `http1` hands them
        to `dispatch` one by one, which refuses those over it), and the checks after it judge
        them at one instant, where they judge them all alike (the same token, the same Host,
        the same credentials): so one answer is each copy's. Each is counted, and timed as
        long as all of them took."""
        if copies == 1:
            return dispatch(request)  # a lone request refused counts in its demand: refuse it here
        started = clock()
        rate_class, share = classes.get(request.path) or classify(request.path)
        grant = keeper.current()
        limits = grant.limits if grant is not None else _DEFAULT_LIMITS
        if share.take(request.connection, rate_class.rate(limits), limits.burst, copies):
            return None
        cls = rate_class.name
        refused = request.host_refused
        if refused is None:
            refused = request.host_refused = hosts.refuses(request.headers)
        if refused:
            instrument.count_request(metrics, cls, 403, started, listener, requests=copies)
            return face.refused
        answer = handle(state, request)
        if isinstance(answer, Response):
            nonlocal last_counted
            if last_counted is not None and last_counted[0] is answer and last_counted[1] is cls:
                count, timing = last_counted[2]
            else:
                series = count, timing = answered(cls, answer.status, listener)
                last_counted = (answer, cls, series)
            count.value += copies
            timing.observe(clock() - started, copies)
            return answer
        return instrument.counted(metrics, answer, cls, started, listener, requests=copies)

    return DataPlane(dispatch, repeats)


def _classifier(
    face: Face, limiters: dict[str, FairShare]
) -> tuple[dict[str, tuple[RateClass, FairShare]], Callable[[str], tuple[RateClass, FairShare]]]:
    """By request path (an SDK asks the same few paths): its rate class and that class's
    limiter, kept; and what finds them for a path not kept."""
    classes: dict[str, tuple[RateClass, FairShare]] = {}

    def classify(path: str) -> tuple[RateClass, FairShare]:
        if len(classes) >= MAX_CACHED_PATHS:
            classes.clear()
        rate_class = face.rate_class(path)
        share = limiters.get(rate_class.name)
        if share is None:
            share = limiters[rate_class.name] = FairShare()
        found = classes[path] = (rate_class, share)
        return found

    return classes, classify


async def _tarpit(response: Response) -> Response:
    await asyncio.sleep(TARPIT_SECONDS)
    return response


def admin_plane(state: SidecarState) -> Handler:
    """/healthz, /readyz and /metrics on the same small server as the data plane, and the pod's
    preStop hook (`/lifecycle/terminate`). No rate limit: health probes must never be refused
    because of other clients (its guard caps connections)."""

    def dispatch(request: Request) -> Response | Awaitable[Response]:
        started = time.perf_counter()
        answer: Response | Awaitable[Response]
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
        if isinstance(answer, Response):
            instrument.count_request(state.metrics, "admin", answer.status, started, "admin")
            return answer
        return instrument.counted(state.metrics, answer, "admin", started, "admin")

    return dispatch


def terminate(state: SidecarState, request: Request) -> Response | Awaitable[Response]:
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


async def _after_notice(seconds: float) -> Response:
    await asyncio.sleep(seconds)
    return _plain(200, "terminating")


def _plain(status: int, text: str, *headers: tuple[str, str]) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8", headers)


def admin_error_page(status: int) -> Response:
    return _plain(status, REASONS.get(status, "error").lower())


def healthz(state: SidecarState) -> Response:
    """Fails when the refresh loop has stopped, or cannot make progress until a file is fixed
    (unreadable CA bundle or identity token): a restart or an operator is needed."""
    problem = state.keeper.health()
    if problem:
        return _plain(503, f"unhealthy: {problem}")
    return _plain(200, "ok")


def readyz(state: SidecarState) -> Response:
    """Ready only with valid credentials in hand: the app must not start before that. When not
    ready, the one line says why (the same line the log has)."""
    if state.draining:
        return _plain(503, "not ready: draining")
    identity = state.client.identity
    now = state.clock.now()
    expired = identity.expired_line(now) if identity is not None else ""
    if state.keeper.current() is None:
        # The broker's own 401 line names the expiry too; another failure (the broker
        # unreachable) is not why this task has no credentials once its token has expired.
        error = state.keeper.error
        unrelated = error is not None and error.status != 401
        line = expired if expired and unrelated else state.keeper.problem or diagnosis.WAITING
        return _plain(503, f"not ready: {line}")
    if expired:
        # Cached credentials are still served, but the task can no longer be checked for long.
        return _plain(503, f"not ready: {expired}")
    if state.link_local is not None and state.link_local.problem:
        return _plain(503, f"not ready: {state.link_local.problem}")
    expiring = identity.expiring_line(now) if identity is not None else ""
    return _plain(200, f"ready; {expiring}" if expiring else "ready")


def metrics(state: SidecarState) -> Response:
    instrument.refresh_gauges(state)
    return Response(200, state.metrics.render(), state.metrics.content_type)
