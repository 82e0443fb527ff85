"""What a signed GetCallerIdentity must say before the broker forwards it to STS.

The broker cannot check the signature (it has no secret key); STS does. What the broker checks
is *what was signed*, so that a request STS would accept is only ever one meant for this
broker, now: the STS endpoint and host it names, the region and service of its scope, that it
calls GetCallerIdentity and nothing else, the audience header naming this broker, and an
`X-Amz-Date` within `max_age` seconds. Only an allow-list of headers may come along, and every
one of them must be signed (an unsigned header could be changed on the way). A request that
fails any check is refused here and never reaches STS, so a mistaken or hostile sidecar cannot
use the broker to call STS on its behalf. Pure: no I/O, the time is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

from metaproxy.aws_attestation import AUDIENCE_HEADER, SignedCall
from metaproxy.errors import AuthReason, Unauthenticated
from metaproxy.sigv4 import ALGORITHM, TIMESTAMP_FORMAT, host_header

# Everything a SigV4 POST of a form needs, and the audience; nothing a proxy could act on.
ALLOWED_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "host",
        "x-amz-date",
        "x-amz-security-token",
        AUDIENCE_HEADER.lower(),
    }
)
MUST_BE_SIGNED = frozenset({"content-type", "host", "x-amz-date", AUDIENCE_HEADER.lower()})
# A sidecar's clock may run a little ahead of ours.
FUTURE_SKEW = timedelta(seconds=60)
_AUTHORIZATION = re.compile(
    ALGORITHM + r" Credential=(?P<key>[A-Z0-9]{16,128})/(?P<date>\d{8})/(?P<region>[a-z0-9-]{1,32})"
    r"/(?P<service>[a-z0-9-]{1,32})/aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]{1,512}), ?"
    r"Signature=[0-9a-f]{64}",
    re.ASCII,
)
_WANTED_FORM = {"Action": ["GetCallerIdentity"], "Version": ["2011-06-15"]}


@dataclass(frozen=True, slots=True)
class Expected:
    """What this broker accepts: the STS endpoint and region signed for, its own audience, and
    how old a signature may be."""

    url: str
    region: str
    audience: str
    max_age: float


@dataclass(frozen=True, slots=True)
class CheckedCall:
    """A signed call that passed every check: what to forward, and who claims to sign it."""

    access_key_id: str
    signed_at: datetime
    headers: dict[str, str]  # lower-case names, as signed


def normal_url(url: str) -> str:
    return url.rstrip("/") + "/"


def _refuse(detail: str, reason: AuthReason) -> Unauthenticated:
    return Unauthenticated(f"AWS attestation {detail}", reason=reason)


def check_call(call: SignedCall, expected: Expected, now: datetime) -> CheckedCall:
    """`call` as the broker may forward it, or `Unauthenticated` naming the first failed check
    (never quoting a header's value)."""
    if normal_url(call.url) != normal_url(expected.url):
        raise _refuse("is signed for another STS endpoint", "wrong_audience")
    headers = _allowed_headers(call)
    authorization = _signature_of(headers)
    if authorization["service"] != "sts" or authorization["region"] != expected.region:
        raise _refuse("is scoped to another region or service", "wrong_audience")
    if headers["host"] != host_header(expected.url):
        raise _refuse("is signed for another host", "wrong_audience")
    if headers[AUDIENCE_HEADER.lower()] != expected.audience:
        raise _refuse("is meant for another audience", "wrong_audience")
    if not headers["content-type"].startswith("application/x-www-form-urlencoded"):
        raise _refuse("is not a form", "malformed")
    try:
        form = parse_qs(call.body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        raise _refuse("has an unreadable body", "malformed") from None
    if form != _WANTED_FORM:
        raise _refuse("calls something other than GetCallerIdentity", "invalid_claims")
    signed_at = _signed_at(headers["x-amz-date"], authorization["date"])
    if now - signed_at > timedelta(seconds=expected.max_age):
        raise _refuse(f"was signed more than {expected.max_age:g}s ago", "expired")
    if signed_at - now > FUTURE_SKEW:
        raise _refuse("is signed in the future", "not_yet_valid")
    return CheckedCall(authorization["key"], signed_at, headers)


def _allowed_headers(call: SignedCall) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in call.headers.items():
        lower = name.lower()
        if lower not in ALLOWED_HEADERS:
            raise _refuse(f"carries a header that is not accepted ({name[:40]})", "malformed")
        if lower in headers:
            raise _refuse(f"repeats the header {lower}", "malformed")
        headers[lower] = value
    return headers


def _signature_of(headers: dict[str, str]) -> re.Match[str]:
    """The Authorization header's parts, once it signs every header sent and those it must."""
    authorization = _AUTHORIZATION.fullmatch(headers.get("authorization", ""))
    if authorization is None:
        raise _refuse("has no SigV4 Authorization header", "malformed")
    signed = authorization["signed"].split(";")
    if sorted(signed) != signed or set(signed) != set(headers) - {"authorization"}:
        raise _refuse("must sign exactly the headers it carries", "malformed")
    if missing := sorted(MUST_BE_SIGNED - set(signed)):
        raise _refuse(f"does not sign {missing[0]}", "malformed")
    return authorization


def _signed_at(stamp: str, scope_date: str) -> datetime:
    try:
        signed_at = datetime.strptime(stamp, TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise _refuse("has an unreadable X-Amz-Date", "malformed") from None
    if stamp[:8] != scope_date:
        raise _refuse("has a scope date that is not its X-Amz-Date's", "malformed")
    return signed_at
