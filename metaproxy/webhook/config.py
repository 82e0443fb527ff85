"""The webhook's configuration (`metaproxy webhook`), kept out of `metaproxy.config` so that a
sidecar does not hold it in memory."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from metaproxy.config import _LISTEN, _LOG_FORMAT, check_tls_pair, doc
from metaproxy.errors import ConfigError
from metaproxy.metadata_paths import normalise
from metaproxy.webhook.settings import DEFAULT_NODE_METADATA


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
    link_local: Literal["cni", "init-container", "off"] = field(
        default="cni",
        metadata=doc(
            "how pods get 169.254.169.254, 169.254.170.2 and 169.254.170.23 on their own sidecar "
            "(docs/link-local.md): cni, metaproxy's chained CNI plugin on every node; "
            "init-container, an init container with NET_ADMIN in each pod; off, loopback ports "
            "and environment variables only (clients that hard-code the addresses miss the "
            "sidecar)"
        ),
    )
    region: str = field(
        default="",
        metadata=doc(
            "AWS_REGION and AWS_DEFAULT_REGION for the apps (the cluster's region), unless a "
            "container sets either; empty: not set",
            metavar="REGION",
        ),
    )
    node_metadata: tuple[str, ...] = field(
        default=DEFAULT_NODE_METADATA,
        metadata=doc(
            "IMDS paths each pod's sidecar answers from its node's IMDS (placement, instance, "
            "network, spot and event notices); comma-separated; empty: the task's own view "
            "only. The node's role, credentials, keys, user-data and identity document are "
            "never passed, whatever this says",
            metavar="PATH[,PATH...]",
        ),
    )
    termination_notice_seconds: int = field(
        default=0,
        metadata=doc(
            "how long each app's preStop hook waits after the sidecar announces the pod's end "
            "(spot/instance-action), before the app gets SIGTERM; counts against the pod's "
            "terminationGracePeriodSeconds",
            unit="seconds",
            choices="0 to 120",
        ),
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
        if self.region and not _REGION.fullmatch(self.region):
            raise ConfigError(f"--region: {self.region!r} is not an AWS region name")
        if not 0 <= self.termination_notice_seconds <= 120:
            raise ConfigError("--termination-notice-seconds: must be between 0 and 120")
        for path in self.node_metadata:
            if normalise(path) is None:
                raise ConfigError(f"--node-metadata: {path!r} is not an IMDS path")


_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
