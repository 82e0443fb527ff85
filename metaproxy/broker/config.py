"""The broker's configuration (`metaproxy broker`): its fields, documented, and the checks no
single field can make. Built like every config by `metaproxy.config.build_config`; kept out of
`metaproxy.config` so that a sidecar, one per task, does not hold this class in memory.

Over 400 lines because every broker setting is one field of one frozen dataclass: each flag, its
environment variable, `--help` and docs/configuration.md are generated from that one place.
The checks of values with a grammar of their own are in `config_values`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from metaproxy.broker.config_values import (
    check_attestation,
    check_cluster_arn,
    check_sts_regions,
    socket_permissions,
)
from metaproxy.config import (
    _LISTEN,
    _LOG_FORMAT,
    TrustedIssuer,
    check_tls_pair,
    doc,
    is_loopback,
    split_host_port,
)
from metaproxy.errors import ConfigError
from metaproxy.identity.spiffe import DEFAULT_PATHS, parse_rules


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    listen: str = field(
        default="127.0.0.1:8443",
        metadata=doc(
            "where to serve sidecars (POST /v1/credentials); off loopback it needs --tls-cert "
            "and --tls-key, or --behind-tls-terminator",
            choices=_LISTEN,
        ),
    )
    socket: Path | None = field(
        default=None,
        metadata=doc("serve sidecars on this Unix socket instead of --listen (not both)"),
    )
    socket_mode: str = field(
        default="0660",
        metadata=doc(
            "permission bits of --socket, octal; a sidecar must be able to write the socket to "
            "connect, whatever the broker's umask",
            choices="0000-0777",
            metavar="MODE",
        ),
    )
    socket_group: str = field(
        default="",
        metadata=doc(
            "group given --socket, so sidecars of another user can reach it (the image's "
            "sidecar runs as uid and gid 10001); empty: the broker's own group",
            choices="a group name or a numeric gid",
            metavar="GROUP",
        ),
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
    behind_tls_terminator: bool = field(
        default=False,
        metadata=doc(
            "serve --listen in plain HTTP off loopback, because a TLS proxy in front of the "
            "broker (a service mesh, a load balancer) terminates TLS for it; without this or "
            "--tls-cert the broker refuses a non-loopback --listen: identity tokens and "
            "credentials would cross the network in the clear"
        ),
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
            "takes ';'-separated entries); KEYS is a JWKS file, an https:// URL of a JWKS or "
            "of an OIDC discovery document, or `discover` (the issuer's own "
            "/.well-known/openid-configuration); KIND is platform (default), kubernetes or "
            "spiffe (ISSUER is then spiffe://TRUST_DOMAIN, KEYS its bundle endpoint)",
            metavar="ISSUER,AUDIENCE,KEYS[,KIND]",
        ),
    )
    spiffe_paths: tuple[str, ...] = field(
        default=DEFAULT_PATHS,
        metadata=doc(
            "how a JWT-SVID's SPIFFE ID path names its app and task, for spiffe issuers: "
            "templates of literal segments, {app}, {task} and {*} (any one segment), tried in "
            "order; without {task} the task is the app",
            metavar="TEMPLATE[,TEMPLATE...]",
        ),
    )
    jwks_ca_file: Path | None = field(
        default=None,
        metadata=doc(
            "CA bundle that verifies the issuers' HTTPS servers, for keys given by URL; "
            "unset: the system's CAs",
            reads=True,
        ),
    )
    jwks_refresh_seconds: float = field(
        default=300.0,
        metadata=doc(
            "how often keys given by URL are fetched again (publish a key this long before "
            "signing with it)",
            unit="seconds",
        ),
    )
    jwks_unknown_kid_interval: float = field(
        default=10.0,
        metadata=doc(
            "a token naming an unknown key fetches its issuer's keys at once, at most once "
            "per this interval however many arrive",
            unit="seconds",
        ),
    )
    jwks_fetch_timeout: float = field(
        default=5.0, metadata=doc("deadline for one fetch of an issuer's keys", unit="seconds")
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
    sts_circuit_cool_down: float = field(
        default=5.0,
        metadata=doc(
            "how long a region's circuit stays open after 5 failed calls in a row before one "
            "probe call is let through (its success closes the circuit)",
            unit="seconds",
            choices="0.1 to 300",
        ),
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
        default=None,
        metadata=doc(
            "bearer token for the control API, shared by every operator (audited as operator "
            "'shared'); re-read when the file changes",
            reads=True,
        ),
    )
    control_tokens: Path | None = field(
        default=None,
        metadata=doc(
            "one control API token per operator, audited by name: a file of NAME:TOKEN lines, "
            "or a directory of files named after their operators (a mounted Secret); re-read "
            "when it changes, so a token removed stops working without a restart",
            metavar="PATH",
        ),
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


def _validate_broker(config: BrokerConfig, given: set[str]) -> None:
    check_sts_regions(
        config.sts_regions or (config.sts_region,),
        config.sts_region_endpoints,
        config.sts_endpoint,
    )
    parse_rules(config.spiffe_paths)
    if config.jwks_refresh_seconds <= 0 or config.jwks_unknown_kid_interval <= 0:
        raise ConfigError("--jwks-refresh-seconds, --jwks-unknown-kid-interval: must be above 0")
    if config.jwks_fetch_timeout <= 0:
        raise ConfigError("--jwks-fetch-timeout: must be above 0")
    check_cluster_arn(config.cluster_arn)
    if not 0 < config.cache_refresh_fraction <= 0.9:
        raise ConfigError("--cache-refresh-fraction: must be above 0 and at most 0.9")
    if not 0.1 <= config.sts_circuit_cool_down <= 300:
        raise ConfigError("--sts-circuit-cool-down: must be between 0.1 and 300 seconds")
    if config.workers_min < 1 or config.workers_max < config.workers_min:
        raise ConfigError("--workers-min/--workers-max: need 1 <= workers-min <= workers-max")
    check_attestation(
        config.aws_attest_audience,
        config.aws_attest_rules,
        config.aws_attest_max_age,
        config.aws_attest_sts_endpoint,
    )
    if config.socket is not None and "listen" in given:
        raise ConfigError("--socket and --listen conflict: the broker serves one or the other")
    if config.socket is None and config.tls_cert is None and not config.behind_tls_terminator:
        host = split_host_port(config.listen, "--listen")[0]
        if not is_loopback(host):
            raise ConfigError(
                f"--listen: {config.listen} is off loopback and has no TLS: give --tls-cert and "
                "--tls-key, or --behind-tls-terminator if a proxy in front terminates TLS"
            )
    socket_permissions(config.socket_mode, config.socket_group)
