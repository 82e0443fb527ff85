"""The pod mutation: a pure function from a Pod (as JSON) to an RFC 6902 JSON Patch.

The sidecar goes in as a *native* sidecar (an init container with `restartPolicy: Always`, first
in the list): the kubelet starts it before every other container and waits for its startup probe,
so the application only starts once the sidecar holds valid credentials, and the sidecar is
stopped only after the application has exited.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

INJECT_KEY = "metaproxy.io/inject"
ROLE_ANNOTATION = "metaproxy.io/role"
INJECTED_ANNOTATION = "metaproxy.io/injected"

SIDECAR_NAME = "metaproxy-sidecar"
IDENTITY_VOLUME = "metaproxy-identity"
AUTH_VOLUME = "metaproxy-auth"
CA_VOLUME = "metaproxy-broker-ca"

IDENTITY_DIR = "/var/run/secrets/metaproxy"
AUTH_DIR = "/var/run/metaproxy/auth"
CA_DIR = "/etc/metaproxy/ca"
DEFAULT_CA_CONFIGMAP = "metaproxy-broker-ca"

CONTAINER_PORT = 8181
IMDS_PORT = 8182

# IAM role names and ARNs only; the value becomes an environment variable of the sidecar.
_ROLE = re.compile(r"^[A-Za-z0-9+=,.@:/_-]{1,2048}$")


class InjectionRefused(ValueError):
    """The pod is a valid Pod but cannot be injected safely; the message is shown to its author."""


class NotAPod(ValueError):
    """The admission object does not have the shape of a Pod."""


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


def escape_pointer(token: str) -> str:
    """One JSON Pointer reference token (RFC 6901): `~` becomes `~0`, `/` becomes `~1`."""
    return token.replace("~", "~0").replace("/", "~1")


def _marked(mapping: Any) -> bool:
    return isinstance(mapping, Mapping) and mapping.get(INJECT_KEY) == "true"


def wants_injection(pod: Mapping[str, Any]) -> bool:
    """Labelled or annotated `metaproxy.io/inject: "true"`."""
    metadata = pod.get("metadata")
    if not isinstance(metadata, Mapping):
        return False
    return _marked(metadata.get("labels")) or _marked(metadata.get("annotations"))


def already_injected(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec")
    if not isinstance(spec, Mapping):
        return False
    for key in ("initContainers", "containers"):
        containers = spec.get(key) or []
        if isinstance(containers, list) and any(
            isinstance(c, Mapping) and c.get("name") == SIDECAR_NAME for c in containers
        ):
            return True
    return False


def _list_field(owner: Mapping[str, Any], key: str, what: str) -> list[Any] | None:
    value = owner.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise NotAPod(f"{what}.{key} must be a list")
    return value


def _containers(spec: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    containers = _list_field(spec, key, "spec") or []
    for index, container in enumerate(containers):
        if not isinstance(container, Mapping) or not isinstance(container.get("name"), str):
            raise NotAPod(f"spec.{key}[{index}] must be an object with a name")
    return containers


def _role(pod: Mapping[str, Any]) -> str:
    annotations = pod["metadata"].get("annotations")
    if not isinstance(annotations, Mapping) or ROLE_ANNOTATION not in annotations:
        return ""
    role = annotations[ROLE_ANNOTATION]
    if not isinstance(role, str) or not _ROLE.match(role):
        raise InjectionRefused(f"annotation {ROLE_ANNOTATION} must be an IAM role name or ARN")
    return role


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def sidecar_container(settings: InjectionSettings, role: str) -> dict[str, Any]:
    env = [
        _env("METAPROXY_BROKER_URL", settings.broker_url),
        _env("METAPROXY_BROKER_CA_FILE", f"{CA_DIR}/ca.pem"),
        _env("METAPROXY_IDENTITY_TOKEN_FILE", f"{IDENTITY_DIR}/token"),
        _env("METAPROXY_CONTAINER_LISTEN", f"127.0.0.1:{CONTAINER_PORT}"),
        _env("METAPROXY_IMDS_LISTEN", f"127.0.0.1:{IMDS_PORT}"),
        _env("METAPROXY_ADMIN_LISTEN", settings.admin_listen),
        _env("METAPROXY_AUTHORIZATION_TOKEN_FILE", f"{AUTH_DIR}/token"),
        # The app containers may run as any user and the volume is this pod's own (in memory,
        # mounted read-only into them): readable by all of them, writable by the sidecar only.
        _env("METAPROXY_AUTHORIZATION_TOKEN_MODE", "0644"),
        _env("METAPROXY_LOG_FORMAT", "json"),
    ]
    if role:
        env.append(_env("METAPROXY_ROLE", role))

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": settings.admin_port},
            "periodSeconds": period,
            "timeoutSeconds": 1,
            "failureThreshold": failures,
        }

    return {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["sidecar"],
        # Native sidecar: started before, and stopped after, the application containers.
        "restartPolicy": "Always",
        "env": env,
        "ports": [{"name": "mp-admin", "containerPort": settings.admin_port, "protocol": "TCP"}],
        # The kubelet holds back the next containers until this succeeds: no app before creds.
        "startupProbe": probe("/readyz", 1, settings.startup_timeout_seconds),
        "readinessProbe": probe("/readyz", 5, 3),
        "livenessProbe": probe("/healthz", 10, 3),
        "resources": {
            "requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
            "limits": {"cpu": settings.cpu_limit, "memory": settings.memory_limit},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR, "readOnly": True},
            {"name": AUTH_VOLUME, "mountPath": AUTH_DIR},
            {"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True},
        ],
    }


def pod_volumes(settings: InjectionSettings) -> list[dict[str, Any]]:
    return [
        {
            "name": IDENTITY_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": settings.identity_audience,
                            "expirationSeconds": settings.identity_expiration_seconds,
                            "path": "token",
                        }
                    }
                ]
            },
        },
        # In memory: the authorization token the apps present must never reach the node's disk.
        {"name": AUTH_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {
            "name": CA_VOLUME,
            "configMap": {
                "name": settings.broker_ca_configmap,
                "items": [{"key": "ca.pem", "path": "ca.pem"}],
            },
        },
    ]


APP_ENV = (
    ("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{CONTAINER_PORT}/v1/credentials"),
    ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", f"{AUTH_DIR}/token"),
    ("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{IMDS_PORT}/"),
)


def _add_to_list(
    path: str, current: list[Any] | None, items: Sequence[Any]
) -> list[dict[str, Any]]:
    """Append to an array, creating it first when the pod does not have it yet."""
    if not items:
        return []
    if current is None:
        return [{"op": "add", "path": path, "value": list(items)}]
    return [{"op": "add", "path": f"{path}/-", "value": item} for item in items]


def _app_container_ops(base: str, container: Mapping[str, Any], what: str) -> list[dict[str, Any]]:
    env = _list_field(container, "env", what)
    already_set = {e.get("name") for e in env or [] if isinstance(e, Mapping)}
    ops = _add_to_list(
        f"{base}/env",
        env,
        [_env(name, value) for name, value in APP_ENV if name not in already_set],
    )
    mounts = _list_field(container, "volumeMounts", what)
    for mount in mounts or []:
        if isinstance(mount, Mapping) and mount.get("mountPath") == AUTH_DIR:
            if mount.get("name") != AUTH_VOLUME:
                raise InjectionRefused(f"{what} already mounts something at {AUTH_DIR}")
            return ops
    auth_mount = {"name": AUTH_VOLUME, "mountPath": AUTH_DIR, "readOnly": True}
    return ops + _add_to_list(f"{base}/volumeMounts", mounts, [auth_mount])


def build_patch(pod: Mapping[str, Any], settings: InjectionSettings) -> list[dict[str, Any]]:
    """The JSON Patch that injects the sidecar into `pod`; empty when nothing is to be done.

    Raises `NotAPod` for an object that is not shaped like a Pod and `InjectionRefused` for a Pod
    that asks for injection but would collide with what it already has.
    """
    spec = pod.get("spec")
    metadata = pod.get("metadata", {})
    if not isinstance(spec, Mapping) or not isinstance(metadata, Mapping):
        raise NotAPod("a Pod needs metadata and spec objects")
    containers = _containers(spec, "containers")
    if not containers:
        raise NotAPod("spec.containers must not be empty")
    init_containers = _containers(spec, "initContainers")
    volumes = _list_field(spec, "volumes", "spec")
    if not wants_injection(pod) or already_injected(pod):
        return []
    if spec.get("hostNetwork") is True:
        # The sidecar listens on loopback and 169.254.169.254/169.254.170.23 inside the pod's
        # network namespace; with hostNetwork that namespace is the node's, and the pod's
        # credentials would be served to every process and pod on the node.
        raise InjectionRefused(
            "the pod uses hostNetwork: its sidecar would serve the pod's credentials on the "
            "node's own network to every process of the node; run it without hostNetwork"
        )

    ours = {v["name"] for v in pod_volumes(settings)}
    for volume in volumes or []:
        if isinstance(volume, Mapping) and volume.get("name") in ours:
            raise InjectionRefused(f"the pod already has a volume named {volume['name']}")
    role = _role(pod)

    ops: list[dict[str, Any]] = []
    annotations = metadata.get("annotations")
    if isinstance(annotations, Mapping):
        # The key holds a `/`, which a JSON Pointer must spell `~1`.
        marker = escape_pointer(INJECTED_ANNOTATION)
        ops.append({"op": "add", "path": f"/metadata/annotations/{marker}", "value": "true"})
    else:
        ops.append(
            {"op": "add", "path": "/metadata/annotations", "value": {INJECTED_ANNOTATION: "true"}}
        )
    ops += _add_to_list("/spec/volumes", volumes, pod_volumes(settings))
    # Existing init containers run after the sidecar has started, so they get credentials too.
    # Their ops come before the sidecar is inserted at index 0, while their indices still hold.
    for index, container in enumerate(init_containers):
        ops += _app_container_ops(
            f"/spec/initContainers/{index}", container, f"initContainers[{index}]"
        )
    sidecar = sidecar_container(settings, role)
    if spec.get("initContainers") is not None:
        ops.append({"op": "add", "path": "/spec/initContainers/0", "value": sidecar})
    else:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
    for index, container in enumerate(containers):
        ops += _app_container_ops(f"/spec/containers/{index}", container, f"containers[{index}]")
    return ops
