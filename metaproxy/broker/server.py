"""One broker, composed in one place: its parts built from the frozen config, started in
order on an `AsyncExitStack`, closed in reverse.

Building checks everything that can be checked before anything starts (TLS pair, control token,
trusted issuers, policy set, store URL and key) and raises `ConfigError`. Starting then brings
up, in order: the fleet store (revocations load from it before /readyz says ready), the audit
chain, the revocation view, the heartbeat, the fleet's shared cache, the summaries of failed
authentications and of refusals, the policy watcher, the STS scheduler, the listeners, the
certificate reloader.

`metaproxy broker` runs it through `serve()` (`metaproxy.process.serve`): SIGTERM drains
(/readyz false, the public port stops accepting, in-flight requests finish, capped by
--drain-seconds), SIGHUP reloads the policy set. Closing then stops each part in reverse:
workers before the audit log and STS, the last summaries and fills before the log and the store.

The credential path is composed here once, top to bottom (`credentials/source.py`):

    LocalCache → RevocationGuard → [FleetCache → RevocationGuard →] Scheduler → STS
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from metaproxy.broker import instrument
from metaproxy.broker.admin import Probe, build_admin_app
from metaproxy.broker.answer import Answers
from metaproxy.broker.attest.attestor import AwsAttestor
from metaproxy.broker.audit_trail import AuditTrail
from metaproxy.broker.auditing import BrokerAudit
from metaproxy.broker.authenticator import Authenticator
from metaproxy.broker.authn import FailedAuthentications
from metaproxy.broker.config import BrokerConfig
from metaproxy.broker.control import ControlToken, ControlTokens, build_control_app
from metaproxy.broker.credentials.fleet import FleetCache
from metaproxy.broker.credentials.guard import RevocationGuard
from metaproxy.broker.credentials.local import LocalCache
from metaproxy.broker.credentials.regions import regional_sts
from metaproxy.broker.credentials.scheduler import FairScheduler, Scheduler
from metaproxy.broker.credentials.source import CredentialSource, Dropped, Scope
from metaproxy.broker.credentials.sts import StsClient
from metaproxy.broker.figures import (
    BrokerFigures,
    FiguresCollector,
    FleetFigures,
    SummarisedFigures,
)
from metaproxy.broker.fleet import ReplicaHeartbeat
from metaproxy.broker.gate import FleetGate
from metaproxy.broker.http_api import build_public_app
from metaproxy.broker.issuer import Issuer
from metaproxy.broker.listeners import Apps, Listeners
from metaproxy.broker.metrics import BrokerMetrics
from metaproxy.broker.refusals import RefusalSummaries
from metaproxy.broker.revocation import RevocationView
from metaproxy.broker.revoke import Revoker
from metaproxy.broker.store import FleetStore, open_store
from metaproxy.broker.store.base import Revocation
from metaproxy.broker.store.sealing import Sealer
from metaproxy.broker.tls import CertificateReloader
from metaproxy.clock import Clock, SystemClock, WaitingClock
from metaproxy.errors import ConfigError
from metaproxy.identity.remote_keys import Fetching
from metaproxy.identity.verify import IdentityVerifier
from metaproxy.policy.store import PolicyStore
from metaproxy.process.lifetime import Background
from metaproxy.process.runtime import server_tls_context
from metaproxy.process.serve import started


class BrokerServer:
    """A running broker: its URLs, and its parts for the CLI, the demo and the tests."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        clock: WaitingClock | None = None,
        sts: StsClient | None = None,
        scheduler: Scheduler | None = None,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        """Build everything; raises ConfigError (e.g. a bad policy set) before anything runs.
        `sts` and `scheduler` replace the configured ones (tests, benchmarks); the broker
        closes them. `on_started` is called once every part has started."""
        self.config = config
        self._on_started = on_started
        clock = clock or SystemClock()
        self.clock = clock
        # First: a half-configured TLS or a bad pair refuses to start, as does the control API
        # without its token, and a broker that trusts no issuer.
        tls = server_tls_context(config.tls_cert, config.tls_key)
        control_token = _control_token(config, tls)
        if not config.trusted_issuers and not config.aws_attest_audience:
            raise ConfigError(
                "trusted_issuers: at least one --trust ISSUER,AUDIENCE,JWKS is needed"
            )
        # Its own metrics: the figures are read from the parts below when /metrics is scraped.
        self.metrics = BrokerMetrics(FiguresCollector(self._figures))
        self.policies = instrument.CountedPolicyStore(
            PolicyStore(
                config.policies_dir,
                [i.issuer for i in config.trusted_issuers if i.kind == "kubernetes"],
            ),
            self.metrics,
        )
        sealer = Sealer.from_file(config.store_key_file) if config.store_key_file else None
        self.store: FleetStore = open_store(
            config.store,
            state_dir=config.state_dir,
            timeout=config.store_timeout,
            budget_per_second=config.sts_budget_per_second,
            sealer=sealer,
        )
        self.audit = BrokerAudit(config, self.store.replicas, clock, self.metrics)
        trail = AuditTrail(self.audit.log, config.instance)
        self.revocations = RevocationView(
            self.store.revocations,
            clock,
            max_staleness=config.revocation_max_staleness,
            resync_seconds=config.revocation_resync_seconds,
        )
        self.heartbeat = ReplicaHeartbeat(
            self.store.replicas, config.instance, config.heartbeat_seconds
        )
        self.sts = instrument.timed_regions(sts or regional_sts(config), self.metrics)
        self.scheduler: Scheduler = scheduler or FairScheduler.from_config(
            config, self.sts, clock, budget=self.store.budget
        )
        source: CredentialSource = RevocationGuard(self.scheduler, self.revocations)
        self.fleet_cache = _fleet_cache(config, self.store, source, clock, sealer)
        if self.fleet_cache is not None:
            source = RevocationGuard(
                self.fleet_cache, self.revocations, on_refused=self.fleet_cache.purge_later
            )
        self.cache = LocalCache(source, clock, refresh_fraction=config.cache_refresh_fraction)
        self.revocations.when_revoked(self._drop_revoked)
        self.failures = FailedAuthentications(trail, clock)
        self.control_failures = FailedAuthentications(trail, clock, rule="control-authentication")
        self.refusals = RefusalSummaries(trail, clock)
        self.verifier = verifier = IdentityVerifier(
            config.trusted_issuers,
            leeway=config.token_leeway_seconds,
            clock=clock,
            cluster_name=config.cluster_name,
            cluster_arn=config.cluster_arn,
            fetching=Fetching(
                refresh_seconds=config.jwks_refresh_seconds,
                unknown_kid_interval=config.jwks_unknown_kid_interval,
                timeout=config.jwks_fetch_timeout,
            ),
            jwks_ca_file=config.jwks_ca_file,
            spiffe_paths=config.spiffe_paths,
        )
        self.attestor = AwsAttestor.from_config(config, clock)
        self.issuer = Issuer(
            authenticator=Authenticator(verifier, self.failures, attestor=self.attestor),
            policies=self.policies,
            gate=FleetGate(self.store.admissions),
            revocations=self.revocations,
            source=self.cache,
            audit=self.refusals,
        )
        self.revoker = Revoker(
            self.store.revocations,
            self.revocations,
            fleet=self.fleet_cache,
            policies=self.policies,
            audit=trail,
            clock=clock,
            max_staleness=config.revocation_max_staleness,
            failures=self.control_failures,
        )
        self.revocations.when_lost(self.revoker.restore)
        self.probe = Probe(self.revocations)
        answers = Answers(
            clock,
            region=config.region,
            availability_zone=config.availability_zone,
            document_key=config.document_key,
        )
        apps = Apps(
            public=build_public_app(
                self.issuer,
                answers,
                self.metrics,
                max_body_bytes=config.max_body_bytes,
                header_timeout=config.header_timeout,
            ),
            admin=build_admin_app(self.probe, self.metrics, header_timeout=config.header_timeout),
            control=build_control_app(self.revoker, control_token) if control_token else None,
        )
        self.listeners = Listeners(config, apps, self.probe, tls)
        self.certificate = (
            CertificateReloader(tls, config.tls_cert, config.tls_key)
            if tls is not None and config.tls_cert is not None and config.tls_key is not None
            else None
        )
        self._stack = contextlib.AsyncExitStack()

    @classmethod
    async def start(cls, config: BrokerConfig, **deps: Any) -> BrokerServer:
        """Build and start a broker (see `__init__` for `deps`)."""
        server = cls(config, **deps)
        await server.__aenter__()
        return server

    async def __aenter__(self) -> BrokerServer:
        stack = self._stack
        try:
            # The store first: revocations load from it before anything is served.
            await started(stack, self.store)
            stack.push_async_callback(self.sts.aclose)  # after the workers that call it
            await started(stack, self.audit)
            await started(stack, self.revocations)
            await started(stack, self.heartbeat)
            if self.fleet_cache is not None:
                await started(stack, self.fleet_cache)  # its last fills, before the store
            await started(stack, self.failures)  # its last summaries, before the log closes
            await started(stack, self.verifier)  # issuers' keys by URL, before any request
            await started(stack, self.control_failures)
            await started(stack, self.refusals)
            if self.attestor is not None:
                await started(stack, self.attestor)
            watch = self.policies.watch
            reload_seconds = self.config.policy_reload_seconds
            await started(stack, Background("policy-watch", lambda: watch(reload_seconds)))
            await started(stack, self.scheduler)
            await started(stack, self.listeners)
            if self.certificate is not None:
                await started(stack, self.certificate)
        except BaseException:
            await stack.aclose()
            raise
        if self._on_started is not None:
            self._on_started()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def ready(self) -> Mapping[str, object]:
        """What the ready file says besides the pid."""
        return {
            "url": self.url,
            "admin_url": self.admin_url,
            "control_url": self.control_url,
            "instance": self.config.instance,
        }

    def reload(self) -> None:
        """SIGHUP: read the policy set again now rather than at the next poll."""
        self.policies.reload()

    async def drain(self, deadline: float) -> None:
        """SIGTERM: /readyz turns false, the public port stops accepting, and the requests in
        flight finish by `deadline` (loop time); the admin port answers "draining" meanwhile."""
        self.probe.draining = True
        await self.listeners.drain(deadline)

    async def aclose(self) -> None:
        """Close every part in the reverse of its start; a broker closed without a drain (the
        tests, the demo) drains first, capped at --drain-seconds."""
        if not self.probe.draining:
            deadline = asyncio.get_running_loop().time() + self.config.drain_seconds
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self.drain(deadline)
        await self._stack.aclose()

    @property
    def url(self) -> str:
        return self.listeners.url

    @property
    def admin_url(self) -> str:
        return self.listeners.admin_url

    @property
    def control_url(self) -> str:
        return self.listeners.control_url

    def _drop_revoked(self, entry: Revocation) -> Dropped:
        return self.cache.forget(Scope(entry.tenant, entry.task))

    def _figures(self) -> BrokerFigures:
        """For /metrics: what the scheduler, the listeners and the fleet's parts count."""
        revocations = self.revocations
        return BrokerFigures(
            scheduler=self.scheduler.stats(),
            open_connections=self.listeners.open_connections,
            fleet=FleetFigures(
                store_up=self.store.up,
                live_replicas=len(self.heartbeat.live),
                revocation_view_age=revocations.age(),
                revocations_restored=revocations.restored,
                revocations_rejected=revocations.rejected,
                revocation_errors=revocations.errors + self.store.push_errors,
                shared_cache=self.fleet_cache.stats() if self.fleet_cache is not None else None,
            ),
            key_sets=self.verifier.key_sets(),
            attestations=self.attestor.stats() if self.attestor is not None else None,
            summarised=SummarisedFigures(
                authentication=self.failures.summarised,
                control_authentication=self.control_failures.summarised,
                refusal=self.refusals.summarised,
            ),
        )


def _fleet_cache(
    config: BrokerConfig,
    store: FleetStore,
    inner: CredentialSource,
    clock: Clock,
    sealer: Sealer | None,
) -> FleetCache | None:
    """The cross-replica cache and single flight, where the store is shared. Its sets are
    sealed under `--store-key-file`, which every replica must have (each opens what another
    sealed)."""
    if store.cache is None:
        return None
    if sealer is None:
        raise ConfigError("store_key_file: required with a shared store (--store redis://…)")
    return FleetCache(
        inner,
        store.cache,
        sealer,
        clock,
        holder=f"{config.instance}/{os.getpid()}",
        refresh_fraction=config.cache_refresh_fraction,
    )


def _control_token(config: BrokerConfig, tls: ssl.SSLContext | None) -> ControlTokens | None:
    """The control API's tokens, checked with the rest of the configuration before any start."""
    if not config.control_listen:
        return None
    if config.control_token_file is not None and config.control_tokens is not None:
        raise ConfigError("control_tokens: give it or --control-token-file, not both")
    if config.control_token_file is None and config.control_tokens is None:
        raise ConfigError(
            "control_tokens: --control-tokens or --control-token-file required with "
            "--control-listen"
        )
    host = config.control_listen.rpartition(":")[0].strip("[]")
    if tls is None and host not in ("127.0.0.1", "::1", "localhost"):
        # A bearer token in the clear on a network is a token for whoever listens.
        raise ConfigError("control_listen: off loopback the control API needs --tls-cert/--tls-key")
    if config.control_tokens is not None:
        return ControlTokens(config.control_tokens, named=True)
    assert config.control_token_file is not None
    return ControlToken(config.control_token_file)
