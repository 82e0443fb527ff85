"""The node's facts, the task's secrets: each pod reports the node it runs on.

Two nodes in two zones (two node IMDS servers), a pod on each: each pod's sidecar answers
placement, instance and network paths from its own node's IMDS (the webhook's default
`--node-metadata` list), the broker puts the node's instance, zone and region into the task's
signed identity document, and nothing the node keeps to itself (role, credentials, keys,
user-data, its own identity document) is ever asked of it or shown.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from metaproxy.identity.document import verify_document
from metaproxy.sidecar.server import SidecarServer
from metaproxy.testing.ec2_node import SECRET_MARK, Instance, NodeImds
from metaproxy.webhook.settings import DEFAULT_NODE_METADATA
from tests.conftest import SidecarFactory
from tests.support import Pki
from tests.test_imds_contract import get, token_for

NODE_A = Instance(
    instance_id="i-0aaaaaaaaaaaaaaa1",
    instance_type="m6i.large",
    zone="us-east-1a",
    zone_id="use1-az6",
    local_ipv4="10.0.1.17",
    mac="0e:aa:00:00:00:01",
)
NODE_B = Instance(
    instance_id="i-0bbbbbbbbbbbbbbb2",
    instance_type="c7g.xlarge",
    zone="us-east-1b",
    zone_id="use1-az1",
    local_ipv4="10.0.2.42",
    mac="0e:bb:00:00:00:02",
    spot_action={"action": "terminate", "time": "2026-12-05T22:00:00Z"},
)


async def pod_on(
    node: Instance, start_sidecar: SidecarFactory, aiohttp_server: Any, task: str
) -> tuple[SidecarServer, NodeImds]:
    imds = NodeImds(node)
    server = await aiohttp_server(imds.app())
    sidecar = await start_sidecar(
        "acme",
        task,
        host_metadata_url=str(server.make_url("/")).rstrip("/"),
        host_metadata_allow=DEFAULT_NODE_METADATA,
    )
    return sidecar, imds


@pytest.fixture
async def pods(
    start_sidecar: SidecarFactory, aiohttp_server: Any
) -> tuple[tuple[SidecarServer, NodeImds], tuple[SidecarServer, NodeImds]]:
    return (
        await pod_on(NODE_A, start_sidecar, aiohttp_server, "on-node-a"),
        await pod_on(NODE_B, start_sidecar, aiohttp_server, "on-node-b"),
    )


async def leaf(sidecar: SidecarServer, token: str, path: str) -> str:
    answer = await get(sidecar, "/latest/meta-data/" + path, token)
    assert answer.status == 200, path
    return answer.body


async def test_each_pod_reports_its_own_nodes_zone_and_instance(pods: Any) -> None:
    """Placement, instance, type and address are each pod's own node's, zone id included."""
    for (sidecar, _), node in zip(pods, (NODE_A, NODE_B), strict=True):
        token = await token_for(sidecar)
        assert await leaf(sidecar, token, "placement/availability-zone") == node.zone
        assert await leaf(sidecar, token, "placement/availability-zone-id") == node.zone_id
        assert await leaf(sidecar, token, "placement/region") == node.region
        assert await leaf(sidecar, token, "instance-id") == node.instance_id
        assert await leaf(sidecar, token, "instance-type") == node.instance_type
        assert await leaf(sidecar, token, "local-ipv4") == node.local_ipv4
        subnet = f"network/interfaces/macs/{node.mac}/subnet-id"
        assert await leaf(sidecar, token, subnet) == "subnet-0123456789abcdef0"
        assert await leaf(sidecar, token, "tags/instance/Name") == node.tags["Name"]


async def test_the_signed_identity_document_names_the_node(pods: Any, pki: Pki) -> None:
    """The broker-signed document carries each node's instance, type, zone and address, and
    still the task's own tenant and task id; it verifies against the broker's key."""
    for (sidecar, _), node in zip(pods, (NODE_A, NODE_B), strict=True):
        token = await token_for(sidecar)
        document = await get(sidecar, "/latest/dynamic/instance-identity/document", token)
        signature = await get(sidecar, "/latest/dynamic/instance-identity/signature", token)
        assert verify_document(pki.document_jwks, document.body, signature.body)
        facts = json.loads(document.body)
        assert (facts["instanceId"], facts["instanceType"]) == (
            node.instance_id,
            node.instance_type,
        )
        assert (facts["availabilityZone"], facts["region"], facts["privateIp"]) == (
            node.zone,
            node.region,
            node.local_ipv4,
        )
        assert facts["tenant"] == "acme"
        assert facts["accountId"] == "111111111111"  # the task's account, never the node's


async def test_listings_show_the_nodes_allowed_entries_and_nothing_else(pods: Any) -> None:
    """meta-data/ lists the task's entries and the node's allowed ones (network, tags, spot
    where the node has a notice), never iam's node side, public-keys or identity-credentials."""
    (sidecar_a, _), (sidecar_b, _) = pods
    listing_a = (await get(sidecar_a, "/latest/meta-data/")).body.split("\n")
    listing_b = (await get(sidecar_b, "/latest/meta-data/")).body.split("\n")
    assert {"network/", "tags/", "placement/", "iam/", "instance-id"} <= set(listing_a)
    assert "spot/" not in listing_a and "spot/" in listing_b
    for listing in (listing_a, listing_b):
        assert not {"public-keys/", "identity-credentials/", "user-data"} & set(listing)
    assert (await get(sidecar_a, "/latest/meta-data/iam/")).body == "info\nsecurity-credentials/"


async def test_the_nodes_spot_notice_passes_through_unchanged(pods: Any) -> None:
    """A spot interruption of the node reaches its pods as EC2 wrote it."""
    (sidecar_a, _), (sidecar_b, _) = pods
    notice = await get(sidecar_b, "/latest/meta-data/spot/instance-action")
    assert json.loads(notice.body) == NODE_B.spot_action
    assert (await get(sidecar_a, "/latest/meta-data/spot/instance-action")).status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/iam/security-credentials/node-role",
        "/latest/meta-data/iam/info",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/meta-data/public-keys/0/openssh-key",
        "/latest/user-data",
        "/latest/dynamic/instance-identity/signature",
    ],
)
async def test_the_nodes_secrets_are_never_asked_or_shown(pods: Any, path: str) -> None:
    """Whatever the allow-list, the node's role, keys, user-data and document never pass: the
    pod gets its own answer or a 404, and the node is never asked."""
    for sidecar, node_imds in pods:
        answer = await get(sidecar, path)
        assert SECRET_MARK not in answer.body
        secret = ("iam", "identity-credentials", "public-keys", "user-data", "dynamic")
        assert [p for p in node_imds.asked if any(word in p for word in secret)] == []


async def test_an_unreachable_node_leaves_the_tasks_own_view(
    start_sidecar: SidecarFactory,
) -> None:
    """With no node IMDS to ask, each field falls back to the task's view (the broker's zone)."""
    sidecar = await start_sidecar(
        "acme",
        "no-node",
        host_metadata_url="http://127.0.0.1:9",  # discard: nothing listens there
        host_metadata_allow=DEFAULT_NODE_METADATA,
    )
    token = await token_for(sidecar)
    assert await leaf(sidecar, token, "placement/availability-zone") == "us-east-1a"
    assert (await leaf(sidecar, token, "instance-id")).startswith("i-")
