"""Our SigV4 signer against botocore's: for any request the broker can send, the same headers
and the same signature (the broker signs with its own for speed; botocore is the reference)."""

from __future__ import annotations

from datetime import UTC, datetime
from unittest import mock
from urllib.parse import urlencode

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from hypothesis import given, settings
from hypothesis import strategies as st

from metaproxy.sigv4 import SigV4Signer, host_header

CONTENT_TYPE = "application/x-www-form-urlencoded; charset=utf-8"

urls = st.sampled_from(
    [
        "https://sts.us-east-1.amazonaws.com/",
        "https://sts.eu-west-1.amazonaws.com:443/",
        "http://127.0.0.1:5000/",
        "http://localhost:80/",
        "http://[::1]:8443/sts/",
        "https://proxy.internal:8443/v1/sts/",
    ]
)
text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=40)


def botocore_headers(
    url: str, body: bytes, credentials: ReadOnlyCredentials, region: str, moment: datetime
) -> dict[str, str]:
    request = AWSRequest("POST", url, data=body, headers={"Content-Type": CONTENT_TYPE})
    # botocore signs at get_current_datetime(), a module global its stubs do not declare.
    frozen = moment.replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", lambda *args, **kwargs: frozen):
        SigV4Auth(credentials, "sts", region).add_auth(request)
    return dict(request.headers.items())


@settings(max_examples=150, deadline=None)
@given(
    url=urls,
    region=st.sampled_from(["us-east-1", "eu-west-1", "ap-southeast-2"]),
    access_key=st.from_regex(r"\A(AKIA|ASIA)[A-Z0-9]{16}\Z"),
    secret=st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEF0123456789+/", min_size=40, max_size=40
    ),
    token=st.one_of(
        st.none(), st.text(alphabet="ABCDEFabcdef0123456789+/=", min_size=1, max_size=300)
    ),
    params=st.dictionaries(
        st.sampled_from(["RoleArn", "RoleSessionName", "Policy", "Tags.member.1.Key"]), text
    ),
    moment=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2040, 1, 1)),
)
def test_signature_matches_botocore(
    url: str,
    region: str,
    access_key: str,
    secret: str,
    token: str | None,
    params: dict[str, str],
    moment: datetime,
) -> None:
    body = urlencode({"Action": "AssumeRole", "Version": "2011-06-15", **params}).encode()
    credentials = ReadOnlyCredentials(access_key, secret, token)
    at = moment.replace(tzinfo=UTC)
    ours = SigV4Signer("sts", region).sign(
        url=url, body=body, content_type=CONTENT_TYPE, credentials=credentials, now=at
    )
    reference = botocore_headers(url, body, credentials, region, at)
    assert ours["Authorization"] == reference["Authorization"]
    assert ours["X-Amz-Date"] == reference["X-Amz-Date"]
    assert ours.get("X-Amz-Security-Token") == reference.get("X-Amz-Security-Token")
    assert ours["Host"] == host_header(url)


def test_signing_key_is_kept_for_the_day_and_rederived_when_the_date_or_secret_changes() -> None:
    signer = SigV4Signer("sts", "us-east-1")
    first = ReadOnlyCredentials("AKIAEXAMPLEEXAMPLE00", "a" * 40, None)
    rotated = ReadOnlyCredentials("AKIAEXAMPLEEXAMPLE00", "b" * 40, None)
    morning, evening = datetime(2026, 11, 22, 6, tzinfo=UTC), datetime(2026, 11, 22, 23, tzinfo=UTC)
    tomorrow = datetime(2026, 11, 23, 1, tzinfo=UTC)
    for credentials, at in (
        (first, morning),
        (first, evening),
        (rotated, evening),
        (first, tomorrow),
    ):
        ours = signer.sign(
            url="https://sts.us-east-1.amazonaws.com/", body=b"Action=AssumeRole",
            content_type=CONTENT_TYPE, credentials=credentials, now=at,
        )  # fmt: skip
        reference = botocore_headers(
            "https://sts.us-east-1.amazonaws.com/",
            b"Action=AssumeRole",
            credentials,
            "us-east-1",
            at,
        )
        assert ours["Authorization"] == reference["Authorization"]


def test_credentials_without_a_secret_cannot_sign() -> None:
    with pytest.raises(ValueError, match="cannot sign"):
        SigV4Signer("sts", "us-east-1").sign(
            url="https://sts.us-east-1.amazonaws.com/",
            body=b"",
            content_type=CONTENT_TYPE,
            credentials=ReadOnlyCredentials("AKIAEXAMPLEEXAMPLE00", "", None),
        )
