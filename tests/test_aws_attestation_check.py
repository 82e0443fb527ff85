"""What the broker checks of a signed GetCallerIdentity before STS sees it, and how the ARN STS
answers with becomes a tenant, app and task: pure checks, no network."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from hypothesis import given, settings
from hypothesis import strategies as st

from metaproxy.aws_attestation import (
    AUDIENCE_HEADER,
    FORM_CONTENT_TYPE,
    GET_CALLER_IDENTITY,
    TOKEN_PREFIX,
    SignedCall,
    decode,
    encode,
    sign_attestation,
)
from metaproxy.broker.attest.check import Expected, check_call
from metaproxy.broker.attest.rules import AttestRule, attested_identity, parse_rule
from metaproxy.errors import ConfigError, Unauthenticated
from metaproxy.models import Identity

STS = "https://sts.eu-west-1.amazonaws.com"
NOW = datetime(2026, 12, 6, 1, 0, 0, tzinfo=UTC)
EXPECTED = Expected(STS, "eu-west-1", "metaproxy-prod", 300.0)
ARN = "arn:aws:sts::123456789012:assumed-role/orders-task/0f1e2d3c4b5a69788796a5b4c3d2e1f0"


class Keys(NamedTuple):
    access_key: str = "ASIAEXAMPLEKEY123456"
    secret_key: str = "attestation-secret-never-leaves-the-sidecar"
    token: str = "attestation-session-token-example"


def signed(*, at: datetime = NOW, audience: str = "metaproxy-prod", **kwargs: str) -> SignedCall:
    token = sign_attestation(
        url=kwargs.get("url", STS),
        region=kwargs.get("region", "eu-west-1"),
        audience=audience,
        credentials=Keys(),
        now=at,
    )
    return decode(token)


def with_headers(call: SignedCall, **changes: str | None) -> SignedCall:
    headers = dict(call.headers)
    for key, value in changes.items():
        name = key.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return SignedCall(call.url, headers, call.body)


def test_a_call_signed_for_this_broker_now_passes() -> None:
    """Signed for our STS endpoint, region and audience, just now: forwarded as signed."""
    call = signed()
    checked = check_call(call, EXPECTED, NOW + timedelta(seconds=5))
    assert checked.access_key_id == Keys().access_key
    assert checked.signed_at == NOW
    assert checked.headers["x-metaproxy-audience"] == "metaproxy-prod"
    assert checked.headers["host"] == "sts.eu-west-1.amazonaws.com"


def test_our_signature_is_botocores_with_the_audience_header() -> None:
    """The sidecar's signed GetCallerIdentity is the one botocore's signer makes."""
    call = signed()
    request = AWSRequest(
        "POST",
        STS + "/",
        data=GET_CALLER_IDENTITY,
        headers={"Content-Type": FORM_CONTENT_TYPE, AUDIENCE_HEADER: "metaproxy-prod"},
    )
    keys = Keys()
    with mock.patch(
        "botocore.auth.get_current_datetime", lambda *args, **kwargs: NOW.replace(tzinfo=None)
    ):
        SigV4Auth(
            ReadOnlyCredentials(keys.access_key, keys.secret_key, keys.token), "sts", "eu-west-1"
        ).add_auth(request)
    assert call.headers["Authorization"] == request.headers["Authorization"]


def refused(call: SignedCall, now: datetime = NOW) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        check_call(call, EXPECTED, now)
    return caught.value


ALTERED: dict[str, tuple[Callable[[], SignedCall], str, str]] = {
    "another-sts-endpoint": (
        lambda: signed(url="https://sts.us-east-1.amazonaws.com"),
        "wrong_audience",
        "another STS endpoint",
    ),
    "host-changed": (
        lambda: with_headers(signed(), Host="attacker.example"),
        "wrong_audience",
        "another host",
    ),
    "another-region": (lambda: signed(region="us-east-1"), "wrong_audience", "region"),
    "another-audience": (
        lambda: signed(audience="another-broker"),
        "wrong_audience",
        "another audience",
    ),
    "audience-header-dropped": (
        lambda: with_headers(signed(), X_Metaproxy_Audience=None),
        "malformed",
        "exactly the headers",
    ),
    "unsigned-header-added": (
        lambda: with_headers(signed(), X_Amz_Target="sts.AssumeRole"),
        "malformed",
        "not accepted",
    ),
    "body-calls-assume-role": (
        lambda: SignedCall(STS, signed().headers, b"Action=AssumeRole&Version=2011-06-15"),
        "invalid_claims",
        "other than GetCallerIdentity",
    ),
    "body-adds-a-parameter": (
        lambda: SignedCall(STS, signed().headers, GET_CALLER_IDENTITY + b"&RoleArn=x"),
        "invalid_claims",
        "other than GetCallerIdentity",
    ),
    "date-changed-out-of-scope": (
        lambda: with_headers(signed(), X_Amz_Date="20261207T010000Z"),
        "malformed",
        "scope date",
    ),
    "no-authorization": (
        lambda: with_headers(signed(), Authorization=None),
        "malformed",
        "Authorization",
    ),
    "signed-headers-without-audience": (
        lambda: with_headers(
            with_headers(signed(), X_Metaproxy_Audience=None),
            Authorization=signed().headers["Authorization"].replace(";x-metaproxy-audience", ""),
        ),
        "malformed",
        "does not sign x-metaproxy-audience",
    ),
}


@pytest.mark.parametrize("alteration", list(ALTERED))
def test_a_call_altered_in_a_signed_part_is_refused(alteration: str) -> None:
    """Each signed part that names where, what or for whom is checked before any forwarding."""
    make, reason, words = ALTERED[alteration]
    error = refused(make())
    assert (error.reason, words in error.detail) == (reason, True), error.detail


def test_a_call_older_than_the_bound_is_refused_as_expired() -> None:
    """A signature from 301 s ago with a 300 s bound is a replay."""
    error = refused(signed(), NOW + timedelta(seconds=301))
    assert error.reason == "expired"


def test_a_call_signed_in_the_future_is_refused() -> None:
    """A sidecar clock more than a minute ahead cannot sign for later."""
    error = refused(signed(at=NOW + timedelta(minutes=5)))
    assert error.reason == "not_yet_valid"


@pytest.mark.parametrize(
    "token",
    [
        TOKEN_PREFIX + "not base64 !",
        TOKEN_PREFIX + "e30",  # {}
        TOKEN_PREFIX + "x" * 8_001,
        encode(SignedCall(STS, {"Host": "h"}, b"x" * 300)),
        encode(SignedCall(STS, {f"X-H-{n}": "v" for n in range(20)}, GET_CALLER_IDENTITY)),
        encode(SignedCall(STS, {"Host": "a\nb"}, GET_CALLER_IDENTITY)),
    ],
    ids=["not-base64", "no-fields", "too-long", "body-too-large", "too-many-headers", "newline"],
)
def test_a_token_not_shaped_like_a_signed_call_does_not_decode(token: str) -> None:
    """Anything but a bounded object of url, printable headers and a small body is refused."""
    with pytest.raises(ValueError, match=r"^[^=]*$"):  # the message quotes nothing of it
        decode(token)


def test_the_signed_calls_repr_holds_no_session_token() -> None:
    """The session token rides in the headers; repr leaves them out."""
    assert Keys().token not in repr(signed())


RULES = [
    parse_rule("123456789012:orders-task:acme:orders"),
    parse_rule("123456789012:batch-*:acme"),
    parse_rule("210987654321:*:globex"),
]


def identity_for(arn: str, account: str = "123456789012") -> Identity:
    return attested_identity(arn, account, RULES, access_key_id="ASIAX", expires_at=1.0)


def test_an_exact_rule_maps_role_to_tenant_and_app_and_session_to_task() -> None:
    """ECS's session name is the task ID: it becomes the task."""
    identity = attested_identity(ARN, "123456789012", RULES, access_key_id="ASIAX", expires_at=1)
    assert (identity.kind, identity.tenant, identity.app, identity.task, identity.subject) == (
        "aws",
        "acme",
        "orders",
        "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
        ARN,
    )
    assert identity.issuer == "aws:123456789012"


def test_a_prefix_rule_takes_the_role_name_as_app() -> None:
    """`batch-*` with no APP: the app is the role's name."""
    identity = attested_identity(
        "arn:aws:sts::123456789012:assumed-role/batch-nightly/i-0abc1234def567890",
        "123456789012",
        RULES,
        access_key_id="ASIAX",
        expires_at=1,
    )
    assert (identity.tenant, identity.app, identity.task) == (
        "acme",
        "batch-nightly",
        "i-0abc1234def567890",
    )


@pytest.mark.parametrize(
    ("arn", "account", "words"),
    [
        ("arn:aws:iam::123456789012:user/alice", "123456789012", "not by an assumed role"),
        ("arn:aws:sts::123456789012:assumed-role/other/t1", "123456789012", "matches no rule"),
        ("arn:aws:sts::999999999999:assumed-role/orders-task/t1", "999999999999", "no rule"),
        (ARN, "210987654321", "two accounts"),
        ("arn:aws:sts::123456789012:assumed-role/orders-task/.hidden", "123456789012", "session"),
        ("arn:aws:sts::123456789012:assumed-role/orders-task/a/b", "123456789012", "assumed"),
    ],
    ids=[
        "iam-user",
        "unmapped-role",
        "unmapped-account",
        "account-mismatch",
        "bad-session",
        "path",
    ],
)
def test_an_arn_no_rule_places_is_refused(arn: str, account: str, words: str) -> None:
    """Users, unmapped roles and accounts, and names unfit for templates are 401s."""
    with pytest.raises(Unauthenticated) as caught:
        identity_for(arn, account)
    assert words in caught.value.detail


@pytest.mark.parametrize(
    "spec",
    [
        "12345:orders:acme",
        "123456789012:orders",
        "123456789012:or/ders:acme",
        "123456789012:orders:ac/me",
        "123456789012:orders:acme:${task}",
        "123456789012:orders::app",
    ],
)
def test_a_malformed_rule_is_a_config_error(spec: str) -> None:
    """A rule that is not ACCOUNT:ROLE:TENANT[:APP] of valid names stops the broker at start."""
    with pytest.raises(ConfigError, match="--aws-attest-rules"):
        parse_rule(spec)


def test_rules_are_taken_first_match_first() -> None:
    """The first rule that matches decides, as written."""
    rules = [AttestRule("123456789012", "*", "first"), AttestRule("123456789012", "a", "second")]
    identity = attested_identity(
        "arn:aws:sts::123456789012:assumed-role/a/t1",
        "123456789012",
        rules,
        access_key_id="k",
        expires_at=0,
    )
    assert identity.tenant == "first"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"AUDIENCE": "prod"}, "needs --aws-attest-rules"),
        ({"RULES": "123456789012:a:b"}, "needs --aws-attest-audience"),
        ({"AUDIENCE": "prod", "RULES": "1234:a:b"}, "12-digit account"),
        ({"AUDIENCE": "prod", "RULES": "123456789012:a:b", "MAX_AGE": "901"}, "900 seconds"),
        ({"AUDIENCE": "pr\tod", "RULES": "123456789012:a:b"}, "printable ASCII"),
    ],
)
def test_the_brokers_attestation_settings_are_checked_before_it_starts(
    environ: dict[str, str], message: str
) -> None:
    """An audience without rules, rules without an audience, a bad rule or bound: ConfigError."""
    from metaproxy.broker.config import BrokerConfig
    from metaproxy.config import build_config

    named = {f"METAPROXY_AWS_ATTEST_{key}": value for key, value in environ.items()}
    with pytest.raises(ConfigError, match=message):
        build_config(BrokerConfig, None, named)


def test_an_aws_identity_rule_claims_attested_tasks_and_not_platform_tokens() -> None:
    """`kind = "aws"` in a tenant's policy matches what the rules made of an attestation, and
    a platform token claiming the same tenant and app is another kind: not matched."""
    from pathlib import Path

    from metaproxy.policy.evaluate import evaluate
    from metaproxy.policy.load import load_policy_dir

    policies = load_policy_dir(Path(__file__).parent.parent / "policies" / "examples" / "ecs")
    rules = [parse_rule("111122223333:shop-*:shop")]
    attested = attested_identity(
        "arn:aws:sts::111122223333:assumed-role/shop-orders-task/0f1e2d3c4b5a69788796a5b4c3d2e1f0",
        "111122223333",
        rules,
        access_key_id="ASIAX",
        expires_at=0,
    )
    decision = evaluate(policies, attested, None)
    assert (decision.allowed, decision.tenant, decision.role_name) == (True, "shop", "shop-orders")
    assert decision.spec is not None
    assert decision.spec.role_session_name == "shop.0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    platform = Identity(
        kind="platform",
        issuer="metaproxy-platform",
        subject="task:shop/t1",
        task="t1",
        tenant="shop",
        app="shop-orders-task",
    )
    assert (
        evaluate(policies, platform, None).allowed,
        evaluate(policies, platform, None).rule,
    ) == (
        False,
        "no-tenant",
    )


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/abc"},
            ("http://169.254.170.2/v2/credentials/abc", ""),
        ),
        (
            {
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/abc",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:9/creds",
            },
            ("http://169.254.170.2/v2/credentials/abc", ""),
        ),
        (
            {
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials",
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": "/var/run/token",
            },
            ("http://169.254.170.23/v1/credentials", "/var/run/token"),
        ),
        ({}, ("", "")),
    ],
    ids=["ecs-agent", "relative-wins-as-in-botocore", "full-uri-with-token", "none"],
)
def test_the_sidecar_finds_ecs_credentials_where_the_sdks_do(
    environ: dict[str, str], expected: tuple[str, str]
) -> None:
    """ECS's agent at 169.254.170.2 + the relative URI first, else the FULL_URI and its token."""
    from metaproxy.config import ecs_credentials_endpoint

    assert ecs_credentials_endpoint(environ) == expected


SIGNED_NAMES = ["Authorization", "Host", "X-Amz-Date", "Content-Type", "X-Amz-Security-Token"]
header_names = st.sampled_from([*SIGNED_NAMES, AUDIENCE_HEADER, "HOST", "X-Other", "h\r\nX-I"])


@settings(max_examples=300, deadline=None)
@given(
    url=st.sampled_from([STS, STS + "/", "https://elsewhere.example/"]),
    changes=st.dictionaries(header_names, st.text(max_size=80), max_size=4),
    drop=st.lists(header_names, max_size=3),
    body=st.binary(max_size=80),
)
def test_any_signed_call_is_passed_or_refused_with_a_401_and_nothing_else(
    url: str, changes: dict[str, str], drop: list[str], body: bytes
) -> None:
    """Whatever a token carries, decoding and checking end in ValueError (a 401 malformed),
    Unauthenticated, or a call to forward that names our host, audience and action: never
    another exception, which would be a 500."""
    headers = {**signed().headers, **changes}
    for name in drop:
        headers.pop(name, None)
    token = encode(SignedCall(url, headers, body or GET_CALLER_IDENTITY))
    try:
        checked = check_call(decode(token), EXPECTED, NOW)
    except (ValueError, Unauthenticated):
        return
    assert checked.headers["host"] == "sts.eu-west-1.amazonaws.com"
    assert checked.headers[AUDIENCE_HEADER.lower()] == "metaproxy-prod"
    assert body in (b"", GET_CALLER_IDENTITY)


def test_attestations_wait_for_verification_in_a_lane_of_their_own() -> None:
    """Their tenant is unknown until STS answers, so they share a lane, apart from the
    unreadable tokens a flood of garbage would fill."""
    from metaproxy.broker.admission import AWS_LANE, UNKNOWN_LANE, lane_for

    token = encode(signed())
    assert (lane_for(token), lane_for("garbage"), AWS_LANE != UNKNOWN_LANE) == (
        AWS_LANE,
        UNKNOWN_LANE,
        True,
    )
