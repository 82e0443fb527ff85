"""What the fault proxy received: every AssumeRole call and the latest requests, with signers.

Each AssumeRole call is kept with its parameters and the access key id that signed it, so a
test can check what the broker asked STS for, and as whom. So is every request (the latest
`MAX_RECORDED_REQUESTS`): method, path and signing key, because moto checks no signature, so
only the proxy can tell which credentials a client used (`aws_requests.py`).
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs

from aiohttp import web

from metaproxy.testing.aws_requests import signing_key, sts_action

# Enough for any test's clients; bounded because benchmarks send millions of requests through.
MAX_RECORDED_REQUESTS = 10_000


@dataclass(frozen=True)
class RecordedCall:
    """One AssumeRole as the proxy received it. `access_key_id` is the key that signed the call
    (a chain's second hop is signed with the first hop's)."""

    params: dict[str, str]  # the form, e.g. RoleArn, ExternalId, Tags.member.1.Key
    access_key_id: str
    at: float  # monotonic

    def tags(self) -> dict[str, str]:
        """Tags.member.N.Key/Value as a dict."""
        found: dict[str, str] = {}
        for name, key in self.params.items():
            if name.startswith("Tags.member.") and name.endswith(".Key"):
                found[key] = self.params.get(name[: -len("Key")] + "Value", "")
        return found

    def transitive_tag_keys(self) -> list[str]:
        return [
            value
            for name, value in sorted(self.params.items())
            if name.startswith("TransitiveTagKeys.member.")
        ]


@dataclass(frozen=True)
class RecordedRequest:
    """Any request as the proxy received it, and the access key id that signed it (empty when
    unsigned)."""

    method: str
    path: str
    access_key_id: str
    at: float  # monotonic


class Recording:
    """The calls and requests received since the last `reset`, and the proxy's counters."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests_total = 0
        self.assume_role_forwarded = 0
        self.assume_role_throttled = 0
        self.assume_role_failed = 0
        self.requests_reset = 0
        self.requests_held = 0
        self.assume_role_times: list[float] = []
        self.assume_role_calls: list[RecordedCall] = []
        self.requests: collections.deque[RecordedRequest] = collections.deque(
            maxlen=MAX_RECORDED_REQUESTS
        )

    def received(self, request: web.Request, body: bytes | None, at: float) -> bool:
        """Record a request (`body` when it was read); whether it is an AssumeRole call."""
        signer = signing_key(request)
        self.requests_total += 1
        self.requests.append(RecordedRequest(request.method, request.path, signer, at))
        if sts_action(request, body) != "AssumeRole":
            return False
        form = parse_qs(body.decode("utf-8", "replace")) if body else {}
        params = {name: values[0] for name, values in form.items()}
        params.update(dict(request.query.items()))
        self.assume_role_times.append(at)
        self.assume_role_calls.append(RecordedCall(params, signer, at))
        return True

    def max_rate(self, window: float = 1.0) -> float:
        """The highest AssumeRole rate (calls per second) over any `window`-second interval."""
        if window <= 0:
            raise ValueError("window must be positive")
        return max_calls_in_window(self.assume_role_times, window) / window

    def counters(self) -> dict[str, object]:
        return {
            "requests_total": self.requests_total,
            "assume_role_calls": len(self.assume_role_times),
            "assume_role_forwarded": self.assume_role_forwarded,
            "assume_role_throttled": self.assume_role_throttled,
            "assume_role_failed": self.assume_role_failed,
            "requests_reset": self.requests_reset,
            "requests_held": self.requests_held,
            "max_rate_1s": self.max_rate(1.0),
        }


def max_calls_in_window(timestamps: Sequence[float], window: float = 1.0) -> int:
    """The most timestamps in any half-open interval `[t, t + window)`."""
    ordered = sorted(timestamps)
    best = 0
    for start_index, start in enumerate(ordered):
        end_index = bisect.bisect_left(ordered, start + window, lo=start_index)
        best = max(best, end_index - start_index)
    return best
