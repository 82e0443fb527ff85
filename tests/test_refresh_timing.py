"""Refresh timing, as a property: over every role duration policy check accepts and every refresh
setting, no credential a sidecar holds while the broker is reachable has less than 15 minutes
left (SDKs treat less as "about to expire"; 896 s and 849 s were once served while all was
healthy). The broker's cache schedule and the sidecar's refresh delay are the pure functions that
decide it; this walks them through a timeline of refreshes against a broker that always answers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaproxy.broker.credentials.local import refresh_schedule
from metaproxy.policy.load import MAX_DURATION, MIN_POLICY_DURATION
from metaproxy.sidecar.credentials_cache import JITTER, refresh_delay

MIN_SERVE = 900.0  # the sidecar's default --min-serve-seconds: the SDKs' 15 minutes
BROKER_TIMEOUT = 5.0  # the sidecar's default --broker-timeout: the longest an answer takes


@dataclass
class CachedSet:
    issued: float  # when STS issued it (the broker's `issued_at`)
    expires: float
    revalidate_at: float
    refresh_at: float


class Broker:
    """The broker's cache for one key, on a timeline: a cached set until `refresh_at`, a
    background refresh from `revalidate_at`, callers wait for STS past `refresh_at`."""

    def __init__(self, duration: float, fraction: float, latency: float) -> None:
        self.duration, self.fraction, self.latency = duration, fraction, latency
        self.entry: CachedSet | None = None
        self.pending: float | None = None  # when an STS call in flight completes

    def _fetched(self, at: float) -> CachedSet:
        revalidate_in, refresh_in = refresh_schedule(self.duration, self.fraction)
        self.entry = CachedSet(at, at + self.duration, at + revalidate_in, at + refresh_in)
        self.pending = None
        return self.entry

    def ask(self, now: float) -> tuple[CachedSet, float]:
        """The set a request at `now` gets, and when its answer arrives."""
        if self.pending is not None and self.pending <= now:
            self._fetched(self.pending)
        entry = self.entry
        if entry is not None and now < entry.refresh_at:
            if now >= entry.revalidate_at and self.pending is None:
                self.pending = now + self.latency
            return entry, now
        done = self.pending if self.pending is not None else now + self.latency
        return self._fetched(done), done


@settings(max_examples=400, deadline=None)
@given(
    duration=st.integers(MIN_POLICY_DURATION, MAX_DURATION),
    broker_fraction=st.floats(0.1, 0.9),  # the broker's --cache-refresh-fraction bounds
    sidecar_fraction=st.floats(0.1, 0.9),  # the sidecar's --refresh-fraction bounds
    check_seconds=st.sampled_from([0.0, 60.0, 600.0]),  # --revocation-check-seconds (0: off)
    latency=st.floats(0.0, BROKER_TIMEOUT),
    first_ask=st.floats(0.0, 1.0),  # when the sidecar starts, as a share of the duration
    jitters=st.lists(st.floats(1 - JITTER, 1 + JITTER), min_size=1, max_size=8),
)
@pytest.mark.slow  # started first: see tests/conftest.py
def test_no_credential_held_while_the_broker_answers_has_under_15_minutes_left(
    duration: int,
    broker_fraction: float,
    sidecar_fraction: float,
    check_seconds: float,
    latency: float,
    first_ask: float,
    jitters: list[float],
) -> None:
    """From the first grant on, across three lifetimes of refreshes, the set the sidecar holds
    has at least 15 minutes left at every moment: at receipt and until its replacement lands."""
    broker = Broker(duration, broker_fraction, latency)
    broker.ask(0.0)  # another sidecar warmed the key
    held, now = broker.ask(first_ask * duration)
    refreshes = 0
    while now < 3 * duration:
        assert held.expires - now >= MIN_SERVE, ("received", held, now)
        delay = refresh_delay(
            held.expires - held.issued,
            held.expires - now,
            refresh_fraction=sidecar_fraction,
            min_serve=MIN_SERVE,
            jitter=jitters[refreshes % len(jitters)],
        )
        if check_seconds:
            delay = min(delay, check_seconds)
        fresh, answered = broker.ask(now + delay)
        # Until the answer lands, the old set is what the sidecar serves.
        assert held.expires - answered >= MIN_SERVE, ("held until", held, answered)
        held, now = fresh, answered
        refreshes += 1
    assert refreshes >= 3


@given(
    lifetime=st.floats(MIN_POLICY_DURATION, MAX_DURATION),
    left_share=st.floats(0.0, 1.0),
    fraction=st.floats(0.1, 0.9),
    jitter=st.floats(1 - JITTER, 1 + JITTER),
)
def test_refresh_is_asked_before_the_15_minute_window_whatever_the_jitter(
    lifetime: float, left_share: float, fraction: float, jitter: float
) -> None:
    """The jittered delay never lands inside the last 15 minutes plus a margin (once +10% of a
    long delay overshot it), and is never under a second (no tight loop)."""
    left = lifetime * left_share
    delay = refresh_delay(
        lifetime, left, refresh_fraction=fraction, min_serve=MIN_SERVE, jitter=jitter
    )
    assert delay >= 1.0
    if left - MIN_SERVE - 60 >= 1.0:
        assert left - delay >= MIN_SERVE + 60
