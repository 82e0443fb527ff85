"""A fair share of the pod's request rate between the connections of the pod.

A sidecar serves one pod, and every container of a pod shares the pod's network namespace: the
pod's token bucket (per path class) is one bucket for the whole sidecar. That is the right limit
(it protects the broker and the node) but, alone, an unfair one: a process looping on the token
path drained it, and another process of the same pod, fetching credentials every 200 ms like an
SDK, got refused on 30% of its fetches (issue 13). One bucket, not one per source address:
through the link-local redirect a client's source address is the address it dialled
(169.254.170.2, 127.0.0.1, ::1…), and a bucket per address gave a pod five.

So inside the pod's bucket (rate R, burst B, per path class) the connections get a max-min fair
share, by one rule: **a connection that asks for more than its share may not take the last half
of the bucket.**

- A connection's demand is what it asked for — admitted or refused — decayed with a one-second
  time constant (about "requests in the last second"); a connection is active while that is
  above a small floor. Demand, not what it got: refusals kept a looper's admitted use near its
  share, and spread over a few connections it slipped under it half the time and drained the
  other half too (an SDK asking once a second got nothing against eight looping connections at
  2 requests/s).
- Its fair share is R / (active connections of the pod), per second.
- A connection under its share takes any token the bucket has; one over it only takes tokens
  while the bucket is more than half full. Loopers therefore hold the bucket at half, and the
  other half stays for connections that ask rarely — an SDK's occasional token, listing and
  credentials, each often on a new connection, which starts with no demand at all. A connection
  alone still gets the whole rate: every token refilled above half is its.
- The pod's limit is unchanged: every admitted request still takes a token from the pod's bucket.

Refusals stay cheap: the caller answers a canned refusal after its tarpit, so a looping
connection costs a few refusals a second. A client that opens a new connection per request is
limited by the pod's bucket and by the connection guard (which evicts idle connections first);
fairness is between connections, the one thing the sidecar can tell apart inside a pod.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from metaproxy.ratelimit import TokenBucket

DECAY_SECONDS = 1.0
ACTIVE_FLOOR = 0.05  # decayed use below this: the connection no longer counts as active
RESERVE = 0.5  # the part of the bucket kept for connections under their share
PRUNE_SECONDS = 0.1
_exp = math.exp  # a global name fewer to look up per request


@dataclass(slots=True)
class _Use:
    amount: float
    updated: float

    def decayed(self, now: float) -> float:
        if now > self.updated:
            self.amount *= math.exp((self.updated - now) / DECAY_SECONDS)
            self.updated = now
        return self.amount


@dataclass(slots=True)
class _Pod:
    bucket: TokenBucket
    use: dict[int, _Use] = field(default_factory=dict)  # by connection; closed ones decay out
    pruned: float = 0.0


class FairShare:
    """`take(connection, rate, burst)` → 0.0 to go ahead, else a Retry-After in seconds."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._pod: _Pod | None = None

    def take(self, connection: int, rate: float, burst: float, count: int = 1) -> float:
        """0.0 when `count` requests of `connection` that arrived together all go ahead, each
        taken as if alone; else the first refused one's Retry-After, and none of them taken. A
        lone request refused counts in its connection's demand; of `count` > 1 none does: the
        caller then takes them one by one (`app.data_plane`'s pipelined repeats)."""
        # Every request of the pod comes through here: the bucket's and the connection's
        # figures are read into locals once and written back once.
        now = self._monotonic()
        pod = self._pod
        if pod is None:
            pod = self._pod = _Pod(TokenBucket(rate, burst, burst, now))
        bucket = pod.bucket
        tokens = bucket.tokens + (now - bucket.updated) * rate
        if tokens > burst:  # noqa: PLR1730 - min() is a call, and this runs per request
            tokens = burst
        bucket.rate, bucket.burst, bucket.updated, bucket.tokens = rate, burst, now, tokens
        if now - pod.pruned >= PRUNE_SECONDS:
            self._prune(pod, now)
        use = pod.use.get(connection)
        if use is None:
            use = pod.use[connection] = _Use(0.0, now)
        # What it asked for before these requests, decayed to now (`_Use.decayed`, inlined).
        mine = use.amount
        if now > use.updated:
            mine *= _exp((use.updated - now) / DECAY_SECONDS)
            use.amount, use.updated = mine, now
        reserve = burst * RESERVE
        if tokens - count >= reserve:
            # Above the reserve even after the last of them: each goes ahead whatever its share
            # (the loop below, in one step; whole tokens off a float above 1 are exact).
            bucket.tokens, use.amount = tokens - count, mine + count
            return 0.0
        share = rate * DECAY_SECONDS / len(pod.use)
        left, asked = tokens, mine
        for _ in range(count):
            # Above the reserve every connection may take: no share to work out.
            floor = reserve if left - 1.0 < reserve and asked >= share else 0.0
            if left - 1.0 < floor:
                break
            left -= 1.0
            asked += 1.0  # what it asked for, served or not
        else:
            bucket.tokens, use.amount = left, asked
            return 0.0
        if count == 1:
            use.amount = mine + 1.0
        if rate <= 0:
            return 60.0
        return max(1.0, (floor + 1.0 - left) / rate)

    @staticmethod
    def _prune(pod: _Pod, now: float) -> None:
        """Forget the pod's inactive connections. At most ten times a second, so that a burst of
        connections costs a count of the active ones, not a scan, each."""
        pod.pruned = now
        idle = [conn for conn, use in pod.use.items() if use.decayed(now) < ACTIVE_FLOOR]
        for conn in idle:
            del pod.use[conn]
