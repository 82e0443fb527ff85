"""The sidecar ↔ broker contract: `POST /v1/credentials`, its errors, and what gets audited."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.demo.local import AUDIENCE, ISSUER
from metaproxy.errors import ConfigError
from tests.support import Pki, audit_records, broker_config, issue


async def post(
    https: aiohttp.ClientSession,
    broker: BrokerServer,
    token: str | None,
    body: Any = None,
    **kwargs: Any,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with https.post(
        broker.url + "/v1/credentials",
        json={} if body is None else body,
        headers=headers,
        **kwargs,
    ) as response:
        return response.status, await response.json(), dict(response.headers)


async def test_issues_credentials_role_metadata_and_limits(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """A valid identity gets credentials, its role, a metadata view and its sidecar limits."""
    status, body, headers = await post(https, broker, issue(pki, "t-1", "acme"))
    assert status == 200
    assert body["role_arn"] == "arn:aws:iam::111111111111:role/acme-app"
    assert body["role_name"] == "acme-app"
    assert set(body["credentials"]) >= {
        "access_key_id",
        "secret_access_key",
        "session_token",
        "expiration",
    }
    assert body["metadata"]["instance_id"].startswith("i-")
    assert "identity_document" in body["metadata"]
    assert body["limits"]["credentials_rps"] > 0
    assert headers["Cache-Control"] == "no-store"


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(claims)}."


def _forged(pki: Pki, tmp_path: Path) -> str:
    """Signed by a key the broker does not trust, under the trusted key's kid."""
    from metaproxy.identity.keys import generate_keypair

    other_key, _ = generate_keypair(tmp_path, "attacker")
    token = issue(pki, "t-1", "acme")
    forged = issue_with(other_key, "t-1", "acme")
    head = token.split(".")[0]
    return ".".join([head, *forged.split(".")[1:]])


def issue_with(key: Path, task: str, tenant: str, **kwargs: Any) -> str:
    from metaproxy.identity.issue import issue_token

    return issue_token(
        key,
        issuer=kwargs.pop("issuer", ISSUER),
        audience=kwargs.pop("audience", AUDIENCE),
        task=task,
        tenant=tenant,
        **kwargs,
    )


BAD_TOKENS: dict[str, Callable[[Pki, Path], str | None]] = {  # None: no Authorization
    "forged": _forged,
    "expired": lambda pki, tmp: issue(pki, "t-1", "acme", ttl=60, now=1_000_000_000),
    "other-audience": lambda pki, tmp: issue_with(
        pki.identity_key, "t-1", "acme", audience="someone-else"
    ),
    "other-issuer": lambda pki, tmp: issue_with(
        pki.identity_key, "t-1", "acme", issuer="evil-platform"
    ),
    "alg-none": lambda pki, tmp: _unsigned(
        {"alg": "none", "typ": "JWT"},
        {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "task:acme/t-1",
            "task": "t-1",
            "tenant": "acme",
            "exp": 4_000_000_000,
            "iat": 1_700_000_000,
        },
    ),
    "garbage": lambda pki, tmp: "not-a-token",
    "missing": lambda pki, tmp: None,
}


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_bad_identity_is_401_audited_and_broker_keeps_serving(
    kind: str, broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki, tmp_path: Path
) -> None:
    """Forged, expired, wrong audience/issuer, alg none: 401, audited, then a good one works."""
    token = BAD_TOKENS[kind](pki, tmp_path)
    status, body, _ = await post(https, broker, token)
    assert status == 401
    assert body["code"] == "Unauthenticated"
    assert body["request_id"]
    if token:
        assert token not in json.dumps(body)
    denied = [r for r in audit_records(tmp_path / "audit") if r["request_id"] == body["request_id"]]
    assert len(denied) == 1
    assert denied[0]["event"] == "denied"
    assert denied[0]["status"] == 401
    status, _, _ = await post(https, broker, issue(pki, "t-2", "acme"))
    assert status == 200


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ({"role": None, "env": {"PATH": None}}, "application/json"),
        ({"role": 7}, "application/json"),
        ({"refresh": "yes"}, "application/json"),
        (["role"], "application/json"),
        ("{not json", "application/json"),
        ('{"role": "acme-app"}', "text/plain"),
    ],
    ids=[
        "unknown-key",
        "role-not-string",
        "refresh-not-bool",
        "not-object",
        "bad-json",
        "wrong-content-type",
    ],
)
async def test_bad_request_bodies_are_400(
    body: Any, content_type: str, broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """Malformed bodies are a clear 400, never a 500 (the PATH=null lesson)."""
    data = body if isinstance(body, str) else json.dumps(body)
    async with https.post(
        broker.url + "/v1/credentials",
        data=data,
        headers={
            "Authorization": f"Bearer {issue(pki, 't', 'acme')}",
            "Content-Type": content_type,
        },
    ) as response:
        assert response.status == 400
        answer = await response.json()
    assert set(answer) == {"code", "message", "request_id"}


async def test_role_outside_policy_is_403_and_audited(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki, tmp_path: Path
) -> None:
    """Asking for another tenant's role is denied by policy and the denial is audited."""
    status, body, _ = await post(https, broker, issue(pki, "t-9", "acme"), {"role": "globex-app"})
    assert status == 403
    assert body["code"] == "AccessDenied"
    assert body["message"] == "denied by policy"  # the reason goes to the audit log only
    (record,) = [
        r for r in audit_records(tmp_path / "audit") if r["request_id"] == body["request_id"]
    ]
    assert record["event"] == "denied"
    assert record["reason"]


async def test_broker_refuses_to_start_on_a_bad_policy(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> None:
    """A policy with a malformed role ARN stops the broker with file, line and field."""
    acme = policies_dir / "acme.toml"
    acme.write_text(
        acme.read_text().replace(
            '\narn = "arn:aws:iam::111111111111:role/acme-app"',
            '\narn = "arn:aws:iam::1111:role/acme-app"',
            1,
        )
    )
    with pytest.raises(ConfigError) as caught:
        await BrokerServer.start(broker_config(tmp_path, pki, sts_url, policies_dir))
    message = str(caught.value.detail)
    assert "acme.toml:" in message
    assert "roles[0].arn" in message


async def test_broker_command_exits_with_the_policy_problem(
    tmp_path: Path, pki: Pki, policies_dir: Path
) -> None:
    """`metaproxy broker` on an invalid policy exits 2 printing file:line: field: message."""
    import sys

    from tests.support import run_command

    acme = policies_dir / "acme.toml"
    acme.write_text(acme.read_text().replace('\nteam = "payments"', "\nteam = null", 1))
    rc, _, err = await run_command(
        sys.executable,
        "-m",
        "metaproxy",
        "broker",
        "--policies-dir",
        str(policies_dir),
        "--trust",
        f"{ISSUER},{AUDIENCE},{pki.jwks}",
        "--audit-dir",
        str(tmp_path / "audit"),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        env={"PATH": "/usr/bin:/bin"},
        timeout=30,
    )
    assert rc == 2
    assert "acme.toml:" in err
    assert "team" in err
