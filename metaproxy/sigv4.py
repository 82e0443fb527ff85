"""AWS Signature Version 4 for STS calls: the broker's AssumeRole and the sidecar's attestation.

An AssumeRole is a POST of a form body, signed over the content-type, host and x-amz-date
headers (and x-amz-security-token when the broker's own credentials are temporary). A
sidecar's attestation (`aws_attestation.py`) is a signed GetCallerIdentity that also signs a
header naming the broker it is meant for. Here, below both processes, because the sidecar may
import nothing of the broker. botocore's
`SigV4Auth` produces the same signature (tests/test_sigv4.py signs random requests with both
and compares), but it builds a general request object and re-derives the signing key, four
HMACs, on every call; it was a fifth of the broker's CPU under load. The signing key only
changes with the date or the secret, so it is kept.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import quote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
DEFAULT_PORTS = {"http": 80, "https": 443}


class SigningCredentials(Protocol):
    """What signing needs; botocore's ReadOnlyCredentials has it."""

    @property
    def access_key(self) -> str | None: ...

    @property
    def secret_key(self) -> str | None: ...

    @property
    def token(self) -> str | None: ...


def host_header(url: str) -> str:
    """The Host value a client sends for `url` (the port only when it is not the default)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


class SigV4Signer:
    """Signs POSTs with a body to one service in one region."""

    def __init__(self, service: str, region: str) -> None:
        self._service = service
        self._region = region
        self._key_for: tuple[str, str] | None = None  # (secret, date) the cached key is for
        self._key = b""

    def sign(
        self,
        *,
        url: str,
        body: bytes,
        content_type: str,
        credentials: SigningCredentials,
        now: datetime | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """The headers to send: Content-Type, Host, X-Amz-Date, maybe X-Amz-Security-Token,
        `extra_headers` (signed too), and Authorization."""
        if not credentials.access_key or not credentials.secret_key:
            raise ValueError("credentials without an access key or a secret cannot sign")
        moment = (now or datetime.now(UTC)).astimezone(UTC)
        timestamp = moment.strftime(TIMESTAMP_FORMAT)
        date = timestamp[:8]
        headers = {"content-type": content_type, "host": host_header(url), "x-amz-date": timestamp}
        if credentials.token:
            headers["x-amz-security-token"] = credentials.token
        for name, value in (extra_headers or {}).items():
            headers[name.lower()] = value
        names = sorted(headers)
        signed_headers = ";".join(names)
        canonical = "\n".join(
            [
                "POST",
                quote(urlsplit(url).path or "/", safe="/~"),
                "",  # no query string: the parameters are in the body
                "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in names),
                signed_headers,
                hashlib.sha256(body).hexdigest(),
            ]
        )
        scope = f"{date}/{self._region}/{self._service}/aws4_request"
        string_to_sign = "\n".join(
            [ALGORITHM, timestamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        signature = hmac.new(
            self._signing_key(credentials.secret_key, date),
            string_to_sign.encode(),
            hashlib.sha256,
        ).hexdigest()
        authorization = (
            f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={signed_headers}, Signature={signature}"
        )
        sent = {
            "Content-Type": content_type,
            "Host": headers["host"],
            "X-Amz-Date": timestamp,
            "Authorization": authorization,
        }
        if credentials.token:
            sent["X-Amz-Security-Token"] = credentials.token
        sent.update(extra_headers or {})
        return sent

    def _signing_key(self, secret: str, date: str) -> bytes:
        if self._key_for != (secret, date):
            key = _hmac(f"AWS4{secret}".encode(), date)
            for part in (self._region, self._service, "aws4_request"):
                key = _hmac(key, part)
            self._key, self._key_for = key, (secret, date)
        return self._key
