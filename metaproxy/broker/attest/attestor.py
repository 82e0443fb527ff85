"""AWS attestation end to end: check the signed call, forward it to STS, map who STS names.

A token that passes `check.check_call` is sent to the configured STS endpoint as it was
signed (the same headers, the same body; nothing of ours added but Content-Length), one
attempt, with the STS timeout. STS checks the signature and answers with the signer's ARN and
account; the rules (`rules.py`) make that an `Identity`. STS refusing the signature is a 401
like any bad token; STS unreachable, throttling or failing is a 503, as it is for AssumeRole.
STS's error text never leaves here, only its error code, checked for shape.

Each attestation is counted by its outcome (`AttestationStats`, read when /metrics is
scraped): ok, refused by the failed check's `AuthReason` (a fixed set, never anything the token
says), or unavailable when STS could not answer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args
from xml.etree import ElementTree

import aiohttp

from metaproxy.aws_attestation import TOKEN_PREFIX, decode
from metaproxy.broker.attest.check import Expected, check_call, normal_url
from metaproxy.broker.attest.rules import AttestRule, attested_identity, parse_rule
from metaproxy.broker.config import BrokerConfig
from metaproxy.broker.credentials.regions import region_endpoints
from metaproxy.broker.credentials.sts import default_endpoint
from metaproxy.clock import Clock
from metaproxy.errors import AuthReason, StsUnavailable, Unauthenticated
from metaproxy.models import Identity

log = logging.getLogger("metaproxy.broker.attest")

MAX_ANSWER_BYTES = 16 * 1024  # a GetCallerIdentity answer is about 500 bytes
_CODE = re.compile(r"[A-Za-z][A-Za-z.]{0,63}", re.ASCII)
# STS's answer when a request is throttled: a 503 to the sidecar, which retries, not a 401.
_THROTTLING = frozenset({"Throttling", "ThrottlingException", "RequestLimitExceeded"})
# Every refusal's reason, so each one's counter exists (at 0) from the start.
REASONS: tuple[str, ...] = get_args(AuthReason)


@dataclass(frozen=True, slots=True)
class AttestationStats:
    """What one attestor decided, for /metrics."""

    ok: int
    refused: tuple[tuple[str, int], ...]  # (reason, count) for every `AuthReason`
    unavailable: int  # STS unreachable, throttling or failing: a 503, not a refusal


class AwsAttestor:
    """Turns `metaproxy-aws-v1.` tokens into identities for one broker (`expected.audience`)."""

    def __init__(
        self,
        expected: Expected,
        rules: Sequence[AttestRule],
        clock: Clock,
        *,
        timeout: float = 5.0,
    ) -> None:
        self.expected = expected
        self._rules = tuple(rules)
        self._clock = clock
        self._url = normal_url(expected.url)
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=timeout)
        self._http: aiohttp.ClientSession | None = None
        self.forwarded = 0  # calls sent to STS (metrics, tests)
        self._ok = 0
        self._unavailable = 0
        self._refused = dict.fromkeys(REASONS, 0)

    @classmethod
    def from_config(cls, config: BrokerConfig, clock: Clock) -> AwsAttestor | None:
        """The configured attestor, or None when AWS attestation is off. Attestations are
        signed for, and sent to, the first STS region's endpoint unless one is named."""
        if not config.aws_attest_audience:
            return None
        regions = config.sts_regions or (config.sts_region,)
        region, endpoint = region_endpoints(
            regions, config.sts_region_endpoints, config.sts_endpoint
        )[0]
        url = config.aws_attest_sts_endpoint or endpoint or default_endpoint(region)
        expected = Expected(url, region, config.aws_attest_audience, config.aws_attest_max_age)
        rules = [parse_rule(spec) for spec in config.aws_attest_rules]
        return cls(expected, rules, clock, timeout=config.sts_timeout)

    def claims(self, token: str) -> bool:
        """Whether `token` is an AWS attestation rather than a JWT."""
        return token.startswith(TOKEN_PREFIX)

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=self._timeout,
            skip_auto_headers=("User-Agent", "Content-Type", "Accept", "Accept-Encoding"),
            auto_decompress=False,
        )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def stats(self) -> AttestationStats:
        return AttestationStats(self._ok, tuple(self._refused.items()), self._unavailable)

    async def attest(self, token: str) -> Identity:
        """The identity STS vouches for, or Unauthenticated (StsUnavailable when STS cannot
        answer); counted either way."""
        try:
            identity = await self._attest(token)
        except Unauthenticated as exc:
            # Every refusal here names its reason; an unnamed one is counted as a bad claim.
            reason = exc.reason or "invalid_claims"
            reason = reason if reason in self._refused else "invalid_claims"
            self._refused[reason] += 1
            raise
        except StsUnavailable:
            self._unavailable += 1
            raise
        self._ok += 1
        return identity

    async def _attest(self, token: str) -> Identity:
        try:
            call = decode(token)
        except ValueError as exc:
            raise Unauthenticated(f"AWS attestation {exc}", reason="malformed") from None
        checked = check_call(call, self.expected, self._clock.now())
        status, answer = await self._forward(checked.headers, call.body)
        arn, account = _caller(status, answer)
        expires_at = checked.signed_at.timestamp() + self.expected.max_age
        return attested_identity(
            arn,
            account,
            self._rules,
            access_key_id=checked.access_key_id,
            expires_at=expires_at,
        )

    async def _forward(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        if self._http is None:
            raise StsUnavailable("AWS attestation: the attestor is not started")
        self.forwarded += 1
        try:
            # The Host header goes as signed: the URL's own may differ only by a default port.
            # Never a redirect: the signed headers (session token included) go to STS alone.
            async with self._http.post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as response:
                return response.status, await response.content.read(MAX_ANSWER_BYTES)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise StsUnavailable(f"GetCallerIdentity: {type(exc).__name__}") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _find(root: ElementTree.Element, name: str) -> str:
    found = next((node for node in root.iter() if _local(node.tag) == name), None)
    return (found.text or "").strip() if found is not None else ""


def _caller(status: int, answer: bytes) -> tuple[str, str]:
    """(ARN, account) from STS's answer; Unauthenticated when STS refused the signature."""
    try:
        # From STS (or a proxy in front of it), at most 16 KB; expat refuses entity bombs.
        root = ElementTree.fromstring(answer)  # noqa: S314
    except ElementTree.ParseError:
        raise StsUnavailable(f"GetCallerIdentity: unreadable answer (HTTP {status})") from None
    if status != 200 or _local(root.tag) == "ErrorResponse":
        code = _find(root, "Code")
        code = code if _CODE.fullmatch(code) else "error"
        detail = f"GetCallerIdentity: {code} (HTTP {status})"
        if status >= 500 or status == 429 or code in _THROTTLING:
            raise StsUnavailable(detail)
        raise Unauthenticated(f"AWS attestation refused by STS: {code}", reason="bad_signature")
    arn, account = _find(root, "Arn"), _find(root, "Account")
    if not arn or not account:
        raise StsUnavailable("GetCallerIdentity: incomplete answer")
    return arn, account
