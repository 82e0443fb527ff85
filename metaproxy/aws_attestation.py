"""AWS attestation on the wire: what a sidecar sends instead of an identity token.

As Vault's `iam` auth method and aws-iam-authenticator do it: the sidecar signs an
`sts:GetCallerIdentity` with the credentials its platform gave it (an ECS task role, an EC2
instance profile) and sends the signed request, never the secret key; the broker checks what
was signed, forwards it to STS, and learns from STS's answer who signed it. A signed header
names the broker it is meant for, so a service that receives one cannot replay it to us, nor we
to anyone else; `X-Amz-Date` bounds when it can be used.

The token is `metaproxy-aws-v1.` + base64url (no padding) of a JSON object: `url` (the STS
endpoint signed for), `headers` (as sent) and `body` (base64). Here, below the sidecar that
makes it and the broker that reads it, because the sidecar may import nothing of the broker.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from metaproxy.sigv4 import SigningCredentials, SigV4Signer

TOKEN_PREFIX = "metaproxy-aws-v1."  # noqa: S105 - a format tag, not a secret
AUDIENCE_HEADER = "X-Metaproxy-Audience"
GET_CALLER_IDENTITY = b"Action=GetCallerIdentity&Version=2011-06-15"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded; charset=utf-8"
# A session token is 1 to 2 KB; base64 of it in JSON adds a third. The broker's HTTP server
# takes header lines up to 8190 bytes, so a longer token could not arrive anyway.
MAX_TOKEN_CHARS = 8_000
MAX_BODY_BYTES = 256
MAX_HEADERS = 12
MAX_HEADER_CHARS = 4096


@dataclass(frozen=True, slots=True)
class SignedCall:
    """A signed POST to STS, as the sidecar made it. The headers hold the session token (not
    the secret key, which never leaves the sidecar), so `repr` leaves them out."""

    url: str
    headers: Mapping[str, str] = field(repr=False)
    body: bytes = b""


def sign_attestation(
    *,
    url: str,
    region: str,
    audience: str,
    credentials: SigningCredentials,
    now: datetime | None = None,
) -> str:
    """A fresh token: GetCallerIdentity signed now with `credentials`, for the broker `audience`."""
    headers = SigV4Signer("sts", region).sign(
        url=url,
        body=GET_CALLER_IDENTITY,
        content_type=FORM_CONTENT_TYPE,
        credentials=credentials,
        now=now,
        extra_headers={AUDIENCE_HEADER: audience},
    )
    return encode(SignedCall(url, headers, GET_CALLER_IDENTITY))


def encode(call: SignedCall) -> str:
    document = {
        "url": call.url,
        "headers": dict(call.headers),
        "body": base64.b64encode(call.body).decode(),
    }
    raw = json.dumps(document, separators=(",", ":")).encode()
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str) -> SignedCall:
    """The signed call a token carries; ValueError (with a message that quotes none of it)
    for anything not shaped like one."""
    if not token.startswith(TOKEN_PREFIX):
        raise ValueError("not an AWS attestation")
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(f"longer than {MAX_TOKEN_CHARS} characters")
    payload = token[len(TOKEN_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        document = json.loads(raw)
    except (ValueError, binascii.Error, RecursionError):
        raise ValueError("not base64url JSON") from None
    if not isinstance(document, dict) or set(document) != {"url", "headers", "body"}:
        raise ValueError("must be an object of url, headers and body")
    url, headers, body = document["url"], document["headers"], document["body"]
    if not isinstance(url, str) or not isinstance(headers, dict) or not isinstance(body, str):
        raise ValueError("url and body must be strings, headers an object")
    if len(headers) > MAX_HEADERS:
        raise ValueError(f"more than {MAX_HEADERS} headers")
    for name, value in headers.items():
        if not isinstance(value, str) or len(name) > 64 or len(value) > MAX_HEADER_CHARS:
            raise ValueError("a header is not a short string")
        if not (name.isascii() and value.isascii() and value.isprintable()):
            raise ValueError("a header is not printable ASCII")
    try:
        decoded = base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("body is not base64") from None
    if len(decoded) > MAX_BODY_BYTES:
        raise ValueError(f"body larger than {MAX_BODY_BYTES} bytes")
    return SignedCall(url, headers, decoded)
