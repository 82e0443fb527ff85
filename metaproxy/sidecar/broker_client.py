"""The sidecar's only way out: `POST /v1/credentials` to the broker over TLS or a Unix socket.

It reads the identity token file on every call, because the platform rotates it (Kubernetes
refreshes projected tokens at 80% of their life), and checks the CA bundle for a change before
every call (`trust.CaBundle`). Every failure is a `BrokerError` whose code names the cause the
operator must fix (docs/sidecar.md, "Why not ready").
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from metaproxy.models import Credentials, NodeFacts, SidecarLimits
from metaproxy.sidecar.attest import AttestationUnavailable, AwsAttestation
from metaproxy.sidecar.config import SidecarConfig
from metaproxy.sidecar.identity_token import TokenFacts, token_facts
from metaproxy.sidecar.trust import CaBundle, CaProblem
from metaproxy.sidecar.wire.httpclient import Endpoint, HttpClient, HttpClientError


class BrokerError(Exception):
    """The broker said no, or could not be reached. Never carries secrets.

    `status` is the broker's HTTP status, 0 when there was no answer; `code` the broker's code or
    ours (IdentityTokenUnreadable, IdentityTokenEmpty, AttestationUnavailable, CaUnreadable,
    CaInvalid, TlsVerificationFailed, TlsFailed, BrokerUnreachable, BadBrokerReply); `reason`
    the broker's category for a 401 (expired, bad_signature, …), safe to show the task."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: float | None = None,
        *,
        reason: str = "",
        identity_expiry: datetime | None = None,
    ):
        super().__init__(f"broker answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.reason = reason
        self.identity_expiry = identity_expiry

    @property
    def revoked_or_denied(self) -> bool:
        return self.status == 403

    @property
    def blocks_refresh(self) -> bool:
        """Nothing will change by retrying until a file is fixed: /healthz fails."""
        return self.code in (
            "IdentityTokenUnreadable",
            "IdentityTokenEmpty",
            "CaUnreadable",
            "CaInvalid",
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """What the broker gave this task: credentials, which role, the metadata view, limits."""

    credentials: Credentials
    issued_at: datetime
    role_name: str
    role_arn: str
    account_id: str
    metadata: dict[str, str]
    limits: SidecarLimits


# `YYYY-MM-DDTHH:MM:SSZ` exactly, as the broker writes it (`clock.iso_z`). Checked here and
# read by `fromisoformat`, because `strptime` imports `_strptime`, `calendar` and `locale`.
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def _timestamp(value: object) -> datetime:
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        raise ValueError("timestamp is not YYYY-MM-DDTHH:MM:SSZ")
    return datetime.fromisoformat(value).astimezone(UTC)


def parse_grant(body: Any) -> Grant:
    """Strictly: a broker bug must not become a malformed credential document for an SDK."""
    creds = body["credentials"]
    metadata = body.get("metadata") or {}
    limit_fields = set(SidecarLimits.__dataclass_fields__)
    raw_limits = {k: v for k, v in (body.get("limits") or {}).items() if k in limit_fields}
    for name, value in {
        "access_key_id": creds["access_key_id"],
        "secret_access_key": creds["secret_access_key"],
        "session_token": creds["session_token"],
        "role_name": body["role_name"],
    }.items():
        if not isinstance(value, str) or not value or "\n" in value:
            raise ValueError(f"{name} is not a one-line string")
    return Grant(
        credentials=Credentials(
            access_key_id=creds["access_key_id"],
            secret_access_key=creds["secret_access_key"],
            session_token=creds["session_token"],
            expiration=_timestamp(creds["expiration"]),
        ),
        issued_at=_timestamp(creds.get("issued_at", creds["expiration"])),
        role_name=body["role_name"],
        role_arn=str(body.get("role_arn", "")),
        account_id=str(body.get("account_id", "")),
        metadata={str(k): str(v) for k, v in metadata.items()},
        limits=SidecarLimits(**raw_limits),
    )


class BrokerClient:
    def __init__(self, config: SidecarConfig) -> None:
        self._config = config
        self.trust = CaBundle(config.broker_ca_file)
        # Where the task runs, from the node's IMDS (`HostMetadata.facts`), sent with every
        # request so the broker's view and identity document name the node.
        self.node_facts: Callable[[], Awaitable[NodeFacts | None]] | None = None
        self.identity: TokenFacts | None = None  # the token file's, as last read
        self._generation = -1
        # AWS attestation instead of the token file (--identity-source aws-ecs|aws-ec2).
        self.attestation = (
            AwsAttestation(config) if config.identity_source != "token-file" else None
        )
        if config.broker_socket is not None:
            self._http = HttpClient(Endpoint("broker", 0, socket=config.broker_socket))
            self._path = "/v1/credentials"
        else:
            url = urllib.parse.urlsplit(config.broker_url)
            tls = url.scheme == "https"
            endpoint = Endpoint(url.hostname or "", url.port or (443 if tls else 80), tls=tls)
            self._http = HttpClient(endpoint)
            self._path = url.path.rstrip("/") + "/v1/credentials"

    def _identity_token(self) -> str:
        path: Path = self._config.identity_token_file
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) else "not text"
            raise BrokerError(0, "IdentityTokenUnreadable", f"{path}: {detail}") from None
        if not token:
            raise BrokerError(0, "IdentityTokenEmpty", f"{path} is empty")
        self.identity = token_facts(token)
        return token

    async def _attestation_token(self) -> str:
        assert self.attestation is not None
        try:
            return await self.attestation.token()
        except AttestationUnavailable as exc:
            raise BrokerError(0, "AttestationUnavailable", str(exc)) from None

    def _tls(self) -> ssl.SSLContext | None:
        if not self._http.endpoint.tls:
            return None
        try:
            context = self.trust.context()
        except CaProblem as exc:
            raise BrokerError(0, exc.code, str(exc)) from None
        if self.trust.generation != self._generation:
            # A new bundle: the next connection is verified against it, not a kept-alive one.
            self._generation = self.trust.generation
            self._http.close()
        return context

    async def fetch(self, *, refresh: bool) -> Grant:
        body: dict[str, object] = {"refresh": refresh}
        if self._config.role:
            body["role"] = self._config.role
        node = await self.node_facts() if self.node_facts is not None else None
        if node is not None and node.to_json():
            body["node"] = node.to_json()
        token = await self._attestation_token() if self.attestation else self._identity_token()
        tls = self._tls()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        timeout = self._config.broker_timeout
        try:
            async with asyncio.timeout(timeout):
                answer = await self._http.request(
                    "POST", self._path, headers, json.dumps(body).encode(), tls=tls
                )
        except TimeoutError:
            raise BrokerError(0, "BrokerUnreachable", f"no answer within {timeout:g}s") from None
        except ssl.SSLCertVerificationError as exc:
            why = exc.verify_message or exc.reason or "certificate not trusted"
            raise BrokerError(0, "TlsVerificationFailed", str(why)) from None
        except ssl.SSLError as exc:
            raise BrokerError(0, "TlsFailed", str(exc.reason or exc)[:200]) from None
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            raise BrokerError(0, "BrokerUnreachable", why[:200]) from None
        except HttpClientError as exc:
            raise BrokerError(0, "BadBrokerReply", str(exc)[:200]) from None
        if answer.status != 200:
            error = _error_from(answer.status, answer.body, answer.headers.get("retry-after"))
            if error.reason == "expired":
                error.identity_expiry = token_expiry(token)
            raise error
        try:
            return parse_grant(json.loads(answer.body))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BrokerError(0, "BadBrokerReply", str(exc)[:200]) from None

    async def aclose(self) -> None:
        await self._http.aclose()
        if self.attestation is not None:
            await self.attestation.aclose()


def token_expiry(token: str) -> datetime | None:
    """The `exp` of a JWT, read without verifying it (the broker verifies): for the operator's
    one line, "identity token expired at ..."."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return datetime.fromtimestamp(int(claims["exp"]), UTC)
    except (IndexError, ValueError, KeyError, TypeError, OverflowError):
        return None


def _error_from(status: int, raw: bytes, retry_after: str | None) -> BrokerError:
    code, message, reason = "BrokerError", "", ""
    try:
        body = json.loads(raw)
        code = str(body.get("code", code))[:64]
        message = str(body.get("message", ""))[:200]
        reason = str(body.get("reason") or "")[:64]
    except (ValueError, AttributeError):
        pass
    delay = float(retry_after) if retry_after and retry_after.isdigit() else None
    return BrokerError(status, code, message, delay, reason=reason)
