"""The sidecar's three HTTP faces, wired in one place: IMDS, container credentials, admin.

A client in a tight loop is answered 429 from a per-client token bucket before any work is done
(the incident this project starts from: a shared metadata service looped to death).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from metaproxy.clock import Clock, SystemClock
from metaproxy.config import SidecarConfig
from metaproxy.httperrors import Handler
from metaproxy.models import SidecarLimits
from metaproxy.ratelimit import KeyedLimiter
from metaproxy.sidecar import container_creds, imds, instrument
from metaproxy.sidecar.credentials_cache import CredentialKeeper
from metaproxy.sidecar.host_metadata import HostMetadata
from metaproxy.sidecar.state import STATE, SidecarState
from metaproxy.sidecar.tokens import TokenAuthority

log = logging.getLogger("metaproxy.sidecar")

PATH_CLASSES = ("token", "credentials", "metadata", "container")


def path_class(request: web.Request, container: bool) -> str:
    if container:
        return "container"
    if request.path == imds.TOKEN_PATH:
        return "token"
    if "/iam/security-credentials/" in request.path and not request.path.endswith("/"):
        return "credentials"
    return "metadata"


def _rate(limits: SidecarLimits, cls: str) -> float:
    if cls == "token":
        return limits.token_rps
    if cls in ("credentials", "container"):
        return limits.credentials_rps
    return limits.metadata_rps


def rate_limit(container: bool) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = request.app[STATE]
        cls = path_class(request, container)
        grant = state.keeper.current()
        limits = grant.limits if grant is not None else SidecarLimits()
        limiter = state.limiters.setdefault(cls, KeyedLimiter(_rate(limits, cls), limits.burst))
        wait = limiter.take(request.remote, rate=_rate(limits, cls), burst=limits.burst)
        if wait:
            retry = str(max(1, round(wait)))
            if container:
                return container_creds.json_error(
                    429, "TooManyRequests", "rate limit exceeded", **{"Retry-After": retry}
                )
            return imds.aws_error(429, {"Retry-After": retry})
        return await handler(request)

    return middleware


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "EC2ws"


def build_state(config: SidecarConfig, clock: Clock | None = None) -> SidecarState:
    clock = clock or SystemClock()
    client = instrument.TimedBrokerClient(config)
    keeper = CredentialKeeper(client, config, clock, on_grant=instrument.GrantObserver(clock))
    state = SidecarState(
        config=config,
        tokens=TokenAuthority(),
        keeper=keeper,
        authorization_token=container_creds.load_or_create_token(config.authorization_token_file),
        client=client,
    )
    if config.host_metadata_allow:  # no allow-list: the host's IMDS is never even contacted
        state.host_metadata = HostMetadata(config.host_metadata_url, config.host_metadata_allow)
    return state


def build_imds_app(state: SidecarState) -> web.Application:
    app = web.Application(
        # Metrics outermost, so what the rate limiter refuses is counted too.
        middlewares=[
            instrument.request_metrics(lambda request: path_class(request, container=False)),
            rate_limit(container=False),
        ],
        client_max_size=state.config.max_body_bytes,
    )
    app[STATE] = state
    app.router.add_route("*", "/{tail:.*}", imds.handle)
    app.on_response_prepare.append(_server_header)
    return app


def build_container_app(state: SidecarState) -> web.Application:
    app = web.Application(
        middlewares=[
            instrument.request_metrics(lambda _request: "container"),
            rate_limit(container=True),
        ],
        client_max_size=state.config.max_body_bytes,
    )
    app[STATE] = state
    app.router.add_route("*", "/{tail:.*}", container_creds.handle)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    """Ready only with valid credentials in hand: the app must not start before that."""
    state = request.app[STATE]
    if state.draining:
        return web.Response(status=503, text="draining")
    if state.keeper.current() is None:
        return web.Response(status=503, text=f"no credentials yet {state.keeper.last_error}")
    return web.Response(text="ready")


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    instrument.refresh_gauges(state.keeper, draining=state.draining)
    body, content_type = instrument.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _keeper_lifetime(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    task = asyncio.create_task(state.keeper.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await state.client.close()
    if isinstance(state.host_metadata, HostMetadata):
        await state.host_metadata.close()


def build_admin_app(state: SidecarState) -> web.Application:
    app = web.Application(
        middlewares=[instrument.request_metrics(lambda _request: "admin")], client_max_size=1024
    )
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(_keeper_lifetime)
    return app
