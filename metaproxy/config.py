"""Configuration: built once, frozen, passed down.

This is the only module that reads environment variables. Every setting has one name used three
ways: the dataclass field `broker_url`, the CLI flag `--broker-url`, and the environment variable
`METAPROXY_BROKER_URL`. Precedence: CLI flag, then environment, then the named default.

Every field documents itself, once, where its class declares it:
`field(default=..., metadata=doc("meaning", unit=...))`.
That one source feeds each flag's `--help` (meaning, unit, default, allowed values, environment
variable) and the generated `docs/configuration.md` (`python -m metaproxy.commands.configdoc`);
a test fails when a field has no `doc(...)` or when the page is out of date. Allowed values
come from the field's type (a `Literal` lists them); pass `choices=` only to describe a
free-form set.

Each process's config class lives beside the process (`metaproxy.sidecar.config`,
`metaproxy.broker.config`, `metaproxy.webhook.config`), so that every pod's sidecar does not
hold two config classes it never uses (a third of a megabyte, issue 13). This module keeps what
they share: how a field is documented (`doc`, `field_docs`), turned into flags, parsed from
flags and the environment (`build_config`), and checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, brackets stripped) is known to be this machine:
    `localhost` or a loopback address. Any other name is not, whatever it resolves to."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    """An identity-token issuer the broker trusts: its JWKS, the audience it must name.

    The keys come from `jwks_file`, or from `jwks_url` over HTTPS (`metaproxy.identity.
    remote_keys`): a JWKS, or an OIDC discovery document naming one (`DISCOVERY_PATH`)."""

    issuer: str
    audience: str
    jwks_file: Path | None
    kind: Literal["platform", "kubernetes", "spiffe"] = "platform"
    jwks_url: str = ""


_LOG_FORMAT = doc("log output: json for production, text for people; auto picks by terminal")
_LISTEN = "HOST:PORT, [IPv6]:PORT or unix:/path"


class ServerConfig(Protocol):
    """What every long-running command's config has (`SidecarConfig`, `BrokerConfig`,
    `WebhookConfig`, each in its process's package)."""

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


DISCOVERY_PATH = "/.well-known/openid-configuration"
TRUST_KINDS = ("platform", "kubernetes", "spiffe")


def parse_trust(spec: str) -> TrustedIssuer:
    """`ISSUER,AUDIENCE,KEYS[,KIND]`; KEYS is a JWKS file, an https:// URL of a JWKS or of an
    OIDC discovery document, or `discover` (the issuer's own discovery document)."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) not in (3, 4) or not all(parts):
        raise ConfigError(f"--trust: {spec!r} must be ISSUER,AUDIENCE,KEYS[,KIND]")
    issuer, audience, keys = parts[:3]
    kind = parts[3] if len(parts) == 4 else "platform"
    if kind not in TRUST_KINDS:
        raise ConfigError(f"--trust: kind {kind!r} must be platform, kubernetes or spiffe")
    if kind == "spiffe" and not re.fullmatch(r"spiffe://[a-z0-9._-]+", issuer):
        # A SPIFFE issuer is a trust domain: its JWT-SVIDs may carry no `iss` at all.
        raise ConfigError(f"--trust: {issuer!r}: a spiffe issuer is spiffe://TRUST_DOMAIN")
    if keys == "discover":
        if not issuer.startswith("https://"):
            raise ConfigError(f"--trust: {issuer!r} is not an https:// issuer to discover")
        keys = issuer.rstrip("/") + DISCOVERY_PATH
    if keys.startswith("http://"):
        # Keys fetched in the clear are keys anyone on the path may replace.
        raise ConfigError(f"--trust: {keys!r}: keys are fetched over https:// only")
    if keys.startswith("https://"):
        return TrustedIssuer(issuer, audience, None, kind, jwks_url=keys)  # type: ignore[arg-type]
    return TrustedIssuer(issuer, audience, Path(keys), kind)  # type: ignore[arg-type]


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


def readable_paths(config: ServerConfig) -> None:
    """Every path the process reads at start exists and can be read (`doc(reads=True)`), and
    every trusted issuer's JWKS file: one line naming the flag and the file, not a traceback."""
    checks: list[tuple[str, Path]] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("reads") and value is not None:
            checks.append((_flag(f.name), value))
    for issuer in getattr(config, "trusted_issuers", ()):
        if issuer.jwks_file is not None:
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


def ecs_credentials_endpoint(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """ECS's credentials endpoint for this container, as the ECS agent tells every SDK:
    (URL, the file of the Authorization token it wants, or ""), or ("", "") when there is
    none. `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` wins over `_FULL_URI`, as in botocore."""
    environ = os.environ if environ is None else environ
    relative = environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "")
    if relative:
        return f"http://{ECS_CREDENTIALS_ADDRESS.removesuffix(':80')}{relative}", ""
    return (
        environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI", ""),
        environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", ""),
    )
