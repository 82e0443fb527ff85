"""The sidecar's AWS attestation: its platform's credentials, used only to sign a proof.

On ECS the agent gives every container of a task the task role's credentials at
169.254.170.2 (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`); on EC2 the node's IMDS gives the
instance profile's. The sidecar fetches them as an SDK would, keeps them in this object only,
and signs a fresh `sts:GetCallerIdentity` for each request to the broker
(`aws_attestation.py`); the broker learns from STS who signed. They are never served, logged
or written: the application gets the broker's scoped credentials from the sidecar as before.
Errors name the endpoint's host, never its path (ECS's relative URI is the task's secret).
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from metaproxy.aws_attestation import sign_attestation
from metaproxy.config import IMDS_ADDRESS, ecs_credentials_endpoint
from metaproxy.errors import StartError
from metaproxy.sidecar.config import SidecarConfig
from metaproxy.sidecar.host_metadata import resolve_interface
from metaproxy.sidecar.wire.httpclient import Endpoint, HttpClient, HttpClientError

log = logging.getLogger("metaproxy.sidecar.attest")

# Fetch new credentials this long before the old ones lapse: ECS and IMDS both offer the next
# set well before (ECS at least 15 minutes, EC2 about 5).
RENEW_BEFORE = timedelta(minutes=5)
MAX_ANSWER_BYTES = 16 * 1024
IMDS_TOKEN_TTL = 21_600


class AttestationUnavailable(Exception):
    """The platform's credentials could not be had; the message is safe to log and show."""


@dataclass(frozen=True, slots=True)
class PlatformCredentials:
    """The shape the signer takes (`sigv4.SigningCredentials`). `repr` shows only the key id."""

    access_key: str
    secret_key: str
    token: str
    expiration: datetime

    def __repr__(self) -> str:
        return f"PlatformCredentials({self.access_key!r}, expiration={self.expiration})"


def parse_credentials(raw: bytes) -> PlatformCredentials:
    """ECS's and IMDS's answer: `{"AccessKeyId","SecretAccessKey","Token","Expiration"}`."""
    try:
        body = json.loads(raw)
        expiration = datetime.fromisoformat(str(body["Expiration"]).replace("Z", "+00:00"))
        credentials = PlatformCredentials(
            str(body["AccessKeyId"]),
            str(body["SecretAccessKey"]),
            str(body.get("Token") or ""),
            expiration if expiration.tzinfo else expiration.replace(tzinfo=UTC),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AttestationUnavailable("the platform's credentials answer is unreadable") from None
    if not credentials.access_key or not credentials.secret_key:
        raise AttestationUnavailable("the platform's credentials answer has no key")
    return credentials


class AwsAttestation:
    """`await attestation.token()`: a freshly signed attestation for the broker."""

    def __init__(self, config: SidecarConfig) -> None:
        self._config = config
        self._source = config.identity_source
        url, token_file = config.aws_credentials_url, ""
        if not url and self._source == "aws-ecs":
            url, token_file = ecs_credentials_endpoint()
            if not url:
                raise StartError(
                    "--identity-source aws-ecs: no AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or "
                    "_FULL_URI in this container's environment (does the task have a role?)"
                )
        if not url:
            url = f"http://{IMDS_ADDRESS.removesuffix(':80')}"
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            # ECS's agent and IMDS are plain HTTP on link-local or loopback addresses.
            raise StartError("--aws-credentials-url: the platform's endpoint must be http://")
        self._where = parts.hostname  # for messages: never the path
        self._path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        self._token_file = Path(token_file) if token_file else None
        bind_to = None
        if self._source == "aws-ec2":
            # In a pod that claims 169.254.169.254 itself, the node's IMDS is past the uplink.
            bind_to, _ = resolve_interface(config.host_metadata_interface, parts.hostname)
        self._http = HttpClient(
            Endpoint(parts.hostname, parts.port or 80, interface=bind_to),
            max_answer_bytes=MAX_ANSWER_BYTES,
        )
        region = config.aws_attest_region
        self._sts_url = config.aws_attest_sts_endpoint or f"https://sts.{region}.amazonaws.com"
        self._held: PlatformCredentials | None = None

    async def token(self) -> str:
        """GetCallerIdentity signed now, for this sidecar's broker."""
        credentials = await self._credentials()
        return sign_attestation(
            url=self._sts_url,
            region=self._config.aws_attest_region,
            audience=self._config.aws_attest_audience,
            credentials=credentials,
        )

    async def _credentials(self) -> PlatformCredentials:
        now = datetime.now(UTC)
        if self._held is not None and self._held.expiration - now > RENEW_BEFORE:
            return self._held
        try:
            async with asyncio.timeout(self._config.broker_timeout):
                if self._source == "aws-ec2":
                    raw = await self._from_imds()
                else:
                    raw = await self._get(self._path, self._authorization())
        except (OSError, HttpClientError, TimeoutError) as exc:
            raise AttestationUnavailable(
                f"the platform's credentials at {self._where}: {type(exc).__name__}"
            ) from None
        self._held = parse_credentials(raw)
        log.info(
            "attestation credentials %s from %s, until %s",
            self._held.access_key,
            self._where,
            self._held.expiration.isoformat(),
        )
        return self._held

    def _authorization(self) -> dict[str, str]:
        if self._token_file is None:
            return {}
        try:
            return {"Authorization": self._token_file.read_text().strip()}
        except (OSError, UnicodeDecodeError):
            raise AttestationUnavailable(
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE: unreadable"
            ) from None

    async def _get(self, path: str, headers: dict[str, str]) -> bytes:
        answer = await self._http.request("GET", path, headers)
        if answer.status != 200:
            raise AttestationUnavailable(
                f"the platform's credentials at {self._where} answered {answer.status}"
            )
        return answer.body

    async def _from_imds(self) -> bytes:
        """IMDSv2, as the SDKs ask it: a token, the instance profile's role, its credentials."""
        answer = await self._http.request(
            "PUT",
            "/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL)},
        )
        if answer.status != 200:
            raise AttestationUnavailable(f"IMDS at {self._where} gave no token ({answer.status})")
        headers = {"X-aws-ec2-metadata-token": answer.body.decode("ascii", "replace").strip()}
        base = "/latest/meta-data/iam/security-credentials/"
        role = (await self._get(base, headers)).decode("ascii", "replace").split("\n")[0].strip()
        if not role or not role.isprintable() or "/" in role:
            raise AttestationUnavailable(f"IMDS at {self._where} names no instance profile role")
        return await self._get(base + urllib.parse.quote(role), headers)

    async def aclose(self) -> None:
        await self._http.aclose()
