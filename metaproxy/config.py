"""Configuration: built once, frozen, passed down.

This is the only module that reads environment variables. Every setting has one name used three
ways: the dataclass field `broker_url`, the CLI flag `--broker-url`, and the environment variable
`METAPROXY_BROKER_URL`. Precedence: CLI flag, then environment, then the named default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from metaproxy.errors import ConfigError

ENV_PREFIX = "METAPROXY_"

# Where the EC2 metadata service and the ECS/EKS container-credentials endpoint live; SDKs use
# these addresses when nothing is configured.
IMDS_ADDRESS = "169.254.169.254:80"
CONTAINER_CREDENTIALS_ADDRESS = "169.254.170.23:80"


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """An identity-token issuer the broker trusts: its JWKS, the audience it must name."""

    issuer: str
    audience: str
    jwks_file: Path
    kind: Literal["platform", "kubernetes"] = "platform"


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    broker_url: str = "https://127.0.0.1:8443"
    broker_ca_file: Path | None = None
    broker_socket: Path | None = None  # a Unix socket on the host instead of TCP+TLS
    identity_token_file: Path = Path("/var/run/metaproxy/identity.jwt")
    role: str = ""  # the role to ask for; empty means the policy's default
    imds_listen: tuple[str, ...] = (IMDS_ADDRESS,)
    container_listen: tuple[str, ...] = (CONTAINER_CREDENTIALS_ADDRESS,)
    admin_listen: str = "127.0.0.1:9901"
    authorization_token_file: Path | None = None
    imds_v1: Literal["allow", "refuse"] = "refuse"
    host_metadata_allow: tuple[str, ...] = ()  # IMDS paths passed through to the host
    host_metadata_url: str = "http://169.254.169.254"
    refresh_fraction: float = 0.5  # refresh at about half of the credentials' lifetime
    min_serve_seconds: float = 900.0  # never hand out credentials with less than 15 min left
    # Ask the broker at least this often, so a revoked task stops being served within it.
    revocation_check_seconds: float = 60.0
    broker_timeout: float = 5.0
    header_timeout: float = 5.0
    keepalive_timeout: float = 15.0
    max_header_bytes: int = 8190
    max_headers: int = 64
    max_body_bytes: int = 1024
    drain_seconds: float = 10.0
    log_format: Literal["auto", "json", "text"] = "auto"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    listen: str = "127.0.0.1:8443"
    socket: Path | None = None
    admin_listen: str = "127.0.0.1:9902"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    policies_dir: Path = Path("policies")
    policy_reload_seconds: float = 2.0
    trusted_issuers: tuple[TrustedIssuer, ...] = ()
    token_leeway_seconds: int = 30
    document_key: Path | None = None  # signs instance-identity documents
    audit_dir: Path = Path("audit")
    audit_key: Path | None = None  # signs audit checkpoints
    audit_s3_url: str = ""  # s3://bucket/prefix for shipping closed segments
    audit_write_timeout: float = 0.5
    instance: str = field(default_factory=lambda: os.uname().nodename)
    sts_endpoint: str = ""  # empty: real AWS STS with the broker's own credentials
    sts_region: str = "us-east-1"
    s3_endpoint: str = ""
    sts_timeout: float = 5.0
    sts_budget_per_second: float = 50.0
    sts_max_attempts: int = 4
    workers_min: int = 2
    workers_max: int = 64
    queue_max: int = 10_000
    queue_per_tenant_max: int = 2_000
    cache_refresh_fraction: float = 0.5
    max_connections: int = 4096
    header_timeout: float = 5.0
    max_body_bytes: int = 16_384
    drain_seconds: float = 10.0
    region: str = "us-east-1"
    availability_zone: str = "us-east-1a"
    log_format: Literal["auto", "json", "text"] = "auto"
    # The fleet (docs/fleet.md): where shared state lives. "memory" keeps it in this process
    # (one broker); redis://, rediss://, redis+sentinel://, redis+cluster:// share it.
    store: str = "memory"
    store_key_file: Path | None = None  # AES-GCM keys sealing credentials in the store
    store_timeout: float = 0.5  # seconds one store command may take before we fall back
    state_dir: Path | None = None  # memory store: where revocations persist across restarts
    revocation_max_staleness: float = 30.0  # refuse issuance when our view is older (seconds)
    revocation_resync_seconds: float = 5.0  # full re-read of revocations, the push's backstop
    heartbeat_seconds: float = 2.0  # replica registry beat; a replica is live for 3 beats
    control_listen: str = ""  # the authenticated control API; empty: none
    control_token_file: Path | None = None  # bearer token for the control API


C = TypeVar("C", SidecarConfig, BrokerConfig)


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
            raise ConfigError(f"{name}: {raw!r} is not one of {', '.join(map(str, args))}")
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
        raise ConfigError(f"{name}: {raw!r} is not a valid {annotation.__name__}") from exc
    raise ConfigError(f"{name}: cannot be set from text")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[C]) -> None:
    """One `--flag` per field, each defaulting to 'unset' so env and defaults can apply."""
    for f in dataclasses.fields(cls):
        if f.name == "trusted_issuers":
            parser.add_argument(
                "--trust",
                action="append",
                metavar="ISSUER,AUDIENCE,JWKS_FILE[,KIND]",
                help="trust identity tokens from this issuer (repeatable); "
                f"env {ENV_PREFIX}TRUST, ';'-separated",
            )
            continue
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag, dest=f.name, default=None, help=f"env {ENV_PREFIX}{f.name.upper()}"
        )


def parse_trust(spec: str) -> TrustedIssuer:
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) not in (3, 4) or not all(parts):
        raise ConfigError(f"trust: {spec!r} must be ISSUER,AUDIENCE,JWKS_FILE[,KIND]")
    kind = parts[3] if len(parts) == 4 else "platform"
    if kind not in ("platform", "kubernetes"):
        raise ConfigError(f"trust: kind {kind!r} must be platform or kubernetes")
    return TrustedIssuer(parts[0], parts[1], Path(parts[2]), kind)  # type: ignore[arg-type]


def build_config(
    cls: type[C],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Flags over environment over defaults; every value validated once, here."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
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
        values[f.name] = _convert(str(raw), _field_type(cls, f.name), f.name)
    config = cls(**values)
    _validate(config)
    return config


def _validate(config: SidecarConfig | BrokerConfig) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{f.name}: must not be negative")
    if isinstance(config, SidecarConfig):
        if not 0.1 <= config.refresh_fraction <= 0.9:
            raise ConfigError("refresh_fraction: must be between 0.1 and 0.9")
    elif config.workers_min < 1 or config.workers_max < config.workers_min:
        raise ConfigError("workers_min/workers_max: need 1 <= workers_min <= workers_max")


def split_host_port(address: str) -> tuple[str, int]:
    """`127.0.0.1:80`, `[::1]:80` or `unix:/path` (port 0) — validated."""
    if address.startswith("unix:"):
        return address, 0
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)
