"""The task-scoped metadata view the sidecar serves: stable, derived from the task. The identity
document is signed by the broker, so a task can prove who it is.

Where the task runs — instance, type, zone, region, address — is the node's when the sidecar read
it from the node's IMDS and sent it (`NodeFacts`, shape-checked); otherwise it is derived from
the task, in the broker's own region and `--availability-zone`. Cassandra's Ec2Snitch,
OpenTelemetry's EC2 detector and Container Insights then report the node's rack and host, as
they do on EC2. Those fields are the node's word, not the broker's: the document attests
taskId, tenant and accountId."""

from __future__ import annotations

import hashlib
import ipaddress
from datetime import datetime
from pathlib import Path
from typing import Any

from metaproxy.clock import iso_z
from metaproxy.models import Decision, Identity, NodeFacts


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def availability_zone_id(region: str, zone: str) -> str:
    """`us-east-1a` → `use1-az1`, in the shape AWS uses (the mapping itself is per account)."""
    area, direction, number = [*region.split("-"), "", "", ""][:3]
    letter = zone[-1:] if zone.startswith(region) else "a"
    return f"{area}{direction[:1]}{number}-az{ord(letter) - ord('a') + 1}"


def build_metadata(
    *,
    identity: Identity,
    decision: Decision,
    account_id: str,
    region: str,
    availability_zone: str,
    peer: str,
    started: datetime,
    document_key: Path | None,
    node: NodeFacts | None = None,
) -> dict[str, Any]:
    seed = _digest(decision.tenant, identity.task)
    node = node or NodeFacts()
    try:
        local_ipv4 = node.local_ipv4 or str(ipaddress.IPv4Address(peer))
    except ValueError:
        local_ipv4 = "127.0.0.1"
    hostname = f"ip-{local_ipv4.replace('.', '-')}.ec2.internal"
    instance_id = node.instance_id or "i-" + seed[:17]
    if node.availability_zone:
        region = node.region or region
        zone_id = node.availability_zone_id or availability_zone_id(region, node.availability_zone)
        availability_zone = node.availability_zone
    else:
        region = node.region or region
        zone_id = availability_zone_id(region, availability_zone)
    view: dict[str, Any] = {
        "instance_id": instance_id,
        "instance_type": node.instance_type or "container.task",
        "ami_id": "ami-" + seed[17:34],
        "region": region,
        "availability_zone": availability_zone,
        "availability_zone_id": zone_id,
        "local_ipv4": local_ipv4,
        "hostname": hostname,
        "local_hostname": hostname,
        "mac": "02:" + ":".join(seed[i : i + 2] for i in range(34, 44, 2)),
        "instance_profile_arn": f"arn:aws:iam::{account_id}:instance-profile/{decision.role_name}",
        "instance_profile_id": "AIPA" + seed[44:61].upper(),
    }
    if document_key is not None:
        from metaproxy.identity.document import sign_document

        document = {
            "accountId": account_id,
            "architecture": "x86_64",
            "availabilityZone": availability_zone,
            "imageId": view["ami_id"],
            "instanceId": instance_id,
            "instanceType": view["instance_type"],
            "pendingTime": iso_z(started),
            "privateIp": local_ipv4,
            "region": region,
            "version": "2017-09-30",
            "taskId": identity.task,
            "tenant": decision.tenant,
        }
        view["identity_document"], view["identity_signature"] = sign_document(
            document_key, document
        )
    return view
