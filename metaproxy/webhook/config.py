"""The webhook's configuration (`metaproxy webhook`), kept out of `metaproxy.config` so that a
sidecar does not hold it in memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from metaproxy.config import _LISTEN, _LOG_FORMAT, check_tls_pair, doc
from metaproxy.errors import ConfigError


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

    def check(self, given: set[str]) -> None:
        check_tls_pair(self.tls_cert, self.tls_key)
        if not self.image.strip():
            raise ConfigError("--image: must name the sidecar's container image")
        if not self.broker_url.startswith("https://"):
            raise ConfigError("--broker-url: must be an https:// URL (sidecars verify the CA)")
