"""AWS attestation against moto's STS: an ECS task's sidecar proves its task role with a signed
GetCallerIdentity and gets its tenant's scoped role; a signed call replayed late, meant for
another broker, or altered is refused (401, audited) and never reaches STS.

The ECS agent is stood in for by a small server on loopback that serves one task role's
credentials (moto's AssumeRole answer) the way the agent does at its FULL_URI, Authorization
token and all. A fault proxy in front of moto counts every request each key signed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import boto3
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from metaproxy.aws_attestation import (
    AUDIENCE_HEADER,
    FORM_CONTENT_TYPE,
    SignedCall,
    decode,
    encode,
    sign_attestation,
)
from metaproxy.broker.server import BrokerServer
from metaproxy.demo.processes import start_metaproxy
from metaproxy.sidecar.attest import AwsAttestation
from metaproxy.sidecar.config import SidecarConfig
from metaproxy.sidecar.process import Sidecar
from metaproxy.sigv4 import TIMESTAMP_FORMAT, SigV4Signer
from metaproxy.testing.faultproxy import FaultProxy
from metaproxy.testing.faults import STS_ERROR_XML
from tests.conftest import ISSUED_SECRETS, record_broker_secrets
from tests.support import (
    Pki,
    audit_records,
    broker_config,
    clean_aws_env,
    sidecar_config,
    wait_ready,
)

ACCOUNT = "123456789012"
TASK_ROLE = f"arn:aws:iam::{ACCOUNT}:role/orders-task"
AUDIENCE = "metaproxy-test-broker"
MAX_AGE = 60.0
AWS_IDENTITY = '\n[[identities]]\nkind = "aws"\ntenant = "acme"\napps = ["orders"]\n'


class TaskRole(NamedTuple):
    """The task role's credentials as ECS's agent holds them, and the ARN STS will name."""

    access_key: str
    secret_key: str
    token: str
    expiration: str
    arn: str
    task_id: str


class EcsAgent:
    """ECS's agent for one task: its role's credentials at one path, for one token."""

    def __init__(self, role: TaskRole) -> None:
        self.role = role
        self.path = f"/v2/credentials/{secrets.token_hex(16)}"
        self.token = secrets.token_urlsafe(24)
        self.served = 0
        self.refused = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _credentials(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != self.token:
            self.refused += 1
            return web.json_response({"code": "AccessDenied", "message": "no"}, status=401)
        self.served += 1
        return web.json_response(
            {
                "RoleArn": TASK_ROLE,
                "AccessKeyId": self.role.access_key,
                "SecretAccessKey": self.role.secret_key,
                "Token": self.role.token,
                "Expiration": self.role.expiration,
            }
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(self.path, self._credentials)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}{self.path}"

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class NodeImds:
    """A node's IMDSv2 for one instance profile: a token first, then the role, then its keys."""

    def __init__(self, role: TaskRole, role_name: str) -> None:
        self.role, self.role_name = role, role_name
        self.token = secrets.token_urlsafe(24)
        self.asked: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _token(self, request: web.Request) -> web.Response:
        self.asked.append("token")
        return web.Response(text=self.token)

    async def _credentials(self, request: web.Request) -> web.Response:
        tail = request.match_info["tail"]
        self.asked.append(tail or "/")
        if request.headers.get("X-aws-ec2-metadata-token") != self.token:
            return web.Response(status=401)
        if not tail:
            return web.Response(text=self.role_name)
        if tail != self.role_name:
            return web.Response(status=404)
        return web.json_response(
            {
                "Code": "Success",
                "AccessKeyId": self.role.access_key,
                "SecretAccessKey": self.role.secret_key,
                "Token": self.role.token,
                "Expiration": self.role.expiration,
            }
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_put("/latest/api/token", self._token)
        app.router.add_get(
            "/latest/meta-data/iam/security-credentials/{tail:.*}", self._credentials
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def assume_task_role(sts_url: str, session: str = "") -> TaskRole:
    """What ECS's agent would hold for a task: the task role, its session named by task ID."""
    task_id = session or secrets.token_hex(16)
    answer = boto3.client("sts", endpoint_url=sts_url).assume_role(
        RoleArn=TASK_ROLE, RoleSessionName=task_id
    )
    credentials = answer["Credentials"]
    return TaskRole(
        credentials["AccessKeyId"],
        credentials["SecretAccessKey"],
        credentials["SessionToken"],
        credentials["Expiration"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        answer["AssumedRoleUser"]["Arn"],
        task_id,
    )


def attestation(**arguments: Any) -> str:
    """A signed call as a token, which the secret scan looks for too: it carries the session
    token, base64-encoded, where a search for the session token alone would not find it."""
    token = sign_attestation(**arguments)
    ISSUED_SECRETS.add(token)
    return token


class Stack(NamedTuple):
    broker: BrokerServer
    proxy: FaultProxy
    role: TaskRole
    audit_dir: Path


@pytest.fixture
async def stack(tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path) -> AsyncIterator[Stack]:
    """A broker that trusts AWS attestations for `AUDIENCE` and no token issuer, with STS
    behind a fault proxy."""
    role = await asyncio.to_thread(assume_task_role, sts_url)
    # The secret scan looks for the attestation credentials in every log, audit and store file.
    ISSUED_SECRETS.update([role.secret_key, role.token])
    acme = policies_dir / "acme.toml"
    text = acme.read_text()
    acme.write_text(text.replace("# end of policy\n", AWS_IDENTITY + "# end of policy\n"))
    async with FaultProxy(sts_url) as proxy:
        config = broker_config(
            tmp_path,
            pki,
            proxy.url,
            policies_dir,
            aws_attest_audience=AUDIENCE,
            aws_attest_rules=(f"{ACCOUNT}:orders-task:acme:orders",),
            aws_attest_max_age=MAX_AGE,
            trusted_issuers=(),
        )
        broker = await BrokerServer.start(config)
        try:
            yield Stack(broker, proxy, role, tmp_path / "audit")
        finally:
            record_broker_secrets(broker)
            await broker.aclose()


def signed_by_task_role(stack: Stack, **overrides: Any) -> str:
    return attestation(
        url=overrides.get("url", stack.proxy.url),
        region="us-east-1",
        audience=overrides.get("audience", AUDIENCE),
        credentials=stack.role,
        now=overrides.get("now"),
    )


def calls_signed_by(proxy: FaultProxy, access_key: str) -> int:
    return sum(1 for request in proxy.recorded_requests() if request.access_key_id == access_key)


async def test_an_ecs_task_attests_and_gets_its_tenants_scoped_role(
    stack: Stack, pki: Pki, tmp_path: Path
) -> None:
    """A sidecar with only ECS's credentials endpoint attests; the app gets acme's role for
    the task, and the audit record names the attested ARN."""
    agent = EcsAgent(stack.role)
    await agent.start()
    token_file = tmp_path / "ecs-agent.token"
    token_file.write_text(agent.token)
    auth_file = tmp_path / "app.auth"
    args = ["sidecar", "--broker-url", stack.broker.url, "--broker-ca-file", str(pki.ca)]
    args += ["--identity-source", "aws-ecs", "--aws-attest-audience", AUDIENCE]
    args += ["--aws-attest-sts-endpoint", stack.proxy.url, "--aws-attest-region", "us-east-1"]
    args += ["--imds-listen", "127.0.0.1:0", "--container-listen", "127.0.0.1:0"]
    args += ["--admin-listen", "127.0.0.1:0", "--authorization-token-file", str(auth_file)]
    # Only what ECS's agent gives a container; no AWS credentials of any other kind.
    env = clean_aws_env(
        AWS_ACCESS_KEY_ID="",
        AWS_SECRET_ACCESS_KEY="",
        AWS_CONTAINER_CREDENTIALS_FULL_URI=agent.url,
        AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(token_file),
    )
    child = await asyncio.to_thread(
        start_metaproxy,
        "sidecar",
        args,
        ready_file=tmp_path / "sidecar.ready",
        log_file=tmp_path / "sidecar.log",
        env=env,
    )
    try:
        await wait_ready(child.ready["admin_url"])
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                child.ready["container_urls"][0] + "/v1/credentials",
                headers={"Authorization": auth_file.read_text()},
            ) as response,
        ):
            assert response.status == 200
            served = await response.json()
    finally:
        await asyncio.to_thread(child.stop)
        await agent.aclose()
    assert agent.served >= 1 and agent.refused == 0
    # The app got the broker's credentials for acme's role, not the task role's own.
    assert served["AccessKeyId"] != stack.role.access_key
    assert stack.role.secret_key not in json.dumps(served)
    ISSUED_SECRETS.update([served["SecretAccessKey"], served["Token"]])
    assume_roles = stack.proxy.assume_role_calls()
    assert [(c.params["RoleArn"], c.params["RoleSessionName"]) for c in assume_roles] == [
        ("arn:aws:iam::111111111111:role/acme-app", f"acme.{stack.role.task_id}")
    ]
    assert calls_signed_by(stack.proxy, stack.role.access_key) >= 1  # the GetCallerIdentity
    issued = [r for r in audit_records(stack.audit_dir) if r["event"] == "issued"]
    assert [(r["subject"], r["tenant"], r["task"], r["issuer"]) for r in issued] == [
        (stack.role.arn, "acme", stack.role.task_id, f"aws:{ACCOUNT}")
    ]
    assert issued[0]["token_id"] == stack.role.access_key  # joins CloudTrail's record


async def test_an_ec2_node_attests_with_its_instance_profile_through_imds_v2(
    stack: Stack, sts_url: str, https: aiohttp.ClientSession
) -> None:
    """--identity-source aws-ec2: the node's IMDSv2 gives the instance profile's keys; the task
    is the instance ID STS names as the session."""
    instance = "i-0123456789abcdef0"
    node_role = await asyncio.to_thread(assume_task_role, sts_url, instance)
    ISSUED_SECRETS.update([node_role.secret_key, node_role.token])
    imds = NodeImds(node_role, "orders-task")
    await imds.start()
    config = SidecarConfig(
        identity_source="aws-ec2",
        aws_attest_audience=AUDIENCE,
        aws_attest_sts_endpoint=stack.proxy.url,
        aws_credentials_url=imds.url,
    )
    signer = AwsAttestation(config)
    try:
        first, second = await signer.token(), await signer.token()
        ISSUED_SECRETS.update([first, second])
    finally:
        await signer.aclose()
        await imds.aclose()
    assert decode(first).headers["X-Metaproxy-Audience"] == AUDIENCE
    assert imds.asked == ["token", "/", "orders-task"]  # keys fetched once, held until expiry
    status, body = await post(https, stack.broker, second)
    assert status == 200, body
    assert (body["tenant"], body["task"]) == ("acme", instance)


async def test_a_sidecar_the_agent_refuses_says_so_without_the_agents_path(
    stack: Stack, pki: Pki, tmp_path: Path
) -> None:
    """No Authorization token for ECS's agent: /readyz names attestation and the agent's host,
    never its credentials path (the task's secret)."""
    agent = EcsAgent(stack.role)
    await agent.start()
    config = sidecar_config(
        tmp_path,
        pki,
        stack.broker.url,
        tmp_path / "unused.jwt",
        identity_source="aws-ecs",
        aws_attest_audience=AUDIENCE,
        aws_attest_sts_endpoint=stack.proxy.url,
        aws_credentials_url=agent.url,
    )
    sidecar = Sidecar(config)
    await sidecar.start()
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            async with (
                aiohttp.ClientSession() as session,
                session.get(sidecar.admin_url + "/readyz") as response,
            ):
                status, text = response.status, (await response.text()).strip()
            if "attestation" in text or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
    finally:
        await sidecar.aclose()
        await agent.aclose()
    assert (status, text) == (
        503,
        "not ready: AWS attestation unusable: the platform's credentials at 127.0.0.1 answered 401",
    )
    assert agent.refused >= 1 and agent.served == 0
    assert calls_signed_by(stack.proxy, stack.role.access_key) == 0


async def post(https: aiohttp.ClientSession, broker: BrokerServer, token: str) -> tuple[int, Any]:
    async with https.post(
        broker.url + "/v1/credentials",
        json={},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        return response.status, await response.json()


async def test_a_fresh_attestation_is_forwarded_once_and_issued(
    stack: Stack, https: aiohttp.ClientSession
) -> None:
    """The control for the refusals below: a fresh signed call reaches STS once and is served."""
    status, body = await post(https, stack.broker, signed_by_task_role(stack))
    assert status == 200, body
    assert (body["tenant"], body["task"]) == ("acme", stack.role.task_id)
    assert calls_signed_by(stack.proxy, stack.role.access_key) == 1


async def attestation_counts(
    https: aiohttp.ClientSession, broker: BrokerServer
) -> dict[str, float]:
    """`result/reason` -> value of metaproxy_broker_aws_attestations_total, as scraped."""
    async with https.get(broker.admin_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        f"{sample.labels['result']}/{sample.labels['reason']}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "metaproxy_broker_aws_attestations_total"
    }


async def test_the_broker_counts_attestations_by_result_and_reason(
    stack: Stack, https: aiohttp.ClientSession
) -> None:
    """One good attestation and one replayed too late: /metrics counts 1 ok and 1 refused as
    expired, every other reason at 0."""
    before = await attestation_counts(https, stack.broker)
    assert before and set(before.values()) == {0.0}
    late = datetime.now(UTC) - timedelta(seconds=MAX_AGE + 30)
    answers = [
        await post(https, stack.broker, token)
        for token in (signed_by_task_role(stack), signed_by_task_role(stack, now=late))
    ]
    assert [status for status, _body in answers] == [200, 401]
    after = await attestation_counts(https, stack.broker)
    assert {key: value for key, value in after.items() if value} == {
        "ok/": 1.0,
        "refused/expired": 1.0,
    }
    assert {"unavailable/", "refused/wrong_audience", "refused/bad_signature"} <= set(after)


def altered(token: str, *, body: bytes | None = None, **headers: str) -> str:
    call = decode(token)
    changed = {**call.headers, **{k.replace("_", "-"): v for k, v in headers.items()}}
    token = encode(SignedCall(call.url, changed, call.body if body is None else body))
    ISSUED_SECRETS.add(token)
    return token


REFUSALS: dict[str, tuple[Callable[[Stack], str], str]] = {
    "replayed-after-the-bound": (
        lambda s: signed_by_task_role(s, now=datetime.now(UTC) - timedelta(seconds=MAX_AGE + 30)),
        "expired",
    ),
    "meant-for-another-broker": (
        lambda s: signed_by_task_role(s, audience="another-broker"),
        "wrong_audience",
    ),
    "signed-for-another-sts": (
        lambda s: signed_by_task_role(s, url="https://sts.us-east-1.amazonaws.com"),
        "wrong_audience",
    ),
    "action-rewritten-to-assume-role": (
        lambda s: altered(
            signed_by_task_role(s),
            body=b"Action=AssumeRole&Version=2011-06-15&RoleArn=arn:aws:iam::1:role/x",
        ),
        "invalid_claims",
    ),
    "host-rewritten": (
        lambda s: altered(signed_by_task_role(s), Host="sts.amazonaws.com"),
        "wrong_audience",
    ),
    "unsigned-header-added": (
        lambda s: altered(signed_by_task_role(s), X_Forwarded_For="10.0.0.1"),
        "malformed",
    ),
}


@pytest.mark.parametrize("how", list(REFUSALS))
async def test_a_replayed_misdirected_or_altered_attestation_is_refused_and_never_forwarded(
    how: str, stack: Stack, https: aiohttp.ClientSession
) -> None:
    """401 with the check's reason, one `denied` record, and no request of that key at STS."""
    make, reason = REFUSALS[how]
    token = make(stack)
    status, body = await post(https, stack.broker, token)
    assert (status, body["reason"]) == (401, reason), body
    records = [r for r in audit_records(stack.audit_dir) if r["request_id"] == body["request_id"]]
    assert [(r["event"], r["status"], r["rule"]) for r in records] == [
        ("denied", 401, "authentication")
    ]
    assert "AWS attestation" in records[0]["reason"]
    assert token not in json.dumps(records)
    assert calls_signed_by(stack.proxy, stack.role.access_key) == 0
    assert stack.broker.attestor is not None and stack.broker.attestor.forwarded == 0


class SignatureCheckingSts:
    """What moto does not do and STS does: check each request's SigV4 signature against the
    signer's secret, answering SignatureDoesNotMatch when it fails, and passing it to moto
    when it holds. It knows the one secret of the task role under test."""

    def __init__(self, upstream: str, role: TaskRole) -> None:
        self.upstream, self.role = upstream, role
        self.checked = 0
        self.refused = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    def _signature_holds(self, request: web.Request, body: bytes) -> bool:
        received = request.headers.get("Authorization", "")
        signed_at = datetime.strptime(request.headers["X-Amz-Date"], TIMESTAMP_FORMAT)
        keys = self.role._replace(token=request.headers.get("X-Amz-Security-Token", ""))
        expected = SigV4Signer("sts", "us-east-1").sign(
            url=f"http://{request.headers['Host']}/",
            body=body,
            content_type=request.headers["Content-Type"],
            credentials=keys,
            now=signed_at.replace(tzinfo=UTC),
            extra_headers={AUDIENCE_HEADER: request.headers.get(AUDIENCE_HEADER, "")},
        )
        return received == expected["Authorization"]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.checked += 1
        if not self._signature_holds(request, body):
            self.refused += 1
            error = STS_ERROR_XML.format(
                type="Sender",
                code="SignatureDoesNotMatch",
                message="The request signature we calculated does not match",
                request_id="r-1",
            )
            return web.Response(status=403, text=error, content_type="text/xml")
        assert self._session is not None
        headers = {
            "Content-Type": FORM_CONTENT_TYPE,
            **{
                name: value
                for name, value in request.headers.items()
                if name.lower().startswith("x-amz") or name.lower() == "authorization"
            },
        }
        async with self._session.post(self.upstream + "/", data=body, headers=headers) as answer:
            return web.Response(status=answer.status, body=await answer.read())

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


async def test_a_part_changed_after_signing_that_only_sts_can_see_is_refused_by_sts(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path, https: aiohttp.ClientSession
) -> None:
    """A call signed for another broker whose audience header is then rewritten to ours passes
    every check the broker can make; STS finds its signature wrong, and that is a 401
    (bad_signature, audited with STS's code), as is a swapped session token."""
    role = await asyncio.to_thread(assume_task_role, sts_url)
    ISSUED_SECRETS.update([role.secret_key, role.token])
    acme = policies_dir / "acme.toml"
    acme.write_text(
        acme.read_text().replace("# end of policy\n", AWS_IDENTITY + "# end of policy\n")
    )
    checking = SignatureCheckingSts(sts_url, role)
    await checking.start()
    config = broker_config(
        tmp_path,
        pki,
        sts_url,
        policies_dir,
        aws_attest_audience=AUDIENCE,
        aws_attest_sts_endpoint=checking.url,
        aws_attest_rules=(f"{ACCOUNT}:orders-task:acme:orders",),
    )
    broker = await BrokerServer.start(config)

    def sign(audience: str) -> str:
        return attestation(
            url=checking.url, region="us-east-1", audience=audience, credentials=role
        )

    try:
        good = sign(AUDIENCE)
        rewritten = altered(sign("another-broker"), X_Metaproxy_Audience=AUDIENCE)
        swapped = altered(good, X_Amz_Security_Token=role.token[:-4] + "AAAA")
        answers = [await post(https, broker, token) for token in (good, rewritten, swapped)]
    finally:
        record_broker_secrets(broker)
        await broker.aclose()
        await checking.aclose()
    assert [(status, body.get("reason")) for status, body in answers] == [
        (200, None),
        (401, "bad_signature"),
        (401, "bad_signature"),
    ]
    assert (checking.checked, checking.refused) == (3, 2)
    # The first refusal is its own record; the same refusal again from the same peer within the
    # minute is counted in a summary record (broker/authn.py), written by the time it closes.
    reason = "AWS attestation refused by STS: SignatureDoesNotMatch"
    denied = [r for r in audit_records(tmp_path / "audit") if r["event"] == "denied"]
    assert [(r["request_id"], r["reason"], r.get("count")) for r in denied] == [
        (answers[1][1]["request_id"], reason, None),
        (denied[1]["request_id"], f"{reason} (repeated)", 1),
    ]
