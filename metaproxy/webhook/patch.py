"""The pod mutation: a pure function from a Pod (as JSON) to an RFC 6902 JSON Patch.

The sidecar goes in as a *native* sidecar (an init container with `restartPolicy: Always`, first
in the list): the kubelet starts it before every other container and waits for its startup probe,
so the application only starts once the sidecar holds valid credentials, and the sidecar is
stopped only after the application has exited.

What goes in is built elsewhere: the containers (`containers.py`) and volumes (`volumes.py`),
what every application container gets (`app_containers.py`, which also explains the two
link-local modes), and the settings and names they share (`settings.py`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from metaproxy.podnet import LINK_LOCAL_ANNOTATION, LINK_LOCAL_CNI
from metaproxy.webhook.app_containers import REGION_VARIABLES, app_environment, pre_stop_hook
from metaproxy.webhook.containers import env_var, link_local_container, sidecar_container
from metaproxy.webhook.settings import (
    AUTH_DIR,
    AUTH_VOLUME,
    LINK_LOCAL_CONTAINER,
    SIDECAR_NAME,
    InjectionSettings,
    PodSecrets,
    random_token,
)
from metaproxy.webhook.volumes import pod_volumes

# The settings are part of build_patch's signature: the admission endpoint imports them here.
__all__ = ["InjectionRefused", "InjectionSettings", "NotAPod", "build_patch"]

INJECT_KEY = "metaproxy.io/inject"
ROLE_ANNOTATION = "metaproxy.io/role"
INJECTED_ANNOTATION = "metaproxy.io/injected"

# IAM role names and ARNs only; the value becomes an environment variable of the sidecar.
_ROLE = re.compile(r"^[A-Za-z0-9+=,.@:/_-]{1,2048}$")


class InjectionRefused(ValueError):
    """The pod is a valid Pod but cannot be injected safely; the message is shown to its author."""


class NotAPod(ValueError):
    """The admission object does not have the shape of a Pod."""


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
        [env_var(name, value) for name, value in app_env if name not in already_set],
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
