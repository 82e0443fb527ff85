"""The broker's configuration (`metaproxy broker`): its fields, documented, and the checks no
single field can make. Built like every config by `metaproxy.config.build_config`; kept out of
`metaproxy.config` so that a sidecar, one per task, does not hold this class in memory."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from metaproxy.broker.attest.rules import parse_rule
from metaproxy.config import _LISTEN, _LOG_FORMAT, TrustedIssuer, check_tls_pair, doc
from metaproxy.errors import ConfigError


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    listen: str = field(
        default="127.0.0.1:8443",
        metadata=doc("where to serve sidecars (POST /v1/credentials)", choices=_LISTEN),
    )
    socket: Path | None = field(
        default=None,
        metadata=doc("serve sidecars on this Unix socket instead of --listen (not both)"),
    )
    admin_listen: str = field(
        default="127.0.0.1:9902",
        metadata=doc("where to serve /healthz, /readyz and /metrics", choices=_LISTEN),
    )
    tls_cert: Path | None = field(
        default=None,
        metadata=doc("PEM certificate chain for --listen (with --tls-key)", reads=True),
    )
    tls_key: Path | None = field(
        default=None, metadata=doc("PEM private key for --listen (with --tls-cert)", reads=True)
    )
    policies_dir: Path = field(
        default=Path("policies"),
        metadata=doc(
            "directory of tenant policy files (*.toml); reloaded when they change", reads=True
        ),
    )
    policy_reload_seconds: float = field(
        default=2.0, metadata=doc("how often to look for policy changes", unit="seconds")
    )
    trusted_issuers: tuple[TrustedIssuer, ...] = field(
        default=(),
        metadata=doc(
            "trust identity tokens from this issuer (repeatable flag; the environment variable "
            "takes ';'-separated entries); KIND is platform (default) or kubernetes",
            metavar="ISSUER,AUDIENCE,JWKS_FILE[,KIND]",
        ),
    )
    token_leeway_seconds: int = field(
        default=30,
        metadata=doc("clock skew tolerated on identity tokens' exp/nbf/iat", unit="seconds"),
    )
    cluster_name: str = field(
        default="",
        metadata=doc(
            "the Kubernetes cluster's name, ${cluster_name} in policy templates (EKS Pod "
            "Identity's eks-cluster-name tag)",
            metavar="NAME",
        ),
    )
    cluster_arn: str = field(
        default="",
        metadata=doc(
            "the cluster's ARN, ${cluster_arn} in policy templates (eks-cluster-arn)",
            metavar="ARN",
        ),
    )
    document_key: Path | None = field(
        default=None,
        metadata=doc(
            "PEM private key that signs instance-identity documents; unset: "
            "meta-data's dynamic/instance-identity/* answers 404",
            reads=True,
        ),
    )
    audit_dir: Path = field(
        default=Path("audit"), metadata=doc("directory of audit log segments and checkpoints")
    )
    audit_key: Path | None = field(
        default=None,
        metadata=doc(
            "PEM private key that signs audit checkpoints; unset: unsigned checkpoints", reads=True
        ),
    )
    audit_s3_url: str = field(
        default="",
        metadata=doc(
            "ship closed segments and checkpoints to s3://BUCKET/PREFIX, under "
            "PREFIX/<instance>/; empty: no shipping",
            metavar="URL",
        ),
    )
    audit_write_timeout: float = field(
        default=0.5,
        metadata=doc(
            "refuse to issue (fail closed) when an audit write takes longer", unit="seconds"
        ),
    )
    # The Deployment's audit volume is 2 GiB; segments leave it once shipped. If the sink is down
    # that long, refusing to issue (503) beats filling the volume and getting the pod evicted.
    audit_max_local_bytes: int = field(
        default=1536 << 20,
        metadata=doc(
            "audit segments kept locally (unshipped or unpruned) before the broker refuses to "
            "issue (fail closed, 503); keep it under the audit volume's size; 0: no bound",
            unit="bytes",
        ),
    )
    instance: str = field(
        default_factory=lambda: os.uname().nodename,
        metadata=doc("this broker's name in audit records and the fleet; default: the hostname"),
    )
    sts_endpoint: str = field(
        default="",
        metadata=doc(
            "STS endpoint URL; empty: real AWS STS with the broker's own credentials",
            metavar="URL",
        ),
    )
    sts_region: str = field(
        default="us-east-1", metadata=doc("region for STS and S3 requests", metavar="REGION")
    )
    sts_regions: tuple[str, ...] = field(
        default=(),
        metadata=doc(
            "STS regions in order of preference, comma-separated: calls go to the first whose "
            "circuit is closed and move back when it recovers; empty: --sts-region alone",
            metavar="REGION[,REGION...]",
        ),
    )
    sts_region_endpoints: tuple[str, ...] = field(
        default=(),
        metadata=doc(
            "STS endpoint per region, comma-separated (tests, FIPS, VPC endpoints); a region "
            "without one uses https://sts.REGION.amazonaws.com",
            metavar="REGION=URL[,REGION=URL...]",
        ),
    )
    s3_endpoint: str = field(
        default="",
        metadata=doc("S3 endpoint URL for audit shipping; empty: real AWS S3", metavar="URL"),
    )
    sts_timeout: float = field(
        default=5.0, metadata=doc("deadline for one STS call", unit="seconds")
    )
    sts_budget_per_second: float = field(
        default=50.0,
        metadata=doc("most STS calls this broker (or fleet) makes", unit="per second"),
    )
    sts_max_attempts: int = field(
        default=4,
        metadata=doc("STS attempts per request, retrying throttling with backoff", unit="count"),
    )
    workers_min: int = field(
        default=2, metadata=doc("floor of the autoscaled STS worker pool", unit="count")
    )
    workers_max: int = field(
        default=64,
        metadata=doc(
            "ceiling of the autoscaled STS worker pool (at least --workers-min)", unit="count"
        ),
    )
    queue_max: int = field(
        default=10_000,
        metadata=doc("requests waiting for a worker before 503 + Retry-After", unit="requests"),
    )
    queue_per_tenant_max: int = field(
        default=2_000,
        metadata=doc("requests one tenant may have waiting before 503", unit="requests"),
    )
    cache_refresh_fraction: float = field(
        default=0.5,
        metadata=doc(
            "refresh cached credentials after this fraction of their lifetime (and always "
            "while 16 minutes are left: sidecars refuse sets under 15)",
            unit="fraction",
            choices="above 0, at most 0.9",
        ),
    )
    max_connections: int = field(
        default=4096, metadata=doc("open client connections at most", unit="connections")
    )
    header_timeout: float = field(
        default=5.0,
        metadata=doc("deadline for a client to send a request's head and body", unit="seconds"),
    )
    max_body_bytes: int = field(
        default=16_384, metadata=doc("largest request body accepted", unit="bytes")
    )
    drain_seconds: float = field(
        default=10.0,
        metadata=doc("on SIGTERM, let in-flight requests finish for at most this", unit="seconds"),
    )
    region: str = field(
        default="us-east-1",
        metadata=doc("region in tasks' metadata view (placement/region)", metavar="REGION"),
    )
    availability_zone: str = field(
        default="us-east-1a",
        metadata=doc("availability zone in tasks' metadata view", metavar="ZONE"),
    )
    log_format: Literal["auto", "json", "text"] = field(default="auto", metadata=_LOG_FORMAT)
    # The fleet (docs/fleet.md): where shared state lives.
    store: str = field(
        default="memory",
        metadata=doc(
            "where fleet-wide state lives: memory keeps it in this process (one broker); "
            "a Valkey/Redis URL shares it between replicas (docs/fleet.md)",
            choices="memory, redis://, rediss://, redis+sentinel://, redis+cluster://",
            metavar="URL",
        ),
    )
    store_key_file: Path | None = field(
        default=None, metadata=doc("AES-GCM keys sealing credentials in the store", reads=True)
    )
    store_timeout: float = field(
        default=0.5,
        metadata=doc("deadline for one store command before falling back", unit="seconds"),
    )
    state_dir: Path | None = field(
        default=None,
        metadata=doc("memory store: where revocations persist across restarts"),
    )
    revocation_max_staleness: float = field(
        default=30.0,
        metadata=doc(
            "refuse issuance (503) when our view of revocations is older than this",
            unit="seconds",
        ),
    )
    revocation_resync_seconds: float = field(
        default=5.0,
        metadata=doc("full re-read of revocations, the push's backstop", unit="seconds"),
    )
    heartbeat_seconds: float = field(
        default=2.0,
        metadata=doc("replica registry beat; a replica is live for 3 beats", unit="seconds"),
    )
    control_listen: str = field(
        default="",
        metadata=doc("where to serve the authenticated control API; empty: none", choices=_LISTEN),
    )
    control_token_file: Path | None = field(
        default=None, metadata=doc("bearer token for the control API", reads=True)
    )
    # AWS attestation (docs/ecs.md): a task proves its role with a signed GetCallerIdentity.
    aws_attest_audience: str = field(
        default="",
        metadata=doc(
            "this broker's name in AWS attestations (the signed X-Metaproxy-Audience header); "
            "empty: AWS attestation is off",
            metavar="NAME",
        ),
    )
    aws_attest_sts_endpoint: str = field(
        default="",
        metadata=doc(
            "the STS endpoint attestations must be signed for and are sent to; empty: "
            "--sts-endpoint, else https://sts.REGION.amazonaws.com of the first STS region",
            metavar="URL",
        ),
    )
    aws_attest_max_age: float = field(
        default=300.0,
        metadata=doc(
            "refuse an AWS attestation signed longer ago than this",
            unit="seconds",
            choices="1 to 900",
        ),
    )
    aws_attest_rules: tuple[str, ...] = field(
        default=(),
        metadata=doc(
            "which attested roles are which tenant's, comma-separated, first match wins: ROLE "
            "is a role name or PREFIX*, APP a name or {role} (the default); the task is the "
            "role's session name (ECS: the task ID)",
            metavar="ACCOUNT:ROLE:TENANT[:APP][,...]",
        ),
    )

    def check(self, given: set[str]) -> None:
        check_tls_pair(self.tls_cert, self.tls_key)
        _validate_broker(self, given)


_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")


def _validate_sts_regions(config: BrokerConfig) -> None:
    regions = config.sts_regions or (config.sts_region,)
    for region in regions:
        if not _REGION.match(region):
            raise ConfigError(f"--sts-regions: {region!r} is not a region name (e.g. us-west-2)")
        if regions.count(region) > 1:
            raise ConfigError(f"--sts-regions: {region} is listed twice")
    for entry in config.sts_region_endpoints:
        region, sep, url = entry.partition("=")
        if not sep or not url.startswith(("https://", "http://")):
            raise ConfigError(f"--sts-region-endpoints: {entry!r} must be REGION=URL")
        if region not in regions:
            raise ConfigError(f"--sts-region-endpoints: {region!r} is not one of the STS regions")
    if len(regions) > 1 and config.sts_endpoint:
        raise ConfigError(
            "--sts-endpoint names one endpoint for several --sts-regions; "
            "give each region its own with --sts-region-endpoints"
        )


_CLUSTER_ARN = re.compile(r"^arn:aws[-a-z]*:eks:[a-z0-9-]+:\d{12}:cluster/[A-Za-z0-9][\w-]*$")


def _validate_broker(config: BrokerConfig, given: set[str]) -> None:
    _validate_sts_regions(config)
    if config.cluster_arn and not _CLUSTER_ARN.match(config.cluster_arn):
        raise ConfigError(
            f"--cluster-arn: {config.cluster_arn!r} is not an EKS cluster ARN "
            "(arn:aws:eks:REGION:ACCOUNT:cluster/NAME)"
        )
    if not 0 < config.cache_refresh_fraction <= 0.9:
        raise ConfigError("--cache-refresh-fraction: must be above 0 and at most 0.9")
    if config.workers_min < 1 or config.workers_max < config.workers_min:
        raise ConfigError("--workers-min/--workers-max: need 1 <= workers-min <= workers-max")
    _validate_attestation(config)
    if config.socket is not None and "listen" in given:
        raise ConfigError("--socket and --listen conflict: the broker serves one or the other")


def _validate_attestation(config: BrokerConfig) -> None:
    audience = config.aws_attest_audience
    if not audience:
        if config.aws_attest_rules:
            raise ConfigError("--aws-attest-rules: needs --aws-attest-audience")
        return
    if len(audience) > 128 or not (audience.isascii() and audience.isprintable()):
        raise ConfigError("--aws-attest-audience: at most 128 printable ASCII characters")
    if not config.aws_attest_rules:
        raise ConfigError(
            "--aws-attest-audience: needs --aws-attest-rules (no role maps to a tenant)"
        )
    for spec in config.aws_attest_rules:
        parse_rule(spec)
    if not 1 <= config.aws_attest_max_age <= 900:
        raise ConfigError("--aws-attest-max-age: must be between 1 and 900 seconds")
    endpoint = config.aws_attest_sts_endpoint
    if endpoint and not endpoint.startswith(("https://", "http://")):
        raise ConfigError(f"--aws-attest-sts-endpoint: {endpoint!r} is not an http(s) URL")
