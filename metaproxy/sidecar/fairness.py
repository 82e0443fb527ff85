"""A fair share of the pod's request rate between the connections of the pod.

Every container of a pod shares the pod's network namespace, so every client of the sidecar has
the same source address: a bucket per address is a bucket per pod. That is the right limit (it
protects the broker and the node) but, alone, an unfair one: a process looping on the token path
drained it, and another process of the same pod, fetching credentials every 200 ms like an SDK,
got 429 on 30% of its fetches (issue 13).

So inside the pod's bucket (rate R, burst B, per path class) the connections get a max-min fair
share, by one rule: **a connection that has used more than its share may not take the last half
of the bucket.**

- A connection's use is its admitted requests, decayed with a one-second time constant (about
  "requests in the last second"); a connection is active while that is above a small floor.
- Its fair share is R / (active connections of the pod), per second.
- A connection under its share takes any token the bucket has; one over it only takes tokens
  while the bucket is more than half full. Loopers therefore hold the bucket at half, and the
  other half stays for connections that ask rarely — an SDK's occasional token, listing and
  credentials, each often on a new connection, which starts with no use at all.
- The pod's limit is unchanged: every admitted request still takes a token from the pod's bucket.

Refusals stay cheap: the caller answers a canned 429 after its tarpit, so a looping connection
costs a few refusals a second. A client that opens a new connection per request is limited by
the pod's bucket and by the connection guard (which evicts idle connections first); fairness is
between connections, the one thing the sidecar can tell apart inside a pod.
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
MAX_PODS = 64  # source addresses remembered (a sidecar serves one pod, maybe via a proxy)


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
    """`take(pod, connection, rate, burst)` → 0.0 to go ahead, else a Retry-After in seconds."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._pods: dict[str, _Pod] = {}

    def take(self, pod_key: str, connection: int, rate: float, burst: float) -> float:
        now = self._monotonic()
        pod = self._pods.get(pod_key)
        if pod is None:
            if len(self._pods) >= MAX_PODS:
                self._pods.pop(next(iter(self._pods)))
            pod = self._pods[pod_key] = _Pod(TokenBucket(rate, burst, burst, now))
        bucket = pod.bucket
        bucket.rate, bucket.burst = rate, burst
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if now - pod.pruned >= PRUNE_SECONDS:
            self._prune(pod, now)
        use = pod.use.get(connection)
        if bucket.tokens - 1.0 >= burst * RESERVE:
            floor = 0.0  # above the reserve every connection may take: no share to work out
        else:
            mine = use.decayed(now) if use is not None else 0.0
            active = len(pod.use) + (use is None)  # `connection` included
            floor = burst * RESERVE if mine >= rate * DECAY_SECONDS / active else 0.0
        if bucket.tokens - 1.0 >= floor:
            bucket.tokens -= 1.0
            if use is None:
                pod.use[connection] = _Use(1.0, now)
            else:
                use.decayed(now)
                use.amount += 1.0
            return 0.0
        if rate <= 0:
            return 60.0
        return max(1.0, (floor + 1.0 - bucket.tokens) / rate)

    @staticmethod
    def _prune(pod: _Pod, now: float) -> None:
        """Forget the pod's inactive connections. At most ten times a second, so that a burst of
        connections costs a count of the active ones, not a scan, each."""
        pod.pruned = now
        idle = [conn for conn, use in pod.use.items() if use.decayed(now) < ACTIVE_FLOOR]
        for conn in idle:
            del pod.use[conn]
