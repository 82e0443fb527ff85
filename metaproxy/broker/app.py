"""The broker's HTTP surface, wired in one place.

`create_services` builds every component from the frozen config (side effects come in through
their protocols: STS, clock, audit sink); `build_app` and `build_admin_app` expose them.
Resource lifetimes are tied to the public app through `cleanup_ctx`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from metaproxy.audit.record import make_record
from metaproxy.audit.writer import AuditLog
from metaproxy.broker.cache import CredentialCache
from metaproxy.broker.issuer import CredentialRequest, Issuer, RequestContext
from metaproxy.broker.limits import TenantLimiter
from metaproxy.broker.revocation import RevocationList
from metaproxy.broker.scheduler import SimpleScheduler, StsScheduler
from metaproxy.broker.sts import Boto3Sts, StsClient
from metaproxy.clock import Clock, SystemClock
from metaproxy.config import BrokerConfig
from metaproxy.errors import BadRequest
from metaproxy.httperrors import json_errors
from metaproxy.identity.verify import IdentityVerifier
from metaproxy.logs import request_id_var
from metaproxy.policy.store import PolicyStore

log = logging.getLogger("metaproxy.broker")


@dataclass
class BrokerServices:
    config: BrokerConfig
    clock: Clock
    issuer: Issuer
    policies: PolicyStore
    audit: AuditLog
    sts: StsClient
    scheduler: StsScheduler
    revocations: RevocationList
    draining: bool = False


SERVICES = web.AppKey("services", BrokerServices)


def create_services(
    config: BrokerConfig,
    *,
    clock: Clock | None = None,
    sts: StsClient | None = None,
    scheduler: StsScheduler | None = None,
) -> BrokerServices:
    """Build everything; raises ConfigError (e.g. a bad policy set) before anything listens."""
    clock = clock or SystemClock()
    policies = PolicyStore(config.policies_dir)
    if not config.trusted_issuers:
        from metaproxy.errors import ConfigError

        raise ConfigError("trusted_issuers: at least one --trust ISSUER,AUDIENCE,JWKS is needed")
    verifier = IdentityVerifier(
        config.trusted_issuers, leeway=config.token_leeway_seconds, clock=clock
    )
    config.audit_dir.mkdir(parents=True, exist_ok=True)
    audit = AuditLog(
        config.audit_dir,
        log_id=f"broker-{config.instance}",
        signing_key=config.audit_key,
        write_timeout=config.audit_write_timeout,
        clock=clock,
    )
    sts = sts or Boto3Sts(
        endpoint=config.sts_endpoint,
        region=config.sts_region,
        timeout=config.sts_timeout,
        max_workers=config.workers_max,
    )
    scheduler = scheduler or SimpleScheduler(
        sts,
        workers=config.workers_max,
        budget_per_second=config.sts_budget_per_second,
        queue_max=config.queue_max,
        max_attempts=config.sts_max_attempts,
        call_timeout=config.sts_timeout * 2,
    )
    revocations = RevocationList(config.audit_dir.parent / "revocations.json", clock)
    issuer = Issuer(
        verifier=verifier,
        policies=policies,
        cache=CredentialCache(clock, refresh_fraction=config.cache_refresh_fraction),
        scheduler=scheduler,
        audit=audit,
        limiter=TenantLimiter(),
        revocations=revocations,
        clock=clock,
        instance=config.instance,
        region=config.region,
        availability_zone=config.availability_zone,
        document_key=config.document_key,
    )
    return BrokerServices(config, clock, issuer, policies, audit, sts, scheduler, revocations)


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def post_credentials(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if request.content_type != "application/json":
        raise BadRequest(public_message="Content-Type must be application/json")
    raw = await request.read()
    try:
        body: object = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(public_message="body is not valid JSON") from None
    credential_request = CredentialRequest.from_json(body)
    ctx = RequestContext(request_id_var.get(), request.remote or "unix")
    token = bearer_token(request.headers.get("Authorization"))
    answer = await services.issuer.issue(token, credential_request, ctx)
    return web.json_response(answer, headers={"Cache-Control": "no-store"})


async def _lifetimes(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    await services.audit.start()
    watcher = asyncio.create_task(services.policies.watch(services.config.policy_reload_seconds))
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await services.audit.close()
    services.sts.close()


def build_app(services: BrokerServices) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=services.config.max_body_bytes)
    app[SERVICES] = services
    app.router.add_post("/v1/credentials", post_credentials)
    app.cleanup_ctx.append(_lifetimes)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if services.draining:
        return web.Response(status=503, text="draining")
    return web.Response(text="ready")


async def metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def post_revoke(request: web.Request) -> web.Response:
    """Admin only (the admin address is not exposed to tasks): revoke a task or a tenant."""
    services = request.app[SERVICES]
    try:
        body: Any = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(public_message="body is not valid JSON") from None
    if not isinstance(body, dict) or len(body) != 1 or next(iter(body)) not in ("task", "tenant"):
        raise BadRequest(public_message='body must be {"task": ID} or {"tenant": NAME}')
    kind, name = next(iter(body.items()))
    if not isinstance(name, str) or not 0 < len(name) <= 256:
        raise BadRequest(public_message=f"{kind} must be a non-empty string")
    entry = services.revocations.revoke(kind, name)
    dropped = services.issuer.cache.drop(lambda _key: True) if kind == "tenant" else 0
    await services.audit.append(
        make_record(
            "revoked",
            request_id=request_id_var.get(),
            task=name if kind == "task" else "",
            tenant=name if kind == "tenant" else "",
            reason=f"{kind} revoked by operator; {dropped} cached sets dropped",
            peer=request.remote or "",
            instance=services.config.instance,
            status=200,
        )
    )
    return web.json_response({"revoked": {"kind": kind, "name": name, "at": entry.at}})


def build_admin_app(services: BrokerServices) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=4096)
    app[SERVICES] = services
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/revoke", post_revoke)
    return app


def server_tls_context(config: BrokerConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context
