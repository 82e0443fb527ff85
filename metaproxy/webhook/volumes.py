"""The volumes the webhook adds to a pod: the projected identity token, the sidecar's in-memory
state, the apps' authorization token (mode `off` only) and the broker's CA. Anything secret is
in memory, never on the node's disk."""

from __future__ import annotations

from typing import Any

from metaproxy.webhook.settings import (
    AUTH_VOLUME,
    CA_VOLUME,
    IDENTITY_VOLUME,
    STATE_VOLUME,
    InjectionSettings,
)


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
