"""Configuration: built once, frozen, passed down.

This is the only module that reads environment variables. Every setting has one name used three
ways: the dataclass field `broker_url`, the CLI flag `--broker-url`, and the environment variable
`METAPROXY_BROKER_URL`. Precedence: CLI flag, then environment, then the named default.

Every field documents itself, once, here: `field(default=..., metadata=doc("meaning", unit=...))`.
That one source feeds each flag's `--help` (meaning, unit, default, allowed values, environment
variable) and the generated `docs/configuration.md` (`python -m metaproxy.commands.configdoc`);
a test fails when a field has no `doc(...)` or when the page is out of date. Allowed values
come from the field's type (a `Literal` lists them); pass `choices=` only to describe a
free-form set.

The sidecar's config is here; the broker's and the webhook's are in `metaproxy.broker.config`
and `metaproxy.webhook.config`, built by the same `build_config`, so that every pod's sidecar
does not hold two config classes it never uses (a third of a megabyte, issue 13).
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
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from metaproxy.clihelp import Unit, for_argparse, help_text, show_value
from metaproxy.errors import ConfigError, StartError

ENV_PREFIX = "METAPROXY_"

# Where the EC2 metadata service and the container-credentials endpoints live. SDKs use the IMDS
# address when nothing is configured, ECS's address with AWS_CONTAINER_CREDENTIALS_RELATIVE_URI
# (every SDK since 2016), and EKS Pod Identity's in AWS_CONTAINER_CREDENTIALS_FULL_URI; many
# tools (s3cmd, cloud-init, ec2-metadata, Fluent Bit) hard-code the IMDS address.
IMDS_ADDRESS = "169.254.169.254:80"
ECS_CREDENTIALS_ADDRESS = "169.254.170.2:80"
CONTAINER_CREDENTIALS_ADDRESS = "169.254.170.23:80"
IMDS_ADDRESS_V6 = "[fd00:ec2::254]:80"
CONTAINER_CREDENTIALS_ADDRESS_V6 = "[fd00:ec2::23]:80"


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
        default=(ECS_CREDENTIALS_ADDRESS, CONTAINER_CREDENTIALS_ADDRESS),
        metadata=doc(
            "where to serve the container-credentials API (ECS's and EKS Pod Identity's "
            "addresses by default); comma-separated; empty: not served",
            choices=_LISTEN,
        ),
    )
    container_credentials_path: str = field(
        default="",
        metadata=doc(
            "also serve credentials at this secret path, with no Authorization header: the "
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI every SDK since 2016 follows (and a "
            "FULL_URI with the same path); empty: only /v1/credentials with the token",
            choices="/v2/credentials/ then 22 to 128 random letters, digits, '-' or '_'",
            metavar="PATH",
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
    link_local_check: bool = field(
        default=False,
        metadata=doc(
            "not ready until 169.254.169.254:80 in this network namespace reaches this sidecar "
            "(the CNI plugin's or init container's redirect): a pod must never start with the "
            "node's IMDS in its sidecar's place"
        ),
    )
    imds_token_key_file: Path | None = field(
        default=None,
        metadata=doc(
            "keep the key that signs IMDSv2 tokens here (mode 0600, made when absent), on the "
            "pod's in-memory volume, so tokens stay valid across a sidecar restart; unset: the "
            "key lives in the process"
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
    host_metadata_interface: str = field(
        default="auto",
        metadata=doc(
            "reach the host's metadata service through this interface (SO_BINDTODEVICE), past "
            "the pod's own 169.254.169.254; auto: the default route's interface when that "
            "address is this namespace's own; none: never bind",
            choices="auto, none or an interface name",
            metavar="NAME",
        ),
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
        metadata=doc(
            "after SIGTERM, keep serving while the task's clients still ask, and let in-flight "
            "requests finish, for at most this",
            unit="seconds",
        ),
    )
    lifecycle_token: str = field(
        default="",
        metadata=doc(
            "secret that GET /lifecycle/terminate on the admin port must carry in "
            "X-Metaproxy-Lifecycle-Token (the webhook's preStop hook on the app containers): "
            "it starts the task's termination notice before the apps get SIGTERM; empty: that "
            "path is 404",
            metavar="TOKEN",
        ),
    )
    termination_notice_seconds: float = field(
        default=0.0,
        metadata=doc(
            "how long GET /lifecycle/terminate holds the app's preStop hook, so spot-aware "
            "apps see spot/instance-action before their SIGTERM (within the pod's grace period)",
            unit="seconds",
            choices="0 to 120",
        ),
    )
    log_format: Literal["auto", "json", "text"] = field(default="auto", metadata=_LOG_FORMAT)

    def check(self, given: set[str]) -> None:
        if not 0.0 <= self.termination_notice_seconds <= 120.0:
            raise ConfigError("--termination-notice-seconds: must be between 0 and 120")
        if not 0.1 <= self.refresh_fraction <= 0.9:
            raise ConfigError("--refresh-fraction: must be between 0.1 and 0.9")
        _validate_sidecar(self)


class ServerConfig(Protocol):
    """What every long-running command's config has (`SidecarConfig`, and the broker's and the
    webhook's in their own packages: a sidecar does not hold their classes in memory)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # a dataclass

    @property
    def log_format(self) -> Literal["auto", "json", "text"]: ...

    def check(self, given: set[str]) -> None:
        """Refuse a combination of values no single field can judge (`given`: set by the user)."""


C = TypeVar("C", bound=ServerConfig)


def _field_type(cls: type[Any], name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _convert(raw: str, annotation: Any, name: str) -> Any:  # noqa: PLR0911 - one return per type
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if raw == "" and inner[0] is Path:
            # An empty path is a template left unfilled, not a choice: taken as unset it would
            # quietly mean the weaker default (the system's CAs for --broker-ca-file).
            raise ConfigError(f"{_flag(name)}: empty; name a file, or leave it unset")
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


def _validate(config: ServerConfig, given: set[str]) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{_flag(f.name)}: must not be negative")
        if f.metadata.get("choices") == _LISTEN and value:
            for address in value if isinstance(value, tuple) else (value,):
                split_host_port(address, _flag(f.name))
    config.check(given)


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
    path = config.container_credentials_path
    if path and not _SECRET_PATH.fullmatch(path):
        raise ConfigError(
            "--container-credentials-path: must be /v2/credentials/ then 22 to 128 random "
            "letters, digits, hyphens or underscores (it is the task's secret)"
        )
    interface = config.host_metadata_interface
    if not _INTERFACE.fullmatch(interface):
        raise ConfigError(
            f"--host-metadata-interface: {interface!r} is not auto, none or an interface name"
        )
    mode = config.authorization_token_mode
    if not (len(mode) in (3, 4) and set(mode) <= set("01234567") and int(mode, 8) & ~0o644 == 0):
        raise ConfigError(
            f"--authorization-token-mode: {mode!r} must be an octal mode within 0644 "
            "(no execute bits, nobody but the owner writes)"
        )


# ECS's own shape is /v2/credentials/<uuid>; 22 characters of base64url are 132 bits.
_SECRET_PATH = re.compile(r"/v2/credentials/[A-Za-z0-9_-]{22,128}")
_INTERFACE = re.compile(r"[A-Za-z0-9_.:-]{1,15}")  # IFNAMSIZ - 1


def authorization_token_mode(config: SidecarConfig) -> int:
    return int(config.authorization_token_mode, 8)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def readable_paths(config: ServerConfig) -> None:
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
