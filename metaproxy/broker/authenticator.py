"""Who is asking: a request's turn at verification, its token verified, its failure accounted.

Verification is the broker's expensive first step, so requests take it in fair turns across
the tenants their tokens claim (`admission.py`); a token that fails costs its peer a bounded
number of audit records and log lines (`authn.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from metaproxy.broker.admission import FairAdmission, lane_for
from metaproxy.broker.authn import FailedAuthentications
from metaproxy.errors import Unauthenticated
from metaproxy.identity.verify import IdentityVerifier
from metaproxy.models import Identity


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Where a request came from, bound once and carried to every record it causes;
    `operator`: whose control token a control request carried."""

    request_id: str
    peer: str
    operator: str = ""


class Attestor(Protocol):
    """Another kind of proof than a JWT (`attest/attestor.py`: a signed GetCallerIdentity)."""

    def claims(self, token: str) -> bool: ...

    async def attest(self, token: str) -> Identity: ...


class Authenticator:
    def __init__(
        self,
        verifier: IdentityVerifier,
        failures: FailedAuthentications,
        turns: FairAdmission | None = None,
        attestor: Attestor | None = None,
    ) -> None:
        self._verifier = verifier
        self.failures = failures
        self.turns = turns or FairAdmission()
        self._attestor = attestor

    async def authenticate(self, token: str | None, ctx: RequestContext) -> Identity:
        """The verified identity, or `Unauthenticated` (or `TooManyRequests` for a peer over
        its failure budget), with the failure already accounted for."""
        await self.turns.wait_turn(lane_for(token))
        try:
            if not token:
                raise Unauthenticated("no bearer token", reason="missing")
            if self._attestor is not None and self._attestor.claims(token):
                return await self._attestor.attest(token)
            return await self._verifier.verify_fetching(token)
        except Unauthenticated as exc:
            await self.failures.failed(exc, ctx.request_id, ctx.peer)
            raise
