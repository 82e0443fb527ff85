"""The containers the webhook adds to a pod: the native sidecar, and the init container that sets
up the link-local addresses (`init-container` mode). Their volumes are in `volumes.py`."""

from __future__ import annotations

from typing import Any

# The sidecar's loopback ports, which the CNI plugin and the init container redirect the
# link-local addresses to: one definition for the webhook and the plugin.
from metaproxy.podnet import CONTAINER_PORT, IMDS_PORT
from metaproxy.webhook.settings import (
    AUTH_DIR,
    AUTH_VOLUME,
    CA_DIR,
    CA_VOLUME,
    IDENTITY_DIR,
    IDENTITY_VOLUME,
    LINK_LOCAL_CONTAINER,
    SIDECAR_NAME,
    STATE_DIR,
    STATE_VOLUME,
    InjectionSettings,
    PodSecrets,
)


def env_var(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def sidecar_container(settings: InjectionSettings, role: str, pod: PodSecrets) -> dict[str, Any]:
    env = [
        env_var("METAPROXY_BROKER_URL", settings.broker_url),
        env_var("METAPROXY_BROKER_CA_FILE", f"{CA_DIR}/ca.pem"),
        env_var("METAPROXY_IDENTITY_TOKEN_FILE", f"{IDENTITY_DIR}/token"),
        # Loopback only: the link-local addresses reach these ports through the namespace's
        # redirect, and an app listening on 0.0.0.0:80 keeps its port.
        env_var("METAPROXY_CONTAINER_LISTEN", f"127.0.0.1:{CONTAINER_PORT},[::1]:{CONTAINER_PORT}"),
        env_var("METAPROXY_IMDS_LISTEN", f"127.0.0.1:{IMDS_PORT},[::1]:{IMDS_PORT}"),
        env_var("METAPROXY_ADMIN_LISTEN", settings.admin_listen),
        env_var("METAPROXY_CONTAINER_CREDENTIALS_PATH", pod.credentials_path),
        env_var("METAPROXY_LIFECYCLE_TOKEN", pod.lifecycle_token),
        # In the pod's own memory: IMDSv2 tokens outlive a sidecar restart, not the pod.
        env_var("METAPROXY_IMDS_TOKEN_KEY_FILE", f"{STATE_DIR}/imds-token.key"),
        env_var("METAPROXY_LOG_FORMAT", "json"),
    ]
    if settings.link_local != "off":
        # Not ready (so the app never starts) until 169.254.169.254 is this sidecar: a node
        # without the CNI plugin must not hand the apps the node's IMDS.
        env.append(env_var("METAPROXY_LINK_LOCAL_CHECK", "true"))
    if settings.link_local == "off":
        env += [
            env_var("METAPROXY_AUTHORIZATION_TOKEN_FILE", f"{AUTH_DIR}/token"),
            # The app containers may run as any user and the volume is this pod's own (in
            # memory, mounted read-only into them): readable by all of them, writable by the
            # sidecar only.
            env_var("METAPROXY_AUTHORIZATION_TOKEN_MODE", "0644"),
        ]
    if settings.node_metadata:
        env.append(env_var("METAPROXY_HOST_METADATA_ALLOW", ",".join(settings.node_metadata)))
    if settings.termination_notice_seconds:
        seconds = str(settings.termination_notice_seconds)
        env.append(env_var("METAPROXY_TERMINATION_NOTICE_SECONDS", seconds))
    if role:
        env.append(env_var("METAPROXY_ROLE", role))

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
