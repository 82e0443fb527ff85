"""Values that cross module boundaries: who is asking, what policy decided, what STS gave.

Everything here is frozen: a decision or a credential set is a fact, passed around, never edited.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any, Literal

# "aws": a signed sts:GetCallerIdentity, mapped to tenant and app by the broker's rules.
IdentityKind = Literal["platform", "kubernetes", "spiffe", "aws"]


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified identity token's claims. Nothing else the sidecar says is trusted."""

    kind: IdentityKind
    issuer: str
    subject: str
    task: str
    tenant: str = ""  # platform tokens claim it, AWS attestations map to it; Kubernetes: namespace
    app: str = ""
    namespace: str = ""
    service_account: str = ""
    token_id: str = ""  # jti: identifies the token in the audit log without revealing it
    expires_at: float = 0.0
    # Kubernetes tokens: the pod (`kubernetes.io.pod`) and the cluster the broker trusts them for
    # (configured), for EKS Pod Identity-compatible session tags.
    pod_name: str = ""
    pod_uid: str = ""
    cluster_name: str = ""
    cluster_arn: str = ""


def limit(default: float, unit: str, meaning: str) -> Any:
    """A policy limit field: its default, and the unit and meaning the configuration reference
    (`metaproxy.commands.configdoc`) prints, so the page cannot drift from the field."""
    return field(default=default, metadata={"unit": unit, "doc": meaning})


@dataclass(frozen=True, slots=True)
class SidecarLimits:
    """Per-task limits the tenant's policy sets; delivered to the sidecar with its credentials."""

    token_rps: float = limit(
        20.0,
        "per second",
        "IMDSv2 token requests (PUT /latest/api/token) one task's sidecar answers",
    )
    credentials_rps: float = limit(
        50.0,
        "per second",
        "credential requests (IMDS security-credentials and the container endpoint) one "
        "task's sidecar answers",
    )
    metadata_rps: float = limit(
        100.0, "per second", "other metadata requests (meta-data/*, dynamic/*) one sidecar answers"
    )
    burst: int = limit(
        50,
        "requests",
        "how far above those rates a sidecar answers for a moment (each rate's bucket); past "
        "it, 503 with Retry-After, shared fairly between the pod's connections",
    )
    max_connections: int = limit(
        256,
        "connections",
        "open connections one sidecar keeps; past it new ones are refused or idle ones closed",
    )
    max_connections_per_client: int = limit(
        64, "connections", "open connections one client address may hold at a sidecar"
    )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    """What one tenant may ask of the broker, so a flooding tenant cannot starve the others."""

    requests_per_second: float = limit(
        50.0,
        "per second",
        "credential requests the whole tenant may make of the broker fleet (split between "
        "live replicas when the store is down); past it, 429 with Retry-After",
    )
    burst: int = limit(100, "requests", "how far above requests_per_second, for a moment")
    max_in_flight: int = limit(
        64, "requests", "the tenant's requests the fleet works on at once (queued or at STS)"
    )
    per_identity_rps: float = limit(
        5.0, "per second", "requests one identity (one task's token subject) may make"
    )
    per_identity_burst: int = limit(
        20, "requests", "how far above per_identity_rps one identity may go, for a moment"
    )


@dataclass(frozen=True, slots=True)
class AssumeRoleSpec:
    """Everything STS AssumeRole is called with, and for whom. Its `cache_key` is (role, session,
    scope, tenant).

    `via`: role chaining. The role in `via` is assumed first and this one with its credentials;
    the chain is part of the cache key, so the same role reached another way is another set.
    `tenant`: whose credentials these are. Never sent to STS, but part of the cache key: two
    tenants sharing a role whose other parameters render alike (tenant `acme` with task `eu.t1`
    and tenant `acme.eu` with task `t1` both get session `acme.eu.t1`) are two entries, and
    one is never served the other's credentials.
    """

    role_arn: str
    role_session_name: str
    source_identity: str
    duration_seconds: int
    tags: tuple[tuple[str, str], ...] = ()
    transitive_tag_keys: tuple[str, ...] = ()
    session_policy: str | None = None
    external_id: str | None = None
    via: AssumeRoleSpec | None = None
    tenant: str = ""

    @property
    def cache_key(self) -> tuple[object, ...]:
        # The role ARN stays first: the broker reads it back from keys it drops on revocation.
        return (
            self.role_arn,
            self.role_session_name,
            self.source_identity,
            self.duration_seconds,
            self.tags,
            self.transitive_tag_keys,
            self.session_policy,
            self.external_id,
            self.via.cache_key if self.via is not None else None,
            self.tenant,
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """Policy's verdict for one identity and (optional) requested role, with its reasons.

    The explanation (`rule`, `reason`) goes to logs and the audit log, never to the client.
    """

    allowed: bool
    tenant: str
    team: str
    rule: str
    reason: str
    policy_digest: str
    role_name: str = ""
    role_arn: str = ""
    spec: AssumeRoleSpec | None = None
    sidecar_limits: SidecarLimits = field(default_factory=SidecarLimits)
    broker_limits: BrokerLimits = field(default_factory=BrokerLimits)


@dataclass(frozen=True, slots=True)
class Credentials:
    """Temporary credentials. `repr` never shows the secret or the token."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime  # timezone-aware UTC

    def seconds_left(self, now: datetime) -> float:
        return (self.expiration - now).total_seconds()


# What each node fact may look like; a value of any other shape is dropped (sidecar) or refused
# (broker), so nothing a pod says reaches a signed document or a log unchecked.
_NODE_FACT_SHAPES = {
    "instance_id": re.compile(r"i-[0-9a-f]{8,17}"),
    "instance_type": re.compile(r"[a-z0-9][a-z0-9.-]{1,31}"),
    "availability_zone": re.compile(r"[a-z]{2}(-[a-z0-9]+){2,5}"),  # us-east-1a, us-west-2-lax-1a
    "availability_zone_id": re.compile(r"[a-z0-9]{3,8}(-[a-z0-9]{1,8}){0,2}-az[0-9]{1,2}"),
    "region": re.compile(r"[a-z]{2}(-[a-z]+){1,3}-[0-9]{1,2}"),
}


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """Where a task runs, as its sidecar read it from the node's IMDS (`--host-metadata-allow`):
    the broker puts these in the task's metadata view and identity document in place of its
    own defaults. Not attested: the broker checks their shape, not their truth (the document's
    taskId, tenant and accountId are what it attests)."""

    instance_id: str = ""
    instance_type: str = ""
    availability_zone: str = ""
    availability_zone_id: str = ""
    region: str = ""
    local_ipv4: str = ""

    @classmethod
    def parse(cls, raw: object, *, strict: bool) -> NodeFacts:
        """From `{"instance_id": …}`; a field of the wrong shape raises ValueError when
        `strict` (the broker refuses the request) and is left out otherwise (the sidecar)."""
        if not isinstance(raw, dict):
            raise ValueError("node must be an object")
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown and strict:
            raise ValueError(f"unknown node field: {sorted(unknown)[0][:40]}")
        values: dict[str, str] = {}
        for name in known & set(raw):
            value = raw[name]
            if isinstance(value, str) and _node_fact_ok(name, value):
                values[name] = value
            elif strict:
                raise ValueError(f"node field {name} has the wrong shape")
        return cls(**values)

    def to_json(self) -> dict[str, str]:
        return {name: value for name, value in asdict(self).items() if value}


def _node_fact_ok(name: str, value: str) -> bool:
    if name == "local_ipv4":
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            return False
        return True
    return bool(_NODE_FACT_SHAPES[name].fullmatch(value))
