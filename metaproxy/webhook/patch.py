"""The pod mutation: a pure function from a Pod (as JSON) to an RFC 6902 JSON Patch.

The sidecar goes in as a *native* sidecar (an init container with `restartPolicy: Always`, first
in the list): the kubelet starts it before every other container and waits for its startup probe,
so the application only starts once the sidecar holds valid credentials, and the sidecar is
stopped only after the application has exited.

What the application containers get must work for every SDK since 2017 with no other setting,
old ones included (botocore 1.29, AWS CLI 2.9, aws-sdk-go 1.44, Ruby aws-sdk-core 3.168 ignore
`AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`), and no request may get credentials without the pod's
secret (docs/compatibility.md has the table of clients and the path each takes):

- **link-local** (`cni`, or `init-container` where the CNI cannot change): the pod's network
  namespace holds 169.254.169.254, 169.254.170.2 and 169.254.170.23 (and their IPv6 twins),
  redirected to this pod's sidecar, never the node's IMDS. The apps get ECS's
  `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` with a secret path: every SDK since 2016 follows it
  with no header. Nothing else: with FULL_URI set as well, aws-sdk-go and aws-sdk-go-v2 < 1.18
  take FULL_URI and the JS SDK v3 warns on every client. Tools that hard-code 169.254.169.254
  (s3cmd, ec2-metadata, OpenTelemetry, cloud-init) reach the sidecar.
- **off**: nothing in the namespace changes. The apps get a loopback `FULL_URI` carrying the
  same secret path (the one host every SDK accepts), the token file (object_store reads
  FULL_URI only with it), and `AWS_EC2_METADATA_SERVICE_ENDPOINT`. Clients that hard-code the
  IMDS address, or read no FULL_URI and ignore the endpoint's port (Ruby 3.168), are not served.

The secret path is in the pod's spec, readable by whoever may read the pod: it is only usable
from inside the pod's network namespace (the sidecar listens on loopback), as ECS's relative
URI is usable only from inside the task.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

# The sidecar's loopback ports, which the CNI plugin and the init container redirect the
# link-local addresses to: one definition for the webhook and the plugin.
from metaproxy.podnet import CONTAINER_PORT, IMDS_PORT, LINK_LOCAL_ANNOTATION, LINK_LOCAL_CNI

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
    link_local: LinkLocal = "cni"
    region: str = ""  # AWS_REGION and AWS_DEFAULT_REGION for the apps; empty: not set
    node_metadata: tuple[str, ...] = DEFAULT_NODE_METADATA
    # How long the apps' preStop hook waits on the sidecar after it announces the pod's end.
    termination_notice_seconds: int = 0


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
            isinstance(c, Mapping) and c.get("name") in (SIDECAR_NAME, LINK_LOCAL_CONTAINER)
            for c in containers
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


@dataclass(frozen=True, slots=True)
class PodSecrets:
    """What one pod gets that no other pod has."""

    credentials_path: str  # the container endpoint's secret path (RELATIVE_URI)
    lifecycle_token: str  # what the apps' preStop hook shows the sidecar's admin port

    @classmethod
    def new(cls, random_token: Callable[[], str]) -> PodSecrets:
        return cls(CREDENTIALS_PATH_PREFIX + random_token(), random_token())


def sidecar_container(settings: InjectionSettings, role: str, pod: PodSecrets) -> dict[str, Any]:
    env = [
        _env("METAPROXY_BROKER_URL", settings.broker_url),
        _env("METAPROXY_BROKER_CA_FILE", f"{CA_DIR}/ca.pem"),
        _env("METAPROXY_IDENTITY_TOKEN_FILE", f"{IDENTITY_DIR}/token"),
        # Loopback only: the link-local addresses reach these ports through the namespace's
        # redirect, and an app listening on 0.0.0.0:80 keeps its port.
        _env("METAPROXY_CONTAINER_LISTEN", f"127.0.0.1:{CONTAINER_PORT},[::1]:{CONTAINER_PORT}"),
        _env("METAPROXY_IMDS_LISTEN", f"127.0.0.1:{IMDS_PORT},[::1]:{IMDS_PORT}"),
        _env("METAPROXY_ADMIN_LISTEN", settings.admin_listen),
        _env("METAPROXY_CONTAINER_CREDENTIALS_PATH", pod.credentials_path),
        _env("METAPROXY_LIFECYCLE_TOKEN", pod.lifecycle_token),
        # In the pod's own memory: IMDSv2 tokens outlive a sidecar restart, not the pod.
        _env("METAPROXY_IMDS_TOKEN_KEY_FILE", f"{STATE_DIR}/imds-token.key"),
        _env("METAPROXY_LOG_FORMAT", "json"),
    ]
    if settings.link_local != "off":
        # Not ready (so the app never starts) until 169.254.169.254 is this sidecar: a node
        # without the CNI plugin must not hand the apps the node's IMDS.
        env.append(_env("METAPROXY_LINK_LOCAL_CHECK", "true"))
    if settings.link_local == "off":
        env += [
            _env("METAPROXY_AUTHORIZATION_TOKEN_FILE", f"{AUTH_DIR}/token"),
            # The app containers may run as any user and the volume is this pod's own (in
            # memory, mounted read-only into them): readable by all of them, writable by the
            # sidecar only.
            _env("METAPROXY_AUTHORIZATION_TOKEN_MODE", "0644"),
        ]
    if settings.node_metadata:
        env.append(_env("METAPROXY_HOST_METADATA_ALLOW", ",".join(settings.node_metadata)))
    if settings.termination_notice_seconds:
        seconds = str(settings.termination_notice_seconds)
        env.append(_env("METAPROXY_TERMINATION_NOTICE_SECONDS", seconds))
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
            {"name": STATE_VOLUME, "mountPath": STATE_DIR},
            *(
                [{"name": AUTH_VOLUME, "mountPath": AUTH_DIR}]
                if settings.link_local == "off"
                else []
            ),
            {"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True},
        ],
    }


def link_local_container(settings: InjectionSettings) -> dict[str, Any]:
    """`init-container` mode: before the sidecar, add the link-local addresses and their
    redirect to the pod's namespace. It needs NET_ADMIN in the pod's own namespace (as
    istio-init does), which the restricted Pod Security profile does not allow: that is why
    the CNI plugin is the default."""
    args = ["link-local", "setup", f"--imds-port={IMDS_PORT}", f"--container-port={CONTAINER_PORT}"]
    if settings.node_metadata:
        args.append("--node-metadata")
    return {
        "name": LINK_LOCAL_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": args,
        "resources": {
            "requests": {"cpu": settings.cpu_request, "memory": "16Mi"},
            "limits": {"cpu": settings.cpu_limit, "memory": settings.memory_limit},
        },
        "securityContext": {
            "runAsNonRoot": False,
            "runAsUser": 0,
            "runAsGroup": 0,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def pod_volumes(settings: InjectionSettings) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
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
        # In memory and the sidecar's alone: the key that signs the pod's IMDSv2 tokens.
        {"name": STATE_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]
    if settings.link_local == "off":
        # In memory: the authorization token the apps present must never reach the node's disk.
        volumes.append({"name": AUTH_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
    volumes.append(
        {
            "name": CA_VOLUME,
            "configMap": {
                "name": settings.broker_ca_configmap,
                "items": [{"key": "ca.pem", "path": "ca.pem"}],
            },
        }
    )
    return volumes


REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")


def app_environment(settings: InjectionSettings, credentials_path: str) -> list[tuple[str, str]]:
    """What every application container gets (docs/compatibility.md: each client and the path
    it takes)."""
    if settings.link_local == "off":
        env = [
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                f"http://127.0.0.1:{CONTAINER_PORT}{credentials_path}",
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", f"{AUTH_DIR}/token"),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{IMDS_PORT}/"),
        ]
    else:
        env = [("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", credentials_path)]
    if settings.region:
        # The node's region, as the IRSA webhook sets it: SDKs that never read it from IMDS.
        env += [(name, settings.region) for name in REGION_VARIABLES]
    return env


def random_token() -> str:
    """192 random bits, URL-safe: a pod's secret path, its lifecycle token."""
    return secrets.token_urlsafe(24)


LIFECYCLE_PATH = "/lifecycle/terminate"
LIFECYCLE_HEADER = "X-Metaproxy-Lifecycle-Token"


def pre_stop_hook(settings: InjectionSettings, pod: PodSecrets) -> dict[str, Any]:
    """Kubernetes stops a native sidecar only after the apps have exited, so the sidecar's own
    SIGTERM comes too late to warn them: each app's preStop hook tells the sidecar first, which
    then serves `spot/instance-action` (and holds the hook for the notice period)."""
    return {
        "httpGet": {
            "path": LIFECYCLE_PATH,
            "port": settings.admin_port,
            "httpHeaders": [{"name": LIFECYCLE_HEADER, "value": pod.lifecycle_token}],
        }
    }


def _add_to_list(
    path: str, current: list[Any] | None, items: Sequence[Any]
) -> list[dict[str, Any]]:
    """Append to an array, creating it first when the pod does not have it yet."""
    if not items:
        return []
    if current is None:
        return [{"op": "add", "path": path, "value": list(items)}]
    return [{"op": "add", "path": f"{path}/-", "value": item} for item in items]


def _pre_stop_ops(
    base: str, container: Mapping[str, Any], hook: dict[str, Any]
) -> list[dict[str, Any]]:
    """The hook, unless the container has a preStop of its own (it keeps it: one per
    container; that app then gets the notice with the sidecar's SIGTERM, not before)."""
    lifecycle = container.get("lifecycle")
    if lifecycle is None:
        return [{"op": "add", "path": f"{base}/lifecycle", "value": {"preStop": hook}}]
    if isinstance(lifecycle, Mapping) and "preStop" not in lifecycle:
        return [{"op": "add", "path": f"{base}/lifecycle/preStop", "value": hook}]
    return []


def _app_container_ops(
    base: str,
    container: Mapping[str, Any],
    what: str,
    settings: InjectionSettings,
    app_env: list[tuple[str, str]],
) -> list[dict[str, Any]]:
    env = _list_field(container, "env", what)
    already_set = {e.get("name") for e in env or [] if isinstance(e, Mapping)}
    if already_set & set(REGION_VARIABLES):
        # The pod chose its region: setting the other variable to another one would split it.
        app_env = [(name, value) for name, value in app_env if name not in REGION_VARIABLES]
    ops = _add_to_list(
        f"{base}/env",
        env,
        [_env(name, value) for name, value in app_env if name not in already_set],
    )
    if settings.link_local != "off":
        return ops
    mounts = _list_field(container, "volumeMounts", what)
    for mount in mounts or []:
        if isinstance(mount, Mapping) and mount.get("mountPath") == AUTH_DIR:
            if mount.get("name") != AUTH_VOLUME:
                raise InjectionRefused(f"{what} already mounts something at {AUTH_DIR}")
            return ops
    auth_mount = {"name": AUTH_VOLUME, "mountPath": AUTH_DIR, "readOnly": True}
    return ops + _add_to_list(f"{base}/volumeMounts", mounts, [auth_mount])


def _annotation_ops(metadata: Mapping[str, Any], marks: dict[str, str]) -> list[dict[str, Any]]:
    annotations = metadata.get("annotations")
    if not isinstance(annotations, Mapping):
        return [{"op": "add", "path": "/metadata/annotations", "value": marks}]
    # The keys hold a `/`, which a JSON Pointer must spell `~1`.
    return [
        {"op": "add", "path": f"/metadata/annotations/{escape_pointer(key)}", "value": value}
        for key, value in marks.items()
    ]


def build_patch(
    pod: Mapping[str, Any],
    settings: InjectionSettings,
    new_secret: Callable[[], str] = random_token,
) -> list[dict[str, Any]]:
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
        # The sidecar serves the pod's credentials inside the pod's network namespace; with
        # hostNetwork that namespace is the node's, and they would be served to every process
        # and pod on the node.
        raise InjectionRefused(
            "the pod uses hostNetwork: its sidecar would serve the pod's credentials on the "
            "node's own network to every process of the node; run it without hostNetwork"
        )

    our_volumes = {v["name"] for v in pod_volumes(settings)}
    for volume in volumes or []:
        if isinstance(volume, Mapping) and volume.get("name") in our_volumes:
            raise InjectionRefused(f"the pod already has a volume named {volume['name']}")
    role = _role(pod)
    secrets_of_pod = PodSecrets.new(new_secret)
    app_env = app_environment(settings, secrets_of_pod.credentials_path)

    marks = {INJECTED_ANNOTATION: "true"}
    if settings.link_local == "cni":
        # Only pods the webhook marked get the link-local addresses from metaproxy's CNI
        # plugin; every other pod keeps today's behaviour.
        marks[LINK_LOCAL_ANNOTATION] = LINK_LOCAL_CNI
    ops = _annotation_ops(metadata, marks)
    ops += _add_to_list("/spec/volumes", volumes, pod_volumes(settings))
    # Existing init containers run after the sidecar has started, so they get credentials too.
    # Their ops come before ours are inserted at index 0, while their indices still hold.
    for index, container in enumerate(init_containers):
        ops += _app_container_ops(
            f"/spec/initContainers/{index}",
            container,
            f"initContainers[{index}]",
            settings,
            app_env,
        )
    ours = [sidecar_container(settings, role, secrets_of_pod)]
    if settings.link_local == "init-container":
        ours.insert(0, link_local_container(settings))
    if spec.get("initContainers") is not None:
        # Inserted at 0 one after the other, last first, so they end up in order.
        ops += [{"op": "add", "path": "/spec/initContainers/0", "value": c} for c in ours[::-1]]
    else:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": ours})
    hook = pre_stop_hook(settings, secrets_of_pod)
    for index, container in enumerate(containers):
        base = f"/spec/containers/{index}"
        ops += _app_container_ops(base, container, f"containers[{index}]", settings, app_env)
        ops += _pre_stop_ops(base, container, hook)
    return ops
