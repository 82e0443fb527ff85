"""STS AssumeRole for the broker, on the event loop: no thread per call.

botocore (boto3's core) supplies what must match AWS exactly: the STS service model and its
Query serializer (which also validates every parameter), and the broker's own credentials from
the standard chain (environment, profile, web identity, container or instance role), refreshed
as they near expiry. The request is signed with SigV4 (`sigv4.py`, checked against botocore's
signer), sent over one aiohttp connection pool, and the answer read with ElementTree.

Why not `boto3.client("sts")` on a thread pool, as before: a boto3 call cost 1.2 ms of CPU
here, and each call in flight held a thread; at a 500 calls/s budget with 100 ms of STS latency
that is 50+ threads fighting the event loop for the GIL and most of a core. botocore's signer
and parser on aiohttp brought it to about 0.4 ms; our signer and ElementTree to about 0.2 ms.

One attempt per call: retries, backoff and the call budget are the scheduler's, which sees
every attempt. STS's error text never leaves here: callers get our own error classes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from urllib.parse import urlencode
from xml.etree import ElementTree

import aiohttp

from metaproxy.errors import PackedPolicyTooLarge, StsUnavailable, UpstreamError
from metaproxy.models import AssumeRoleSpec, Credentials
from metaproxy.sigv4 import SigningCredentials, SigV4Signer

if TYPE_CHECKING:
    from botocore.credentials import Credentials as AwsCredentials
    from botocore.credentials import ReadOnlyCredentials

log = logging.getLogger("metaproxy.broker.credentials.sts")

# STS answers these when the account's request rate is too high; they are worth retrying later.
THROTTLING_CODES = frozenset(
    {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
)
# Transient service-side failures, also retryable.
TRANSIENT_CODES = frozenset(
    {"InternalFailure", "InternalError", "ServiceUnavailable", "IDPCommunicationError"}
)
# botocore hands back cached credentials until they near expiry, then refreshes them (which may
# mean an HTTP call); asking on a worker thread this often keeps the event loop out of that.
CREDENTIALS_RECHECK_SECONDS = 60.0
MAX_ANSWER_BYTES = 64 * 1024  # an AssumeRole answer is about 1.5 KB
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded; charset=utf-8"


class StsThrottled(StsUnavailable):
    code = "StsThrottled"


@dataclass(frozen=True, slots=True)
class AssumedRole:
    credentials: Credentials
    assumed_role_arn: str
    # STS's PackedPolicySize: the session policy and tags as a percentage of what fits (a call
    # over 100 fails with PackedPolicyTooLarge). None when the answer had none.
    packed_policy_size: int | None = None
    # A chain's first hop, for the audit log: the session that signed the second call.
    via_assumed_role_arn: str = ""
    via_access_key_id: str = ""


# Called once the request's bytes have left for STS (the budget's call window counts it then).
OnSent = Callable[[], None]


class StsClient(Protocol):
    async def assume_role(
        self,
        spec: AssumeRoleSpec,
        *,
        signed_with: Credentials | None = None,
        on_sent: OnSent | None = None,
    ) -> AssumedRole:
        """One AssumeRole call; `signed_with`: the credentials of a chain's previous hop
        (otherwise the broker's own); `on_sent`: called when the request is on the wire."""
        ...

    async def aclose(self) -> None: ...


async def _report_sent(
    _session: aiohttp.ClientSession,
    context: types.SimpleNamespace,
    _params: aiohttp.TraceRequestChunkSentParams,
) -> None:
    """aiohttp's hook for a request's bytes written to the socket: the call is out."""
    on_sent = context.trace_request_ctx
    if on_sent is not None:
        on_sent()


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


def default_endpoint(region: str) -> str:
    return f"https://sts.{region}.amazonaws.com"


class AsyncSts:
    def __init__(
        self,
        *,
        endpoint: str = "",
        region: str = "us-east-1",
        timeout: float = 5.0,
        max_connections: int = 16,
    ) -> None:
        import botocore.session
        from botocore import serialize

        self._session = botocore.session.get_session()
        self._operation = self._session.get_service_model("sts").operation_model("AssumeRole")
        self._serializer = serialize.create_serializer("query", include_validation=True)
        self._signer = SigV4Signer("sts", region)
        self._url = (endpoint or default_endpoint(region)).rstrip("/") + "/"
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=timeout)
        self._max_connections = max_connections
        self._http: aiohttp.ClientSession | None = None
        self._credentials: AwsCredentials | None = None
        self._frozen: ReadOnlyCredentials | None = None
        self._frozen_at = float("-inf")

    async def assume_role(
        self,
        spec: AssumeRoleSpec,
        *,
        signed_with: Credentials | None = None,
        on_sent: OnSent | None = None,
    ) -> AssumedRole:
        from botocore.exceptions import ParamValidationError

        try:
            request = self._serializer.serialize_to_request(
                assume_role_arguments(spec), self._operation
            )
        except ParamValidationError:
            raise UpstreamError(f"AssumeRole {spec.role_arn}: invalid parameters") from None
        headers, body = await self._signed(request["body"], signed_with)
        try:
            async with self._client().post(
                self._url, data=body, headers=headers, trace_request_ctx=on_sent
            ) as response:
                status = response.status
                answer = await response.content.read(MAX_ANSWER_BYTES)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Connection refused, reset, timed out: STS is unreachable from here.
            raise StsUnavailable(f"AssumeRole {spec.role_arn}: {type(exc).__name__}") from None
        return self._result(spec, status, answer)

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            sending = aiohttp.TraceConfig()
            sending.on_request_chunk_sent.append(_report_sent)
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=self._timeout,
                trace_configs=[sending],
                skip_auto_headers=("User-Agent",),
                headers={"User-Agent": "metaproxy-broker"},
            )
        return self._http

    async def _signed(
        self, params: dict[str, Any], signed_with: Credentials | None
    ) -> tuple[dict[str, str], bytes]:
        """SigV4 headers and the form-encoded body they sign."""
        body = urlencode(list(params.items()), doseq=True).encode()
        credentials: SigningCredentials
        if signed_with is not None:
            credentials = _Signing(
                signed_with.access_key_id,
                signed_with.secret_access_key,
                signed_with.session_token,
            )
        else:
            credentials = await self._current_credentials()
        headers = self._signer.sign(
            url=self._url, body=body, content_type=FORM_CONTENT_TYPE, credentials=credentials
        )
        return headers, body

    async def _current_credentials(self) -> ReadOnlyCredentials:
        now = time.monotonic()
        if self._frozen is None or now - self._frozen_at >= CREDENTIALS_RECHECK_SECONDS:
            self._frozen = await asyncio.to_thread(self._resolve_credentials)
            self._frozen_at = now
        return self._frozen

    def _resolve_credentials(self) -> ReadOnlyCredentials:
        if self._credentials is None:
            self._credentials = self._session.get_credentials()
        if self._credentials is None:
            raise StsUnavailable("the broker has no AWS credentials to call STS with")
        frozen = self._credentials.get_frozen_credentials()
        if not frozen.access_key or not frozen.secret_key:
            raise StsUnavailable("the broker's AWS credentials have no key or secret")
        return frozen

    def _result(self, spec: AssumeRoleSpec, status: int, answer: bytes) -> AssumedRole:
        try:
            # The answer comes from STS (or a proxy in front of it) and is at most 64 KB;
            # expat refuses entity expansion bombs.
            root = ElementTree.fromstring(answer)  # noqa: S314
        except ElementTree.ParseError:  # a proxy's HTML page, a truncated answer
            if status != 200:
                raise _error(spec, status, "") from None
            log.warning("AssumeRole %s: unreadable answer (HTTP %d)", spec.role_arn, status)
            raise StsUnavailable(f"AssumeRole {spec.role_arn}: unreadable answer") from None
        if status != 200 or _local(root.tag) == "ErrorResponse":
            raise _error(spec, status, _text(root, "Error", "Code"))
        try:
            credentials = Credentials(
                access_key_id=_text(root, "AssumeRoleResult", "Credentials", "AccessKeyId"),
                secret_access_key=_text(root, "AssumeRoleResult", "Credentials", "SecretAccessKey"),
                session_token=_text(root, "AssumeRoleResult", "Credentials", "SessionToken"),
                expiration=_utc(
                    parse_timestamp(_text(root, "AssumeRoleResult", "Credentials", "Expiration"))
                ),
            )
            arn = _text(root, "AssumeRoleResult", "AssumedRoleUser", "Arn")
        except ValueError:
            raise StsUnavailable(f"AssumeRole {spec.role_arn}: incomplete answer") from None
        if not (credentials.access_key_id and credentials.secret_access_key and arn):
            raise StsUnavailable(f"AssumeRole {spec.role_arn}: incomplete answer")
        packed = _text(root, "AssumeRoleResult", "PackedPolicySize")
        return AssumedRole(credentials, arn, int(packed) if packed.isdigit() else None)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()


def _local(tag: str) -> str:
    """An element's name without its XML namespace."""
    return tag.rsplit("}", 1)[-1]


def _text(root: ElementTree.Element, *path: str) -> str:
    """The text at `path` below `root`, matched by local names: STS answers in its namespace,
    and errors may come without one."""
    node = root
    for name in path:
        found = next((child for child in node if _local(child.tag) == name), None)
        if found is None:
            return ""
        node = found
    return (node.text or "").strip()


def parse_timestamp(text: str) -> datetime:
    """STS's ISO 8601 timestamps (`2026-11-22T07:00:00Z`, maybe with fractions) through the
    standard library, which is an order faster than dateutil; anything else goes to botocore."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        from botocore.utils import parse_timestamp as botocore_parse_timestamp

        parsed: datetime = botocore_parse_timestamp(text)
        return parsed


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class _Signing(NamedTuple):
    """A previous hop's credentials, in the shape the signer takes."""

    access_key: str
    secret_key: str
    token: str


def _error(spec: AssumeRoleSpec, status: int, code: str) -> StsUnavailable | UpstreamError:
    detail = f"AssumeRole {spec.role_arn}: {code or 'error'} (HTTP {status})"
    if code == "PackedPolicyTooLarge":
        return PackedPolicyTooLarge.for_spec(spec, detail)
    if code in THROTTLING_CODES or status == 429:
        return StsThrottled(detail)
    if code in TRANSIENT_CODES or status >= 500:
        return StsUnavailable(detail)
    return UpstreamError(detail)
