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
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from metaproxy.audit.checkpoint import WitnessedCheckpoint
from metaproxy.audit.record import make_record
from metaproxy.audit.ship import S3Shipper
from metaproxy.audit.writer import AuditLog
from metaproxy.broker import instrument
from metaproxy.broker.cache import CredentialCache
from metaproxy.broker.config import BrokerConfig
from metaproxy.broker.fleet import ReplicaHeartbeat
from metaproxy.broker.issuer import CredentialRequest, Issuer, RequestContext
from metaproxy.broker.regions import regional_sts
from metaproxy.broker.revocation import RevocationView, revocation_scope
from metaproxy.broker.scheduler import FairScheduler, StsScheduler
from metaproxy.broker.shared_cache import SharedCredentials
from metaproxy.broker.store import FleetStore, open_store
from metaproxy.broker.store.base import (
    ReplicaRegistry,
    Revocation,
    StoreUnavailable,
)
from metaproxy.broker.store.sealing import Sealer
from metaproxy.broker.sts import StsClient
from metaproxy.broker.tenant_limits import TenantLimiter
from metaproxy.clock import Clock, SystemClock
from metaproxy.errors import BadRequest
from metaproxy.identity.verify import IdentityVerifier
from metaproxy.logs import request_id_var
from metaproxy.net.httperrors import identity_encoding_only, json_errors, new_request_id
from metaproxy.policy.store import PolicyStore

log = logging.getLogger("metaproxy.broker")

BACKFILL_SECONDS = 5.0  # listing the S3 copy at start-up must not hold the broker back for long


@dataclass
class BrokerServices:
    config: BrokerConfig
    clock: Clock
    issuer: Issuer
    policies: PolicyStore
    audit: AuditLog
    sts: StsClient
    scheduler: StsScheduler
    store: FleetStore
    revocations: RevocationView
    heartbeat: ReplicaHeartbeat
    scrape: instrument.ScrapeState
    shipper: S3Shipper | None = None
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
    policies = instrument.CountedPolicyStore(
        config.policies_dir,
        [i.issuer for i in config.trusted_issuers if i.kind == "kubernetes"],
    )
    if not config.trusted_issuers:
        from metaproxy.errors import ConfigError

        raise ConfigError("trusted_issuers: at least one --trust ISSUER,AUDIENCE,JWKS is needed")
    verifier = IdentityVerifier(
        config.trusted_issuers,
        leeway=config.token_leeway_seconds,
        clock=clock,
        cluster_name=config.cluster_name,
        cluster_arn=config.cluster_arn,
    )
    config.audit_dir.mkdir(parents=True, exist_ok=True)
    pruner = _Pruner()
    shipper = audit_shipper(config, on_uploaded=pruner)
    sealer = Sealer.from_file(config.store_key_file) if config.store_key_file else None
    store = open_store(
        config.store, state_dir=config.state_dir, timeout=config.store_timeout, sealer=sealer
    )
    witnessing = AuditWitnessing(store.replicas, config.instance)
    audit = instrument.TimedAuditLog(
        config.audit_dir,
        log_id=f"broker-{config.instance}",
        signing_key=config.audit_key,
        write_timeout=config.audit_write_timeout,
        clock=clock,
        # enqueue only appends to a list: an S3 outage never slows or fails an append.
        on_segment_closed=shipper.enqueue if shipper is not None else None,
        # Each checkpoint also pins the other replicas' latest ones (docs/audit.md).
        witness=witnessing.others,
        on_checkpoint=witnessing.publish,
        max_local_bytes=config.audit_max_local_bytes,  # pruned once shipped (`_Pruner`)
    )
    pruner.audit = audit
    sts = instrument.timed_regions(sts or regional_sts(config))
    scheduler = scheduler or FairScheduler.from_config(
        config, sts, clock, budget=store.budget(config.sts_budget_per_second)
    )

    def drop_cached(entry: Revocation) -> None:
        issuer.forget(entry.tenant, entry.task)

    async def restore(lost: list[Revocation]) -> None:
        await restore_revocations(store, audit, config.instance, lost)

    revocations = RevocationView(
        store.revocations,
        clock,
        max_staleness=config.revocation_max_staleness,
        resync_seconds=config.revocation_resync_seconds,
        on_revoked=drop_cached,
        on_lost=restore,
    )
    issuer = Issuer(
        verifier=verifier,
        policies=policies,
        cache=CredentialCache(clock, refresh_fraction=config.cache_refresh_fraction),
        scheduler=scheduler,
        audit=audit,
        limiter=TenantLimiter(store.limits),
        revocations=revocations,
        shared=shared_credentials(config, store, clock, sealer),
        clock=clock,
        instance=config.instance,
        region=config.region,
        availability_zone=config.availability_zone,
        document_key=config.document_key,
    )
    heartbeat = ReplicaHeartbeat(store.replicas, config.instance, config.heartbeat_seconds)
    return BrokerServices(
        config,
        clock,
        issuer,
        policies,
        audit,
        sts,
        scheduler,
        store,
        revocations,
        heartbeat,
        scrape=instrument.ScrapeState(
            scheduler.stats,
            fleet=lambda: fleet_stats(store, revocations, heartbeat, issuer.shared),
        ),
        shipper=shipper,
    )


async def restore_revocations(
    store: FleetStore, audit: AuditLog, instance: str, lost: list[Revocation]
) -> None:
    """Revocations the store lost (it came back with fewer, and no lift covers them): written
    back as they were, each with an audit record, so the fleet keeps them in force."""
    for entry in lost:
        scope = revocation_scope(entry.tenant, entry.task)
        try:
            await store.revocations.add(entry)
            outcome = "written back"
        except StoreUnavailable:
            outcome = "kept here; writing back failed (store down), retried at the next re-read"
        await audit.append(
            make_record(
                "restored",
                request_id=f"integrity-{new_request_id()}",  # the re-read, not a request
                task=entry.task,
                tenant=entry.tenant,
                rule="revocation-integrity",
                reason=f"{scope} (revoked at {entry.at} by {entry.by}) was missing from the "
                f"store without a lift: kept in force, {outcome}",
                instance=instance,
                status=200,
            )
        )


def fleet_stats(
    store: FleetStore,
    revocations: RevocationView,
    heartbeat: ReplicaHeartbeat,
    shared: SharedCredentials | None,
) -> dict[str, float]:
    """For /metrics: the store's reachability, the fleet's size, the revocation view's age."""
    return {
        "store_up": 1.0 if store.up else 0.0,
        "live_replicas": float(len(heartbeat.live)),
        "revocation_view_age": revocations.age(),
        "revocations_restored": float(revocations.restored),
        "revocations_rejected": float(revocations.rejected),
        "revocations_error": float(revocations.errors + getattr(store, "push_errors", 0)),
        **(shared.stats() if shared is not None else {}),
    }


class AuditWitnessing:
    """This replica's audit chain and the others', through the store's replica registry."""

    def __init__(self, registry: ReplicaRegistry, instance: str) -> None:
        self._registry = registry
        self._instance = instance

    async def others(self) -> dict[str, WitnessedCheckpoint]:
        """By log id (the writer leaves its own out)."""
        found = await self._registry.checkpoints()
        return {checkpoint.log_id: checkpoint for checkpoint in found.values()}

    async def publish(self, checkpoint: WitnessedCheckpoint) -> None:
        await self._registry.publish_checkpoint(self._instance, checkpoint)


def shared_credentials(
    config: BrokerConfig, store: FleetStore, clock: Clock, sealer: Sealer | None
) -> SharedCredentials | None:
    """The cross-replica cache and single flight, where the store is shared. Its sets are
    sealed under `--store-key-file`, which every replica must have (each opens what another
    sealed)."""
    if store.cache is None:
        return None
    from metaproxy.errors import ConfigError

    if sealer is None:
        raise ConfigError("store_key_file: required with a shared store (--store redis://…)")
    return SharedCredentials(
        store.cache,
        sealer,
        clock,
        holder=f"{config.instance}/{os.getpid()}",
        refresh_fraction=config.cache_refresh_fraction,
    )


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix); raises ConfigError for anything else."""
    from metaproxy.errors import ConfigError

    if not url.startswith("s3://"):
        raise ConfigError(f"audit_s3_url: {url!r} must look like s3://bucket/prefix")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise ConfigError(f"audit_s3_url: {url!r} names no bucket")
    return bucket, prefix.strip("/")


class _Pruner:
    """Once a file is in S3 its local copy goes: the audit directory stays a small buffer."""

    audit: AuditLog | None = None

    async def __call__(self, path: Path) -> None:
        if self.audit is not None:
            await self.audit.prune(path)


def audit_shipper(
    config: BrokerConfig, on_uploaded: Callable[[Path], Awaitable[None]] | None = None
) -> S3Shipper | None:
    """Ships closed segments and checkpoints under `prefix/<instance>/`: each broker replica
    writes its own chain, and two chains under one prefix would not verify."""
    if not config.audit_s3_url:
        return None
    from metaproxy.audit.ship import s3_client_factory

    bucket, prefix = parse_s3_url(config.audit_s3_url)
    return S3Shipper(
        bucket=bucket,
        prefix=f"{prefix}/{config.instance}" if prefix else config.instance,
        client_factory=s3_client_factory(config.s3_endpoint, config.sts_region),
        on_uploaded=on_uploaded,
    )


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
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[…
        raise BadRequest(public_message="body is not valid JSON") from None
    credential_request = CredentialRequest.from_json(body)
    ctx = RequestContext(request_id_var.get(), request.remote or "unix")
    token = bearer_token(request.headers.get("Authorization"))
    answer = await services.issuer.issue(token, credential_request, ctx)
    return web.json_response(answer, headers={"Cache-Control": "no-store"})


async def _backfill(shipper: S3Shipper, directory: Path) -> None:
    try:
        async with asyncio.timeout(BACKFILL_SECONDS):
            queued = await shipper.backfill(directory)
    except Exception as exc:
        # S3 may be down at start-up: the broker still starts and newly closed segments still
        # queue; what an earlier run left unshipped goes at the next start.
        log.warning("audit backfill to S3 failed (%s); continuing", type(exc).__name__)
        return
    if queued:
        log.info("audit backfill: %d files queued for S3", queued)


async def _lifetimes(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    # The store first: revocations load from it before anything is served (/readyz waits).
    await services.store.start()
    await services.revocations.start()
    await services.heartbeat.start()
    try:
        async with _audit_and_policies(services):
            yield
    finally:
        await services.heartbeat.aclose()
        await services.revocations.aclose()
        if services.issuer.shared is not None:
            await services.issuer.shared.aclose()  # its last fills, before the store closes
        await services.store.aclose()


@contextlib.asynccontextmanager
async def _audit_and_policies(services: BrokerServices) -> AsyncIterator[None]:
    shipper = services.shipper
    if shipper is not None:
        await shipper.start()
        # Before the writer starts, so files left by an earlier run go first and the S3 copy
        # stays a prefix of the local log.
        await _backfill(shipper, services.config.audit_dir)
    await services.audit.start()
    await services.issuer.failures.start()
    watcher = asyncio.create_task(services.policies.watch(services.config.policy_reload_seconds))
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await services.scheduler.aclose()  # workers stop before the audit log and STS close
    await services.issuer.failures.aclose()  # its last summaries go in before the log closes
    await services.audit.aclose()  # closes the segment and hands it to the shipper
    if shipper is not None:
        await shipper.aclose(drain_seconds=services.config.drain_seconds)
    await services.sts.aclose()


def build_app(services: BrokerServices) -> web.Application:
    app = web.Application(
        middlewares=[json_errors, identity_encoding_only, instrument.request_metrics],
        client_max_size=services.config.max_body_bytes,
    )
    app[SERVICES] = services
    app.router.add_post("/v1/credentials", post_credentials)
    app.cleanup_ctx.append(_lifetimes)
    return app


def probe(services: BrokerServices, path: str) -> tuple[int, str] | None:
    """The answer to a health probe (status, text), or None if `path` is not one. Also answered
    by the admin guard past its connection cap (server.py): probes are never refused."""
    if path == "/healthz":
        return 200, "ok"
    if path != "/readyz":
        return None
    if services.draining:
        return 503, "draining"
    problem = services.revocations.problem()
    if problem:
        # A replica that cannot read the revocations cannot tell a revoked task from another.
        return 503, problem
    return 200, "ready"


async def healthz(request: web.Request) -> web.Response:
    return _probe_response(request)


async def readyz(request: web.Request) -> web.Response:
    return _probe_response(request)


def _probe_response(request: web.Request) -> web.Response:
    answer = probe(request.app[SERVICES], request.path)
    assert answer is not None  # routed here for a probe path
    return web.Response(status=answer[0], text=answer[1])


async def metrics(request: web.Request) -> web.Response:
    request.app[SERVICES].scrape.refresh()
    body, content_type = instrument.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


def build_admin_app(services: BrokerServices) -> web.Application:
    app = web.Application(middlewares=[json_errors, identity_encoding_only], client_max_size=4096)
    app[SERVICES] = services
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
