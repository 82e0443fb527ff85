"""The task's IMDS tree, as the current grant shows it: rendered once per credential set (and
again when the task begins to stop), with the answers already asked kept for the next request.

Bodies are EC2's: `text/plain`, listings one entry a line with `/` on directories, JSON with
two-space indents and `"Key" : "value"`, no final newline anywhere (botocore uses the role
listing's whole body as the role name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from metaproxy.clock import iso_z
from metaproxy.sidecar.broker_client import Grant
from metaproxy.sidecar.wire.messages import Response, http_date

if TYPE_CHECKING:
    from metaproxy.sidecar.lifecycle import TerminationNotice


def text(body: str, last_modified: str, **headers: str) -> Response:
    """A metadata answer as EC2 sends it: `text/plain` (no charset), `Accept-Ranges: none`, the
    time the metadata last changed."""
    fields = (("Accept-Ranges", "none"), ("Last-Modified", last_modified), *headers.items())
    return Response(200, body.encode(), "text/plain", fields)


def _aws_json(document: dict[str, str]) -> str:
    """JSON the way EC2 prints it: two-space indent, `"Key" : "value"`, no final newline."""
    return json.dumps(document, indent=2, separators=(",", " : "))


def credentials_document(grant: Grant, *, extended: bool = False) -> str:
    """The role's credential document; `extended` (`security-credentials-extended/ROLE`, which
    current SDKs ask first) adds the account id the credentials belong to."""
    creds = grant.credentials
    document = {
        "Code": "Success",
        "LastUpdated": iso_z(grant.issued_at),
        "Type": "AWS-HMAC",
        "AccessKeyId": creds.access_key_id,
        "SecretAccessKey": creds.secret_access_key,
        "Token": creds.session_token,
        "Expiration": iso_z(creds.expiration),
    }
    if extended:
        document["AccountId"] = grant.account_id
    return _aws_json(document)


def metadata_tree(grant: Grant) -> dict[str, Any]:
    """The task-scoped view. Dict = directory, str = leaf, None = the credential document."""
    m = grant.metadata
    meta_data: dict[str, Any] = {
        "ami-id": m.get("ami_id", ""),
        "hostname": m.get("hostname", ""),
        "iam": {
            "info": _aws_json(
                {
                    "Code": "Success",
                    "LastUpdated": iso_z(grant.issued_at),
                    "InstanceProfileArn": m.get("instance_profile_arn", ""),
                    "InstanceProfileId": m.get("instance_profile_id", ""),
                }
            ),
            "security-credentials": {grant.role_name: None},
        },
        "instance-id": m.get("instance_id", ""),
        "instance-type": m.get("instance_type", ""),
        "local-hostname": m.get("local_hostname", ""),
        "local-ipv4": m.get("local_ipv4", ""),
        "mac": m.get("mac", ""),
        "placement": {
            "availability-zone": m.get("availability_zone", ""),
            "availability-zone-id": m.get("availability_zone_id", ""),
            "region": m.get("region", ""),
        },
        "services": {"domain": "amazonaws.com", "partition": "aws"},
    }
    dynamic: dict[str, Any] = {}
    if "identity_document" in m:
        dynamic["instance-identity"] = {
            "document": m["identity_document"],
            "signature": m.get("identity_signature", ""),
        }
    return {"dynamic": dynamic, "meta-data": meta_data}


def listing(directory: dict[str, Any] | list[str]) -> str:
    if isinstance(directory, list):
        return "\n".join(directory)
    return "\n".join(f"{k}/" if isinstance(v, dict) else k for k, v in directory.items())


MAX_KEPT_ANSWERS = 512  # per grant; a client inventing paths (`//latest///`) only stops adding


@dataclass(frozen=True, slots=True)
class ImdsView:
    """One grant as IMDS shows it; `SidecarState.imds_view` keeps the current one."""

    grant: Grant
    tree: dict[str, Any]
    last_modified: str  # when this view's metadata last changed (`Last-Modified`)
    credentials: Response
    extended: Response
    # Request path → its answer from this view, and whether it is a credential document (served
    # only with 15 minutes left): a repeated request is then one lookup, not a walk of the tree.
    answers: dict[str, tuple[Response, bool]] = field(default_factory=dict)

    def text(self, body: str) -> Response:
        return text(body, self.last_modified)


def render_view(grant: Grant, notice: TerminationNotice | None = None) -> ImdsView:
    """`grant` as IMDS shows it, with EC2's termination notices once the task is stopping."""
    tree = metadata_tree(grant)
    overlay = notice.overlay() if notice is not None else None
    if overlay:
        tree["meta-data"] = dict(sorted({**tree["meta-data"], **overlay}.items()))
    modified = http_date(grant.issued_at.timestamp())
    return ImdsView(
        grant,
        tree,
        modified,
        text(credentials_document(grant), modified),
        text(credentials_document(grant, extended=True), modified),
    )
