"""An unmodified AWS SDK gets its task's scoped role through sidecar → broker → STS."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from tests.conftest import SidecarFactory
from tests.support import caller_identity, clean_aws_env


async def test_boto3_through_imds_gets_the_tenants_role(
    start_sidecar: SidecarFactory, sts_url: str
) -> None:
    """boto3 with only AWS_EC2_METADATA_SERVICE_ENDPOINT set sees the tenant's assumed role."""
    sidecar = await start_sidecar("acme", "task-1")
    env = clean_aws_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=sidecar.imds_url + "/")
    identity = await caller_identity(sts_url, env)
    assert identity["Arn"] == "arn:aws:sts::111111111111:assumed-role/acme-app/acme.task-1"


async def test_boto3_through_container_credentials_gets_the_tenants_role(
    start_sidecar: SidecarFactory, sts_url: str
) -> None:
    """FULL_URI plus AUTHORIZATION_TOKEN_FILE works as ECS/EKS Pod Identity do."""
    sidecar = await start_sidecar("globex", "task-7")
    token_file = sidecar.state.config.authorization_token_file
    assert token_file is not None
    assert "\n" not in Path(token_file).read_text()
    env = clean_aws_env(
        AWS_CONTAINER_CREDENTIALS_FULL_URI=sidecar.container_url + "/v1/credentials",
        AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(token_file),
    )
    identity = await caller_identity(sts_url, env)
    assert identity["Arn"].startswith("arn:aws:sts::222222222222:assumed-role/globex-app/")
    assert "task-7" in identity["Arn"]


async def test_two_tenants_get_different_roles(start_sidecar: SidecarFactory, sts_url: str) -> None:
    """Tasks of two tenants, side by side, each see only their own role."""
    acme = await start_sidecar("acme", "a-1")
    globex = await start_sidecar("globex", "g-1")
    arns = []
    for sidecar in (acme, globex):
        env = clean_aws_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=sidecar.imds_url + "/")
        arns.append((await caller_identity(sts_url, env))["Arn"])
    assert ":assumed-role/acme-app/" in arns[0]
    assert ":assumed-role/globex-app/" in arns[1]


async def test_role_outside_policy_is_refused_and_audited(
    start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    """A role the policy does not allow: 403 at the broker, 404 at the sidecar path, audited."""
    sidecar = await start_sidecar("acme", "greedy-1", ready=False, role="globex-app")
    async with aiohttp.ClientSession() as session:
        async with session.put(
            sidecar.imds_url + "/latest/api/token",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
        ) as response:
            token = await response.text()
        headers = {"X-aws-ec2-metadata-token": token}
        async with session.get(
            sidecar.imds_url + "/latest/meta-data/iam/security-credentials/globex-app",
            headers=headers,
        ) as response:
            assert response.status in (404, 503)
        async with session.get(sidecar.admin_url + "/readyz") as response:
            assert response.status == 503
            assert "AccessDenied" in await response.text()  # the broker refusal, named
    records = [
        json.loads(line)
        for segment in sorted((tmp_path / "audit").glob("segment-*.jsonl"))
        for line in segment.read_text().splitlines()
    ]
    denied = [r for r in records if r["event"] == "denied" and r["task"] == "greedy-1"]
    assert denied, records
    assert denied[0]["status"] == 403
    assert denied[0]["tenant"] == "acme"
