"""What the webhook injects with: its settings, the names and paths of what it adds to a pod,
and the secrets each pod gets of its own."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

SIDECAR_NAME = "metaproxy-sidecar"
IDENTITY_VOLUME = "metaproxy-identity"
AUTH_VOLUME = "metaproxy-auth"
CA_VOLUME = "metaproxy-broker-ca"

IDENTITY_DIR = "/var/run/secrets/metaproxy"
AUTH_DIR = "/var/run/metaproxy/auth"
CA_DIR = "/etc/metaproxy/ca"
DEFAULT_CA_CONFIGMAP = "metaproxy-broker-ca"

STATE_VOLUME = "metaproxy-state"
STATE_DIR = "/var/run/metaproxy/state"  # the sidecar's own: the IMDSv2 token key
LINK_LOCAL_CONTAINER = "metaproxy-link-local"

CREDENTIALS_PATH_PREFIX = "/v2/credentials/"  # ECS's own shape for the relative URI

LinkLocal = Literal["cni", "init-container", "off"]
# Node fields a task sees from its node's IMDS by default (--node-metadata): where it runs and
# what the node is told about itself. Never the node's role, credentials, keys or user-data,
# which the sidecar refuses whatever this says.
DEFAULT_NODE_METADATA = (
    "meta-data/placement",
    "meta-data/instance-id",
    "meta-data/instance-type",
    "meta-data/instance-life-cycle",
    "meta-data/ami-id",
    "meta-data/local-ipv4",
    "meta-data/local-hostname",
    "meta-data/hostname",
    "meta-data/mac",
    "meta-data/network",
    "meta-data/spot",
    "meta-data/events",
    "meta-data/autoscaling",
    "meta-data/tags/instance",
)


@dataclass(frozen=True, slots=True)
class InjectionSettings:
    image: str
    broker_url: str
    image_pull_policy: str = "IfNotPresent"
    # A ConfigMap in the pod's namespace holding the broker's CA as `ca.pem`.
    broker_ca_configmap: str = DEFAULT_CA_CONFIGMAP
    identity_audience: str = "metaproxy-broker"
    identity_expiration_seconds: int = 3600
    # The kubelet probes from the node, through the pod IP, so the admin listener cannot be bound
    # to 127.0.0.1 if the probes are to reach it. It serves /healthz, /readyz and /metrics only.
    admin_listen: str = "0.0.0.0:9901"
    admin_port: int = 9901
    startup_timeout_seconds: int = 60
    cpu_request: str = "10m"
    memory_request: str = "48Mi"
    cpu_limit: str = "200m"
    memory_limit: str = "128Mi"
    link_local: LinkLocal = "cni"
    region: str = ""  # AWS_REGION and AWS_DEFAULT_REGION for the apps; empty: not set
    node_metadata: tuple[str, ...] = DEFAULT_NODE_METADATA
    # How long the apps' preStop hook waits on the sidecar after it announces the pod's end.
    termination_notice_seconds: int = 0


def random_token() -> str:
    """192 random bits, URL-safe: a pod's secret path, its lifecycle token."""
    return secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class PodSecrets:
    """What one pod gets that no other pod has."""

    credentials_path: str  # the container endpoint's secret path (RELATIVE_URI)
    lifecycle_token: str  # what the apps' preStop hook shows the sidecar's admin port

    @classmethod
    def new(cls, random_token: Callable[[], str]) -> PodSecrets:
        return cls(CREDENTIALS_PATH_PREFIX + random_token(), random_token())
