"""The sidecar's only way out: `POST /v1/credentials` to the broker over TLS or a Unix socket.

It reads the identity token file on every call, because the platform rotates it (Kubernetes
refreshes projected tokens at 80% of their life).
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from metaproxy.config import SidecarConfig
from metaproxy.models import Credentials, SidecarLimits


class BrokerError(Exception):
    """The broker said no, or could not be reached. Never carries secrets."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"broker answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.retry_after = retry_after

    @property
    def revoked_or_denied(self) -> bool:
        return self.status == 403


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


def _timestamp(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError("timestamp is not a string")
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


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
        self._session: aiohttp.ClientSession | None = None

    def _connector(self) -> aiohttp.BaseConnector:
        if self._config.broker_socket is not None:
            return aiohttp.UnixConnector(path=str(self._config.broker_socket))
        context: ssl.SSLContext | bool = True
        if self._config.broker_ca_file is not None:
            context = ssl.create_default_context(cafile=str(self._config.broker_ca_file))
        return aiohttp.TCPConnector(ssl=context, limit=4)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=self._connector(),
                timeout=aiohttp.ClientTimeout(total=self._config.broker_timeout),
            )
        return self._session

    def _identity_token(self) -> str:
        path: Path = self._config.identity_token_file
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise BrokerError(0, "IdentityTokenUnreadable", f"{path}: {exc.strerror}") from None
        if not token:
            raise BrokerError(0, "IdentityTokenEmpty", f"{path} is empty")
        return token

    async def fetch(self, *, refresh: bool) -> Grant:
        body: dict[str, object] = {"refresh": refresh}
        if self._config.role:
            body["role"] = self._config.role
        url = self._config.broker_url.rstrip("/") + "/v1/credentials"
        if self._config.broker_socket is not None:
            url = "http://broker/v1/credentials"
        headers = {"Authorization": f"Bearer {self._identity_token()}"}
        try:
            async with self.session.post(url, json=body, headers=headers) as response:
                text = await response.text()
                if response.status != 200:
                    raise _error_from(response.status, text, response.headers.get("Retry-After"))
                return parse_grant(json.loads(text))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BrokerError(0, "BrokerUnreachable", type(exc).__name__) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise BrokerError(0, "BadBrokerReply", str(exc)[:200]) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _error_from(status: int, text: str, retry_after: str | None) -> BrokerError:
    code, message = "BrokerError", ""
    try:
        body = json.loads(text)
        code = str(body.get("code", code))[:64]
        message = str(body.get("message", ""))[:200]
    except (ValueError, AttributeError):
        pass
    delay = float(retry_after) if retry_after and retry_after.isdigit() else None
    return BrokerError(status, code, message, delay)
