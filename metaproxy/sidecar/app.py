"""The sidecar's three HTTP faces, wired in one place: IMDS, container credentials, admin.

All three are served by `http1` (see why there); IMDS and container credentials are the data
plane, admin (health, readiness, metrics) has its own listener and connection guard. A client in
a tight loop is answered 429 from the pod's token bucket before any work is done (the incident
this project starts from: a shared metadata service looped to death), and inside that bucket the
pod's connections get a fair share (`fairness`), so one looping container cannot starve another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Literal

from metaproxy.clock import Clock, SystemClock
from metaproxy.config import SidecarConfig, authorization_token_mode
from metaproxy.models import SidecarLimits
from metaproxy.sidecar import container_creds, diagnosis, http1, imds, instrument, rebinding
from metaproxy.sidecar.credentials_cache import CredentialKeeper
from metaproxy.sidecar.fairness import FairShare
from metaproxy.sidecar.host_metadata import HostMetadata
from metaproxy.sidecar.state import SidecarState
from metaproxy.sidecar.tokens import TokenAuthority

log = logging.getLogger("metaproxy.sidecar")

Face = Literal["imds", "container"]

# A client over its rate gets its 429 this much later. A looping client waits for each answer
# before it sends again, so this caps what one connection costs the sidecar at a few refusals a
# second instead of thousands, and the task's other clients keep a responsive event loop.
# SDKs give IMDS and the container endpoint 1 s, so they see the same 429.
TARPIT_SECONDS = 0.25


def path_class(path: str, face: Face) -> str:
    if face == "container":
        return "container"
    if path == imds.TOKEN_PATH:
        return "token"
    if "/iam/security-credentials/" in path and not path.endswith("/"):
        return "credentials"
    return "metadata"


def _rate(limits: SidecarLimits, cls: str) -> float:
    if cls == "token":
        return limits.token_rps
    if cls in ("credentials", "container"):
        return limits.credentials_rps
    return limits.metadata_rps


_DEFAULT_LIMITS = SidecarLimits()


def data_plane(state: SidecarState, face: Face) -> http1.Handler:
    """The handler behind one face: per-client rate limit, then IMDS or container credentials,
    with every answer counted and timed. No framework in between: this is the hot path."""
    handle = imds.handle if face == "imds" else container_creds.handle

    def too_many(retry: str) -> http1.Response:
        if face == "container":
            return container_creds.json_error(
                429, "TooManyRequests", "rate limit exceeded", **{"Retry-After": retry}
            )
        return imds.aws_error(429, {"Retry-After": retry})

    allowed_hosts = tuple(h.strip().lower().removesuffix(".") for h in state.config.allowed_hosts)
    if face == "container":
        refused = container_creds.json_error(403, "Forbidden", "request refused")
    else:
        refused = imds.aws_error(403)

    def dispatch(request: http1.Request) -> http1.Response | Awaitable[http1.Response]:
        started = time.perf_counter()
        cls = path_class(request.path, face)
        grant = state.keeper.current()
        limits = grant.limits if grant is not None else _DEFAULT_LIMITS
        rate = _rate(limits, cls)
        share = state.limiters.get(cls)
        if share is None:
            share = state.limiters[cls] = FairShare()
        wait = share.take(request.remote, request.connection, rate, limits.burst)
        if wait:
            instrument.count_request(cls, 429, started)
            return _tarpit(too_many(str(max(1, round(wait)))))
        if rebinding.from_browser_or_foreign_host(request.headers, allowed_hosts):
            instrument.count_request(cls, 403, started)
            return refused
        answer = handle(state, request)
        if isinstance(answer, http1.Response):
            instrument.count_request(cls, answer.status, started)
            return answer
        return instrument.counted(answer, cls, started)

    return dispatch


async def _tarpit(response: http1.Response) -> http1.Response:
    await asyncio.sleep(TARPIT_SECONDS)
    return response


def error_page(face: Face) -> http1.ErrorPage:
    """What the HTTP layer answers for requests it refuses before a handler sees them."""
    if face == "container":
        return lambda status: container_creds.json_error(
            status, "BadRequest" if status < 500 else "InternalError", http1.REASONS.get(status, "")
        )
    return imds.aws_error


def build_state(config: SidecarConfig, clock: Clock | None = None) -> SidecarState:
    clock = clock or SystemClock()
    client = instrument.TimedBrokerClient(config)
    keeper = CredentialKeeper(client, config, clock, on_grant=instrument.GrantObserver(clock))
    state = SidecarState(
        config=config,
        tokens=TokenAuthority(),
        keeper=keeper,
        authorization_token=container_creds.load_or_create_token(
            config.authorization_token_file, authorization_token_mode(config)
        ),
        client=client,
    )
    if config.host_metadata_allow:  # no allow-list: the host's IMDS is never even contacted
        state.host_metadata = HostMetadata(config.host_metadata_url, config.host_metadata_allow)
    return state


def admin_plane(state: SidecarState) -> http1.Handler:
    """/healthz, /readyz and /metrics on the same small server as the data plane. No rate limit:
    health probes must never be refused because of other clients (its guard caps connections)."""

    def dispatch(request: http1.Request) -> http1.Response:
        started = time.perf_counter()
        if request.method not in ("GET", "HEAD"):
            answer = _plain(405, "method not allowed", ("Allow", "GET, HEAD"))
        elif request.path == "/healthz":
            answer = healthz(state)
        elif request.path == "/readyz":
            answer = readyz(state)
        elif request.path == "/metrics":
            answer = metrics(state)
        else:
            answer = _plain(404, "not found")
        instrument.count_request("admin", answer.status, started)
        return answer

    return dispatch


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
    return _plain(200, "ready")


def metrics(state: SidecarState) -> http1.Response:
    instrument.refresh_gauges(state.keeper, draining=state.draining)
    body, content_type = instrument.exposition()
    return http1.Response(200, body, content_type)
