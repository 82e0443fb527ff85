"""Who a verified token names: a platform task of a tenant, or a Kubernetes service account
(and its pod), as the `Identity` policies and audit records see."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metaproxy.errors import Unauthenticated
from metaproxy.identity.claims import name_claim, number_claim, text_claim
from metaproxy.models import Identity


def platform_identity(claims: Mapping[str, Any]) -> Identity:
    task, tenant = name_claim(claims, "task"), name_claim(claims, "tenant")
    app = text_claim(claims, "app", required=False)
    if app:
        app = name_claim(claims, "app")
    subject = text_claim(claims, "sub")
    if subject != f"task:{tenant}/{task}":
        raise Unauthenticated("claim sub does not match task and tenant", reason="invalid_claims")
    return Identity(
        kind="platform",
        issuer=text_claim(claims, "iss"),
        subject=subject,
        task=task,
        tenant=tenant,
        app=app,
        token_id=text_claim(claims, "jti"),
        expires_at=number_claim(claims, "exp"),
    )


def kubernetes_identity(claims: Mapping[str, Any]) -> Identity:
    k8s = claims.get("kubernetes.io")
    if not isinstance(k8s, dict):
        raise Unauthenticated("claim kubernetes.io is missing", reason="invalid_claims")
    namespace = text_claim(k8s, "namespace")
    account = k8s.get("serviceaccount")
    if not isinstance(account, dict):
        raise Unauthenticated(
            "claim kubernetes.io.serviceaccount is missing", reason="invalid_claims"
        )
    account_name = text_claim(account, "name")
    text_claim(account, "uid")
    subject = text_claim(claims, "sub")
    if subject != f"system:serviceaccount:{namespace}:{account_name}":
        raise Unauthenticated(
            "claim sub does not match namespace and service account", reason="invalid_claims"
        )
    task = account_name
    pod = k8s.get("pod")
    pod_name = pod_uid = ""
    if pod is not None:
        if not isinstance(pod, dict):
            raise Unauthenticated(
                "claim kubernetes.io.pod must be an object", reason="invalid_claims"
            )
        pod_name = text_claim(pod, "name", required=False)
        pod_uid = text_claim(pod, "uid", required=False)
        # A StatefulSet's pod comes back under the same name; its UID is new. A task revoked as
        # `web-0.<uid>` must not be served again as the next `web-0` (nor the next refused).
        task = ".".join(part for part in (pod_name, pod_uid) if part) or task
    return Identity(
        kind="kubernetes",
        issuer=text_claim(claims, "iss"),
        subject=subject,
        task=task,
        tenant="",
        app=account_name,
        namespace=namespace,
        service_account=account_name,
        token_id=text_claim(claims, "jti", required=False),
        expires_at=number_claim(claims, "exp"),
        pod_name=pod_name,
        pod_uid=pod_uid,
    )
