"""Fair turns at the broker's expensive first step: verifying the token and finding the policy.

The broker has one event loop. When a tenant's deployment sends thousands of requests at once,
each loop turn runs every one of them that has arrived (about 0.4 ms each: signature, policy,
audit), turns last hundreds of milliseconds, and another tenant's single request waits behind
the whole burst before anyone even knows which tenant it is from.

`FairAdmission` hands out a few turns per loop turn, round robin across tenants, so a tenant's
first request is verified within a few short loop turns however many requests another tenant
has waiting; the loop's turns stay short, which also keeps the STS workers on time.

The lane a request waits in is its token's tenant claim, read *before* verification. That
claim decides only the order of verification, never an answer: a forged token claiming tenant
X waits in X's lane and is then refused like any other. Its worst effect is to share X's lane
with X's own requests; the other tenants' lanes are untouched. (Kubernetes tokens use their
namespace claim; AWS attestations, whose tenant only STS's answer tells, share one lane of
their own; anything unreadable shares another.)
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict, deque
from dataclasses import dataclass

from metaproxy.aws_attestation import TOKEN_PREFIX as AWS_ATTESTATION
from metaproxy.identity.keys import b64url_decode

UNKNOWN_LANE = "?"
AWS_LANE = "aws:"  # no tenant name has a colon
MAX_LANE_CHARS = 64


def lane_for(token: str | None) -> str:
    """The tenant (or Kubernetes namespace) a token *claims*, unverified; for ordering only."""
    if token and token.startswith(AWS_ATTESTATION):
        return AWS_LANE
    if not token or token.count(".") != 2 or len(token) > 8192:
        return UNKNOWN_LANE
    try:
        claims = json.loads(b64url_decode(token.split(".", 2)[1]))
    except (ValueError, RecursionError):
        return UNKNOWN_LANE
    if not isinstance(claims, dict):
        return UNKNOWN_LANE
    tenant = claims.get("tenant")
    if not isinstance(tenant, str):
        kubernetes = claims.get("kubernetes.io")
        tenant = kubernetes.get("namespace") if isinstance(kubernetes, dict) else None
    if not isinstance(tenant, str) or not tenant:
        return UNKNOWN_LANE
    return tenant[:MAX_LANE_CHARS]


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    waiting: int  # requests waiting for their turn now
    lanes: int  # tenants (claimed) among them
    waited: int  # requests that had to wait, since the start


class FairAdmission:
    """At most `per_turn` requests start their first step per event-loop turn, tenants in turn.

    With nobody waiting, a request goes straight through (one check, no await)."""

    def __init__(self, per_turn: int = 4) -> None:
        if per_turn < 1:
            raise ValueError("per_turn must be at least 1")
        self._per_turn = per_turn
        self._lanes: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._waiting = 0
        self._granted = 0  # turns handed out since the last dispatch
        self._dispatch_scheduled = False
        self.waited = 0  # requests that had to wait for a turn

    async def wait_turn(self, lane: str) -> None:
        """Return when this request may start (at once when nobody is waiting)."""
        if not self._waiting and self._granted < self._per_turn:
            self._granted += 1
            self._schedule_dispatch()  # resets the count on the next loop turn
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lanes.setdefault(lane, deque()).append(waiter)
        self._waiting += 1
        self.waited += 1
        self._schedule_dispatch()
        await waiter  # a cancelled waiter is skipped by the dispatcher

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Once per loop turn: grant `per_turn` waiters, one lane after another."""
        self._dispatch_scheduled = False
        self._granted = 0
        while self._waiting and self._granted < self._per_turn:
            lane, waiters = next(iter(self._lanes.items()))
            self._lanes.move_to_end(lane)  # this lane has had its turn
            waiter = waiters.popleft()
            self._waiting -= 1
            if not waiters:
                del self._lanes[lane]
            if waiter.done():  # its request went away while it waited
                continue
            waiter.set_result(None)
            self._granted += 1
        if self._waiting or self._granted:
            self._schedule_dispatch()

    def stats(self) -> AdmissionStats:
        return AdmissionStats(self._waiting, len(self._lanes), self.waited)
