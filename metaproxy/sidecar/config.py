"""The sidecar's configuration (`metaproxy sidecar`): one frozen dataclass, built by
`metaproxy.config.build_config` from flags, the environment and the defaults named here.

Beside the sidecar, not in `metaproxy.config`, as the broker's and the webhook's are beside
theirs: each process holds only its own config class, and `metaproxy.config` keeps what they
share (how a field is documented, parsed and checked).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from metaproxy.config import (
    _LISTEN,
    _LOG_FORMAT,
    CONTAINER_CREDENTIALS_ADDRESS,
    ECS_CREDENTIALS_ADDRESS,
    IMDS_ADDRESS,
    doc,
    is_loopback,
)
from metaproxy.errors import ConfigError


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
    identity_source: Literal["token-file", "aws-ecs", "aws-ec2"] = field(
        default="token-file",
        metadata=doc(
            "how the task proves who it is: the token file, or AWS attestation, a "
            "GetCallerIdentity signed with the credentials ECS's agent (aws-ecs) or the node's "
            "IMDS (aws-ec2) gives this container, which never reach the application",
        ),
    )
    aws_attest_audience: str = field(
        default="",
        metadata=doc(
            "the broker's --aws-attest-audience, signed into every attestation", metavar="NAME"
        ),
    )
    aws_attest_sts_endpoint: str = field(
        default="",
        metadata=doc(
            "the broker's STS endpoint for attestations; empty: "
            "https://sts.REGION.amazonaws.com of --aws-attest-region",
            metavar="URL",
        ),
    )
    aws_attest_region: str = field(
        default="us-east-1",
        metadata=doc("the region attestations are signed for", metavar="REGION"),
    )
    aws_credentials_url: str = field(
        default="",
        metadata=doc(
            "where the platform serves this container's own credentials, for attestation: "
            "aws-ecs, their URL (empty: AWS_CONTAINER_CREDENTIALS_FULL_URI or _RELATIVE_URI at "
            "169.254.170.2, as the SDKs read them); aws-ec2, the IMDS (empty: "
            "http://169.254.169.254)",
            metavar="URL",
        ),
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
            "addresses by default); comma-separated; empty: not served. Served only with a "
            "token the app can read (--authorization-token-file or --container-credentials-"
            "path): without one it is not started, and the sidecar logs why",
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
            "(for AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE); every request to /v1/credentials "
            "must carry it. Unset, and no --container-credentials-path: the container-"
            "credentials API is not started (no app could read its token)"
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
    revocation_max_staleness: float = field(
        default=120.0,
        metadata=doc(
            "stop serving cached credentials once the broker has refused this task's identity "
            "token (401) for this long since its last answer: a task it cannot check could be "
            "revoked unseen",
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
        if self.revocation_max_staleness <= 0:
            raise ConfigError("--revocation-max-staleness: must be above 0")
        _validate_sidecar(self)


def _validate_sidecar(config: SidecarConfig) -> None:
    if config.broker_socket is None:
        # Identity tokens and credentials cross this link: in the clear only on this host.
        url = urllib.parse.urlsplit(config.broker_url)
        if not url.hostname or not (
            url.scheme == "https" or (url.scheme == "http" and is_loopback(url.hostname))
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
    if config.identity_source != "token-file" and not config.aws_attest_audience:
        raise ConfigError(
            f"--identity-source {config.identity_source}: needs --aws-attest-audience"
        )
    for flag, given in (
        ("--aws-attest-sts-endpoint", config.aws_attest_sts_endpoint),
        ("--aws-credentials-url", config.aws_credentials_url),
    ):
        if given and urllib.parse.urlsplit(given).scheme not in ("http", "https"):
            raise ConfigError(f"{flag}: {given!r} is not an http(s) URL")
    mode = config.authorization_token_mode
    if not (len(mode) in (3, 4) and set(mode) <= set("01234567") and int(mode, 8) & ~0o644 == 0):
        raise ConfigError(
            f"--authorization-token-mode: {mode!r} must be an octal mode within 0644 "
            "(no execute bits, nobody but the owner writes)"
        )


# ECS's own shape is /v2/credentials/<uuid>; 22 characters of base64url are 132 bits.
_SECRET_PATH = re.compile(r"/v2/credentials/[A-Za-z0-9_-]{22,128}")
_INTERFACE = re.compile(r"[A-Za-z0-9_.:-]{1,15}")  # IFNAMSIZ - 1


def container_token_source(config: SidecarConfig) -> bool:
    """Whether an app can learn how to pass the container endpoint's check: a token file it
    reads, or the secret path it is given. Without either the token is one nobody can read."""
    return config.authorization_token_file is not None or bool(config.container_credentials_path)


def authorization_token_mode(config: SidecarConfig) -> int:
    return int(config.authorization_token_mode, 8)
