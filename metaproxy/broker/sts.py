"""STS AssumeRole through boto3, on an executor the broker owns so the event loop never blocks.

botocore's own retries are off (one attempt): retries, backoff and the call budget are decided
by the broker (`resilience.py`), which sees every attempt. STS error text never leaves here:
callers get our own error classes with a public message.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, Protocol

from metaproxy.errors import StsUnavailable, UpstreamError
from metaproxy.models import AssumeRoleSpec, Credentials

if TYPE_CHECKING:
    from mypy_boto3_sts import STSClient

log = logging.getLogger("metaproxy.broker.sts")

# STS answers these when the account's request rate is too high; they are worth retrying later.
THROTTLING_CODES = frozenset(
    {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
)
# Transient service-side failures, also retryable.
TRANSIENT_CODES = frozenset(
    {"InternalFailure", "InternalError", "ServiceUnavailable", "IDPCommunicationError"}
)


class StsThrottled(StsUnavailable):
    code = "StsThrottled"


@dataclass(frozen=True, slots=True)
class AssumedRole:
    credentials: Credentials
    assumed_role_arn: str


class StsClient(Protocol):
    async def assume_role(self, spec: AssumeRoleSpec) -> AssumedRole: ...

    def close(self) -> None: ...


def assume_role_arguments(spec: AssumeRoleSpec) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "RoleArn": spec.role_arn,
        "RoleSessionName": spec.role_session_name,
        "DurationSeconds": spec.duration_seconds,
    }
    if spec.source_identity:
        arguments["SourceIdentity"] = spec.source_identity
    if spec.tags:
        arguments["Tags"] = [{"Key": k, "Value": v} for k, v in spec.tags]
    if spec.transitive_tag_keys:
        arguments["TransitiveTagKeys"] = list(spec.transitive_tag_keys)
    if spec.session_policy:
        arguments["Policy"] = spec.session_policy
    if spec.external_id:
        arguments["ExternalId"] = spec.external_id
    return arguments


class Boto3Sts:
    def __init__(
        self,
        *,
        endpoint: str = "",
        region: str = "us-east-1",
        timeout: float = 5.0,
        max_workers: int = 16,
    ) -> None:
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=region,
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max_workers,
        )
        session = boto3.session.Session()
        self._client: STSClient = session.client(
            "sts", endpoint_url=endpoint or None, config=config
        )
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sts")

    async def assume_role(self, spec: AssumeRoleSpec) -> AssumedRole:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._assume_role_blocking, spec)

    def _assume_role_blocking(self, spec: AssumeRoleSpec) -> AssumedRole:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._client.assume_role(**assume_role_arguments(spec))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            detail = f"AssumeRole {spec.role_arn}: {code or 'error'} (HTTP {status})"
            if code in THROTTLING_CODES or status == 429:
                raise StsThrottled(detail) from None
            if code in TRANSIENT_CODES or status >= 500:
                raise StsUnavailable(detail) from None
            raise UpstreamError(detail) from None
        except BotoCoreError as exc:
            # Connection refused, timeouts, DNS: STS is unreachable from here.
            raise StsUnavailable(f"AssumeRole {spec.role_arn}: {type(exc).__name__}") from None
        raw = answer["Credentials"]
        credentials = Credentials(
            access_key_id=raw["AccessKeyId"],
            secret_access_key=raw["SecretAccessKey"],
            session_token=raw["SessionToken"],
            expiration=raw["Expiration"].astimezone(UTC),
        )
        return AssumedRole(credentials, answer["AssumedRoleUser"]["Arn"])

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
