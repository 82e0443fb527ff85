"""Role chaining into another account: the broker assumes the `via` role, then the tenant's role
with the first hop's credentials and the ExternalId; the local STS sees both calls at the proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.cli import main
from metaproxy.sidecar.server import SidecarServer
from metaproxy.testing.faultproxy import FaultProxy
from tests.support import (
    Pki,
    audit_records,
    broker_config,
    caller_identity,
    clean_aws_env,
    issue,
    sidecar_config,
    wait_ready,
)

HUB = "arn:aws:iam::111111111111:role/metaproxy-hub"
TARGET = "arn:aws:iam::333333333333:role/partner-reader"

CHAINED_POLICY = """
tenant = "partner"
team = "integrations"

[[identities]]
kind = "platform"
tenant = "partner"

[[roles]]
arn = "{target}"
default = true
apps = ["*"]
via = "{hub}"
external_id = "metaproxy-${{tenant}}"
duration_seconds = {duration}

[session]
name = "${{tenant}}.${{task}}"
tags = {{ team = "${{team}}", task = "${{task}}" }}
transitive_tag_keys = ["team"]

# end of policy
"""


def write_policy(directory: Path, duration: int = 3600) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "partner.toml").write_text(
        CHAINED_POLICY.format(target=TARGET, hub=HUB, duration=duration)
    )
    return directory


@pytest.fixture
async def proxy(sts_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(sts_url) as fault_proxy:
        yield fault_proxy


async def test_chained_cross_account_grant_assumes_via_then_the_role_with_its_credentials(
    tmp_path: Path, pki: Pki, proxy: FaultProxy, sts_url: str
) -> None:
    """Two AssumeRole calls at the proxy: the hub role signed by the broker, then the partner
    role with the ExternalId, signed with the hub session's key; boto3 gets the partner role,
    and the audit record names both hops."""
    policies = write_policy(tmp_path / "policies")
    broker = await BrokerServer.start(broker_config(tmp_path, pki, proxy.url, policies))
    sidecar: SidecarServer | None = None
    try:
        token_file = tmp_path / "partner.jwt"
        token_file.write_text(issue(pki, "sync-1", "partner"))
        sidecar = await SidecarServer.start(sidecar_config(tmp_path, pki, broker.url, token_file))
        await wait_ready(sidecar.admin_url)
        env = clean_aws_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=sidecar.imds_url + "/")
        identity = await caller_identity(sts_url, env)
    finally:
        if sidecar is not None:
            await sidecar.stop()
        await broker.aclose()

    assert identity["Arn"] == "arn:aws:sts::333333333333:assumed-role/partner-reader/partner.sync-1"
    first, second = proxy.assume_role_calls()
    assert first.params["RoleArn"] == HUB
    assert first.access_key_id == "testing"  # the broker's own key (moto's fake credentials)
    assert "ExternalId" not in first.params
    assert first.params["SourceIdentity"] == "partner.sync-1"
    assert first.tags() == {"team": "integrations", "task": "sync-1"}
    assert first.transitive_tag_keys() == ["team"]

    assert second.params["RoleArn"] == TARGET
    assert second.params["ExternalId"] == "metaproxy-partner"
    assert second.params["RoleSessionName"] == "partner.sync-1"
    assert second.params["DurationSeconds"] == "3600"
    # The transitive tag and SourceIdentity persist from the first session: not set again.
    assert second.tags() == {"task": "sync-1"}
    assert "SourceIdentity" not in second.params
    assert second.access_key_id.startswith("ASIA")
    assert second.access_key_id != first.access_key_id

    issued = [record for record in audit_records(tmp_path / "audit") if record["event"] == "issued"]
    assert len(issued) == 1
    assert issued[0]["role_arn"] == TARGET
    assert issued[0]["via_role_arn"] == HUB
    assert issued[0]["via_access_key_id"] == second.access_key_id
    assert issued[0]["source_identity"] == "partner.sync-1"


def test_policy_check_accepts_a_chained_role_at_an_hour_and_refuses_two(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`policy check`: a chained role at 3600 s is fine; at 7200 s it is refused, saying why."""
    assert main(["policy", "check", str(write_policy(tmp_path / "ok"))]) == 0
    assert capsys.readouterr().out == "ok: 1 tenants\n"

    assert main(["policy", "check", str(write_policy(tmp_path / "long", duration=7200))]) == 1
    out = capsys.readouterr().out
    assert "roles[0].duration_seconds: 7200 is over 3600" in out
    assert "AWS caps chained sessions at one hour" in out


def test_the_chain_is_part_of_the_cache_key() -> None:
    """The same role reached directly and through `via` are different cache entries."""
    from metaproxy.models import AssumeRoleSpec

    direct = AssumeRoleSpec(TARGET, "partner.t", "partner.t", 3600)
    chained = AssumeRoleSpec(
        TARGET, "partner.t", "partner.t", 3600, via=AssumeRoleSpec(HUB, "partner.t", "", 900)
    )
    assert direct.cache_key != chained.cache_key
