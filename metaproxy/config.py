"""Configuration: built once, frozen, passed down.

This is the only module that reads environment variables. Every setting has one name used three
ways: the dataclass field `broker_url`, the CLI flag `--broker-url`, and the environment variable
`METAPROXY_BROKER_URL`. Precedence: CLI flag, then environment, then the named default.

Every field documents itself, once, here: `field(default=..., metadata=doc("meaning", unit=...))`.
That one source feeds each flag's `--help` (meaning, unit, default, allowed values, environment
variable) and the generated `docs/configuration.md` (`python -m metaproxy.configdoc`); a test
fails when a field has no `doc(...)` or when the page is out of date. Allowed values come from the
field's type (a `Literal` lists them); pass `choices=` only to describe a free-form set.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import types
import typing
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from metaproxy.clihelp import Unit, for_argparse, help_text, show_value
from metaproxy.errors import ConfigError, StartError

ENV_PREFIX = "METAPROXY_"

# Where the EC2 metadata service and the ECS/EKS container-credentials endpoint live; SDKs use
# these addresses when nothing is configured.
IMDS_ADDRESS = "169.254.169.254:80"
CONTAINER_CREDENTIALS_ADDRESS = "169.254.170.23:80"


def doc(
    help: str,
    *,
    unit: Unit | None = None,
    choices: str = "",
    metavar: str = "",
    reads: bool = False,
) -> dict[str, str]:
    """A field's documentation: its meaning, its unit, and (for free-form text with a fixed
    grammar) a description of the values it accepts. Goes in `field(metadata=...)`.

    `reads=True` marks a path the process reads at start: `readable_paths` checks it first, so
    a missing or unreadable file is one line naming the flag instead of a traceback."""
    meta = {"help": help, "unit": unit or "", "choices": choices, "metavar": metavar}
    if reads:
        meta["reads"] = "yes"
    return meta


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """An identity-token issuer the broker trusts: its JWKS, the audience it must name."""

    issuer: str
    audience: str
    jwks_file: Path
    kind: Literal["platform", "kubernetes"] = "platform"


_LOG_FORMAT = doc("log output: json for production, text for people; auto picks by terminal")
_LISTEN = "HOST:PORT, [IPv6]:PORT or unix:/path"


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    broker_url: str = field(
        default="https://127.0.0.1:8443",
        metadata=doc(
            "the broker's URL; https, or http only to a loopback address",
            metavar="URL",
        ),
    )
    broker_ca_file: Path | None = field(
        default=None,
        metadata=doc("PEM CA bundle that verifies the broker's certificate; unset: system CAs"),
    )
    broker_socket: Path | None = field(
        default=None,
        metadata=doc("reach the broker over this Unix socket on the host instead of TCP+TLS"),
    )
    identity_token_file: Path = field(
        default=Path("/var/run/metaproxy/identity.jwt"),
        metadata=doc("the task's identity token (JWT); re-read when the platform rotates it"),
    )
    role: str = field(
        default="",
        metadata=doc("the role to ask the broker for; empty: the policy's default role"),
    )
    imds_listen: tuple[str, ...] = field(
        default=(IMDS_ADDRESS,),
        metadata=doc(
            "where to serve the EC2 metadata API (IMDS); comma-separated; "
            "port 80 needs CAP_NET_BIND_SERVICE",
            choices=_LISTEN,
        ),
    )
    container_listen: tuple[str, ...] = field(
        default=(CONTAINER_CREDENTIALS_ADDRESS,),
        metadata=doc(
            "where to serve the container-credentials API; comma-separated; empty: not served",
            choices=_LISTEN,
        ),
    )
    admin_listen: str = field(
        default="127.0.0.1:9901",
        metadata=doc("where to serve /healthz, /readyz and /metrics", choices=_LISTEN),
    )
    authorization_token_file: Path | None = field(
        default=None,
        metadata=doc(
            "write the container-credentials authorization token here, mode 0600 "
            "(for AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE); unset: the endpoint asks for none"
        ),
    )
    authorization_token_mode: str = field(
        default="0600",
        metadata=doc(
            "file mode of --authorization-token-file; 0640 lets an app in the file's group read "
            "it (Kubernetes fsGroup)",
            choices="octal, at most 0644",
            metavar="MODE",
        ),
    )
    imds_v1: Literal["allow", "refuse"] = field(
        default="refuse",
        metadata=doc("answer IMDSv1 (token-less) requests, or only IMDSv2"),
    )
    allowed_hosts: tuple[str, ...] = field(
        default=(),
        metadata=doc(
            "host names IMDS and container-credentials requests may carry in Host, besides IP "
            "literals and localhost; comma-separated; others are refused (DNS rebinding)"
        ),
    )
    host_metadata_allow: tuple[str, ...] = field(
        default=(),
        metadata=doc(
            "IMDS paths passed through to the host's own metadata service, comma-separated "
            "(e.g. meta-data/ami-launch-index); empty: the host's IMDS is never contacted"
        ),
    )
    host_metadata_url: str = field(
        default="http://169.254.169.254",
        metadata=doc("the host's own metadata service, for --host-metadata-allow", metavar="URL"),
    )
    refresh_fraction: float = field(
        default=0.5,
        metadata=doc(
            "refresh credentials after this fraction of their lifetime (with jitter)",
            unit="fraction",
            choices="0.1 to 0.9",
        ),
    )
    min_serve_seconds: float = field(
        default=900.0,
        metadata=doc(
            "never hand out credentials with less than this left (SDKs refresh at 15 minutes)",
            unit="seconds",
        ),
    )
    revocation_check_seconds: float = field(
        default=60.0,
        metadata=doc(
            "ask the broker at least this often, so a revoked task stops being served within it",
            unit="seconds",
        ),
    )
    broker_timeout: float = field(
        default=5.0, metadata=doc("deadline for one request to the broker", unit="seconds")
    )
    header_timeout: float = field(
        default=5.0,
        metadata=doc("deadline for a client to send a request's head", unit="seconds"),
    )
    keepalive_timeout: float = field(
        default=15.0,
        metadata=doc("close an idle kept-alive client connection after this", unit="seconds"),
    )
    max_header_bytes: int = field(
        default=8190, metadata=doc("largest request line or header accepted", unit="bytes")
    )
    max_headers: int = field(
        default=64, metadata=doc("most headers accepted in one request", unit="count")
    )
    max_body_bytes: int = field(
        default=1024, metadata=doc("largest request body accepted", unit="bytes")
    )
    drain_seconds: float = field(
        default=10.0,
        metadata=doc("on SIGTERM, let in-flight requests finish for at most this", unit="seconds"),
    )
    log_format: Literal["auto", "json", "text"] = field(default="auto", metadata=_LOG_FORMAT)


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
            "refresh cached credentials after this fraction of their lifetime",
            unit="fraction",
            choices="0 to 1",
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


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    listen: str = field(
        default="127.0.0.1:9443",
        metadata=doc("where to serve POST /mutate and GET /healthz", choices=_LISTEN),
    )
    tls_cert: Path | None = field(
        default=None,
        metadata=doc("PEM certificate chain (with --tls-key); reloaded on SIGHUP", reads=True),
    )
    tls_key: Path | None = field(
        default=None, metadata=doc("PEM private key (with --tls-cert)", reads=True)
    )
    image: str = field(
        default="", metadata=doc("the sidecar's container image (required)", metavar="IMAGE")
    )
    broker_url: str = field(
        default="",
        metadata=doc("https URL sidecars reach the broker at (required)", metavar="URL"),
    )
    broker_ca_configmap: str = field(
        default="metaproxy-broker-ca",
        metadata=doc(
            "ConfigMap (in each pod's namespace) with the broker CA as ca.pem", metavar="NAME"
        ),
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = field(
        default="IfNotPresent", metadata=doc("the injected sidecar's imagePullPolicy")
    )
    drain_seconds: float = field(
        default=5.0,
        metadata=doc(
            "on SIGTERM, let in-flight reviews finish for at most this "
            "(the API server retries elsewhere)",
            unit="seconds",
        ),
    )
    log_format: Literal["auto", "json", "text"] = field(default="auto", metadata=_LOG_FORMAT)


C = TypeVar("C", SidecarConfig, BrokerConfig, WebhookConfig)
CONFIG_CLASSES: dict[str, type[Any]] = {
    "sidecar": SidecarConfig,
    "broker": BrokerConfig,
    "webhook": WebhookConfig,
}


def _field_type(cls: type[Any], name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _convert(raw: str, annotation: Any, name: str) -> Any:  # noqa: PLR0911 - one return per type
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if raw == "":
            return None
        return _convert(raw, inner[0], name)
    if origin is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if origin is Literal:
        if raw not in args:
            raise ConfigError(f"{_flag(name)}: {raw!r} is not one of {', '.join(map(str, args))}")
        return raw
    try:
        if annotation is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if annotation in (int, float, str):
            return annotation(raw)
        if annotation is Path:
            return Path(raw)
    except ValueError as exc:
        kind = {int: "whole number", float: "number"}.get(annotation, annotation.__name__)
        raise ConfigError(f"{_flag(name)}: {raw!r} is not a {kind}") from exc
    raise ConfigError(f"{_flag(name)}: cannot be set from text")


def _flag(name: str) -> str:
    return "--trust" if name == "trusted_issuers" else "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + ("TRUST" if name == "trusted_issuers" else name.upper())


@dataclass(frozen=True, slots=True)
class FieldDoc:
    """What `--help` and docs/configuration.md say about one field."""

    name: str
    flag: str
    env: str
    metavar: str
    help: str
    unit: str
    default: str
    allowed: str


def _metavar(annotation: Any, meta: Mapping[str, str]) -> str:
    if meta.get("metavar"):
        return meta["metavar"]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _metavar(next(a for a in args if a is not type(None)), meta)
    if origin is tuple:
        return "ADDR[,ADDR...]" if meta.get("choices") else "VALUE[,VALUE...]"
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if meta.get("choices") and annotation is str:
        return "ADDR"
    unit = meta.get("unit", "")
    return {
        Path: "PATH",
        int: "N",
        float: "SECONDS" if unit == "seconds" else "NUMBER",
        bool: "BOOL",
    }.get(annotation, "TEXT")


def _show_default(f: dataclasses.Field[Any]) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return "" if f.name != "instance" else "the host name"
    return show_value(f.default)


def field_docs(cls: type[Any]) -> list[FieldDoc]:
    """Every field's documentation, in declaration order; missing `doc(...)` is an error."""
    docs = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("help"):
            raise TypeError(f"{cls.__name__}.{f.name} has no doc(...) in its field metadata")
        annotation = _field_type(cls, f.name)
        allowed = meta.get("choices", "")
        literal = annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            literal = next(a for a in typing.get_args(annotation) if a is not type(None))
        if typing.get_origin(literal) is Literal:
            allowed = ", ".join(map(str, typing.get_args(literal)))
        docs.append(
            FieldDoc(
                name=f.name,
                flag=_flag(f.name),
                env=env_name(f.name),
                metavar=_metavar(annotation, meta),
                help=meta["help"],
                unit=meta.get("unit", ""),
                default=_show_default(f),
                allowed=allowed,
            )
        )
    return docs


def _help_line(d: FieldDoc) -> str:
    return for_argparse(
        help_text(d.help, unit=d.unit, allowed=d.allowed, default=d.default, env=d.env)
    )


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """One `--flag` per field, each defaulting to 'unset' so env and defaults can apply."""
    for d in field_docs(cls):
        if d.name == "trusted_issuers":
            parser.add_argument("--trust", action="append", metavar=d.metavar, help=_help_line(d))
            continue
        parser.add_argument(
            d.flag, dest=d.name, default=None, metavar=d.metavar, help=_help_line(d)
        )


def parse_trust(spec: str) -> TrustedIssuer:
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) not in (3, 4) or not all(parts):
        raise ConfigError(f"--trust: {spec!r} must be ISSUER,AUDIENCE,JWKS_FILE[,KIND]")
    kind = parts[3] if len(parts) == 4 else "platform"
    if kind not in ("platform", "kubernetes"):
        raise ConfigError(f"--trust: kind {kind!r} must be platform or kubernetes")
    return TrustedIssuer(parts[0], parts[1], Path(parts[2]), kind)  # type: ignore[arg-type]


def trusted_issuers(
    specs: Sequence[str] | None, environ: Mapping[str, str] | None = None
) -> tuple[TrustedIssuer, ...]:
    """`--trust` values, else METAPROXY_TRUST (`;`-separated): what the broker trusts, for
    commands that check against it (`policy check`)."""
    environ = os.environ if environ is None else environ
    if not specs:
        specs = [s for s in environ.get(ENV_PREFIX + "TRUST", "").split(";") if s.strip()]
    return tuple(parse_trust(spec) for spec in specs)


def build_config(
    cls: type[C],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Flags over environment over defaults; every value validated once, here."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    given: set[str] = set()
    for f in dataclasses.fields(cls):
        if f.name == "trusted_issuers":
            specs: list[str] = list(getattr(args, "trust", None) or [])
            if not specs and environ.get(ENV_PREFIX + "TRUST"):
                specs = [s for s in environ[ENV_PREFIX + "TRUST"].split(";") if s.strip()]
            if specs:
                values[f.name] = tuple(parse_trust(s) for s in specs)
            continue
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is None:
            continue
        given.add(f.name)
        values[f.name] = _convert(str(raw), _field_type(cls, f.name), f.name)
    config = cls(**values)
    _validate(config, given)
    return config


def _validate(config: SidecarConfig | BrokerConfig | WebhookConfig, given: set[str]) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{_flag(f.name)}: must not be negative")
        if f.metadata.get("choices") == _LISTEN and value:
            for address in value if isinstance(value, tuple) else (value,):
                split_host_port(address, _flag(f.name))
    if isinstance(config, BrokerConfig | WebhookConfig):
        check_tls_pair(config.tls_cert, config.tls_key)
    if isinstance(config, SidecarConfig):
        if not 0.1 <= config.refresh_fraction <= 0.9:
            raise ConfigError("--refresh-fraction: must be between 0.1 and 0.9")
        _validate_sidecar(config)
    elif isinstance(config, BrokerConfig):
        _validate_broker(config, given)
    elif not config.image.strip():
        raise ConfigError("--image: must name the sidecar's container image")
    elif not config.broker_url.startswith("https://"):
        raise ConfigError("--broker-url: must be an https:// URL (sidecars verify the CA)")


def check_tls_pair(cert: Path | None, key: Path | None) -> None:
    """Half a pair is refused: serving plain HTTP without a word would put bearer tokens in
    the clear. Checked here and again by `runtime.server_tls_context`, for servers started
    from a config built in code."""
    if (cert is None) != (key is None):
        missing = "--tls-key" if key is None else "--tls-cert"
        raise ConfigError(f"--tls-cert and --tls-key go together: {missing} is missing")


def _validate_sidecar(config: SidecarConfig) -> None:
    if config.broker_socket is None:
        # Identity tokens and credentials cross this link: in the clear only on this host.
        url = urllib.parse.urlsplit(config.broker_url)
        if not url.hostname or not (
            url.scheme == "https" or (url.scheme == "http" and _is_loopback(url.hostname))
        ):
            raise ConfigError(
                f"--broker-url: {config.broker_url!r} must be https://, or http:// to a loopback "
                "address (or use --broker-socket)"
            )
    mode = config.authorization_token_mode
    if not (len(mode) in (3, 4) and set(mode) <= set("01234567") and int(mode, 8) & ~0o644 == 0):
        raise ConfigError(
            f"--authorization-token-mode: {mode!r} must be an octal mode within 0644 "
            "(no execute bits, nobody but the owner writes)"
        )


def authorization_token_mode(config: SidecarConfig) -> int:
    return int(config.authorization_token_mode, 8)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    if config.workers_min < 1 or config.workers_max < config.workers_min:
        raise ConfigError("--workers-min/--workers-max: need 1 <= workers-min <= workers-max")
    if config.socket is not None and "listen" in given:
        raise ConfigError("--socket and --listen conflict: the broker serves one or the other")


def readable_paths(config: SidecarConfig | BrokerConfig | WebhookConfig) -> None:
    """Every path the process reads at start exists and can be read (`doc(reads=True)`), and
    every trusted issuer's JWKS file: one line naming the flag and the file, not a traceback."""
    checks: list[tuple[str, Path]] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("reads") and value is not None:
            checks.append((_flag(f.name), value))
    for issuer in getattr(config, "trusted_issuers", ()):
        checks.append(("--trust", issuer.jwks_file))
    for flag, path in checks:
        check_readable(flag, path)


def check_readable(flag: str, path: Path) -> None:
    """`path` (a folder if `flag` ends in `-dir`) can be read; otherwise a run-time failure in
    one line naming the flag and the file: `--key: /missing: No such file or directory`."""
    try:
        if flag.endswith("-dir"):
            os.listdir(path)
        else:
            with path.open("rb"):
                pass
    except OSError as exc:
        raise StartError(f"{flag}: {path}: {exc.strerror or exc}") from None


def split_host_port(address: str, flag: str = "listen address") -> tuple[str, int]:
    """`127.0.0.1:80`, `[::1]:80` or `unix:/path` (port 0) — validated."""
    if address.startswith("unix:"):
        return address, 0
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag}: {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)
