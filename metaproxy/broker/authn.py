"""What a failed authentication may cost: bounded audit records and log lines per network.

Every unauthenticated request used to cost an fsynced audit record and a WARNING line, without
limit: one client grew the audit directory by 2.3 MB/s, enough to fill a Deployment's 2 GiB
audit volume in about 15 minutes and get the pod evicted. Now:

- the first failure with a given reason from a peer address is recorded as before; identical
  failures from it within the window are counted, answered 401 without a log line, and written
  as one summary record (`count`) when the window ends (`summaries.py`);
- records of *new* reasons come from token buckets (`burst`, refilled at `per_second`), one per
  network, not per address: a /24 for IPv4 and a /64 for IPv6, since whoever holds one address
  of a network usually holds them all, and rotating source addresses used to open a fresh
  budget each time. A network that has spent its bucket is answered 429 before its failure
  costs anything, and those refusals are summarised per network;
- one more bucket (`global_burst`, `global_per_second`) is shared by every network, so a flood
  from many networks costs a bounded number of records too (its refusals are one summary).

Verification itself still runs for every request, so a valid token from a peer that also sent
bad ones is served as usual: only failures are limited.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from metaproxy.audit.record import AuditEvent
from metaproxy.broker.summaries import WINDOW_SECONDS, EventLog, SummaryWindows
from metaproxy.clock import Clock
from metaproxy.errors import TooManyRequests, Unauthenticated

BURST = 20  # distinct failure records a network may cost at once
PER_SECOND = 1.0  # and then per second
GLOBAL_BURST = 200  # and every network together
GLOBAL_PER_SECOND = 20.0
MAX_TRACKED = 10_000  # networks whose buckets are remembered
OVER_LIMIT = "failed authentications over the per-peer limit"
OVER_GLOBAL_LIMIT = "failed authentications over the broker's limit"
EVERY_PEER = "*"  # the peer the global bucket's summary names
IPV4_PREFIX, IPV6_PREFIX = 24, 64


def peer_network(peer: str) -> str:
    """The network a peer's failure budget belongs to: `192.0.2.0/24`, `2001:db8::/64`; a
    peer that is not an address (`unix`) is its own."""
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
    prefix = IPV4_PREFIX if address.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float

    def refill(self, now: float, burst: int, per_second: float) -> None:
        self.tokens = min(float(burst), self.tokens + (now - self.updated) * per_second)
        self.updated = now


class FailedAuthentications:
    def __init__(
        self,
        audit: EventLog,
        clock: Clock,
        *,
        rule: str = "authentication",
        window: float = WINDOW_SECONDS,
        burst: int = BURST,
        per_second: float = PER_SECOND,
        global_burst: int = GLOBAL_BURST,
        global_per_second: float = GLOBAL_PER_SECOND,
    ) -> None:
        self._audit = audit
        self._clock = clock
        # Keyed (peer address, reason), and (network or EVERY_PEER, OVER_…) for the 429s.
        self._windows: SummaryWindows[tuple[str, str]] = SummaryWindows(
            audit, clock, name=f"{rule}-failure-summaries", window=window
        )
        self._rule = rule  # "authentication" (credential requests) or "control-authentication"
        self._burst = burst
        self._per_second = per_second
        self._global_burst = global_burst
        self._global_per_second = global_per_second
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._global = _Bucket(float(global_burst), clock.monotonic())
        self.summarised = 0  # failures answered without their own record (metrics, tests)

    async def start(self) -> None:
        await self._windows.start()

    async def aclose(self) -> None:
        """Write every pending summary (before the audit log closes)."""
        await self._windows.aclose()

    async def flush(self, *, everything: bool = False) -> int:
        """Write the summaries of ended windows (of all with `everything`); how many."""
        return await self._windows.flush(everything=everything)

    async def failed(self, exc: Unauthenticated, request_id: str, peer: str) -> None:
        """Account for one failed authentication: record it, count it, or refuse the peer
        (TooManyRequests). Returns when `exc` may be raised to the client."""
        if self._windows.repeat((peer, exc.detail)):
            self.summarised += 1
            exc.quiet = True  # one WARNING per window, not per request
            return
        over = self._over_budget(peer_network(peer))
        if over is not None:
            network, reason = over
            self._windows.count((network, reason), self._event(request_id, network, reason, 429))
            self.summarised += 1
            refused = TooManyRequests(reason, retry_after=self._windows.window)
            refused.quiet = True
            raise refused from None
        first = self._event(request_id, peer, exc.detail, 401)
        # Opened before the write: identical failures arriving while it is written repeat it.
        self._windows.opens((peer, exc.detail), first)
        await self._audit.append(first)

    def _event(self, request_id: str, peer: str, reason: str, status: int) -> AuditEvent:
        return AuditEvent(
            event="denied",
            request_id=request_id,
            peer=peer,
            rule=self._rule,
            reason=reason,
            status=status,
        )

    def _over_budget(self, network: str) -> tuple[str, str] | None:
        """None, with a token taken from the network's bucket and from the shared one; or
        which of them is empty, the network's looked at first: a network past its own budget
        takes nothing more from the one every network shares."""
        now = self._clock.monotonic()
        bucket = self._buckets.get(network)
        if bucket is None:
            bucket = self._buckets[network] = _Bucket(float(self._burst), now)
            if len(self._buckets) > MAX_TRACKED:
                self._buckets.popitem(last=False)  # a forgotten network starts with a full bucket
        self._buckets.move_to_end(network)
        bucket.refill(now, self._burst, self._per_second)
        if bucket.tokens < 1.0:
            return network, OVER_LIMIT
        self._global.refill(now, self._global_burst, self._global_per_second)
        if self._global.tokens < 1.0:
            return EVERY_PEER, OVER_GLOBAL_LIMIT
        bucket.tokens -= 1.0
        self._global.tokens -= 1.0
        return None
