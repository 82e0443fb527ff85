"""A circuit breaker in front of STS: closed → open after N consecutive failures → half-open.

While STS is unreachable every call would wait for a connect or read timeout, holding a worker
and a request each; open, the breaker fails them at once (503 with Retry-After) and the cache
serves valid credentials it already has. After the cool-down one probe call is let through:
its success closes the circuit, its failure opens it for another cool-down.

Only "STS is not answering" counts as a failure (connection refused, timeouts, 5xx). Throttling
is STS answering, and a 4xx refusal is STS working; neither moves the breaker.
"""

from __future__ import annotations

from typing import Literal

from metaproxy.clock import Clock

CircuitState = Literal["closed", "open", "half_open"]
STATE_CODES: dict[CircuitState, float] = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


class CircuitBreaker:
    def __init__(self, clock: Clock, *, failure_threshold: int = 5, cool_down: float = 5.0) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if cool_down <= 0:
            raise ValueError("cool_down must be positive")
        self._clock = clock
        self._threshold = failure_threshold
        self._cool_down = cool_down
        self._state: CircuitState = "closed"
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.opened = 0  # how many times it opened, for stats

    @property
    def state(self) -> CircuitState:
        if self._state == "open" and self._cool_down_over():
            return "half_open"
        return self._state

    def retry_after(self) -> float:
        """Seconds until a call may be tried again (0 when closed)."""
        if self._state == "closed":
            return 0.0
        return max(0.0, self._opened_at + self._cool_down - self._clock.monotonic())

    def rejects_now(self) -> bool:
        """True while open and cooling down: new work should fail fast, not even queue."""
        return self._state == "open" and not self._cool_down_over()

    def allow(self) -> bool:
        """May a call go to STS now? In half-open state only one probe at a time may."""
        if self._state == "closed":
            return True
        if self._state == "open":
            if not self._cool_down_over():
                return False
            self._state = "half_open"
        if self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def record_success(self) -> None:
        self._state = "closed"
        self._consecutive_failures = 0
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._consecutive_failures += 1
        probe_failed = self._state == "half_open"
        self._probe_in_flight = False
        if probe_failed or (
            self._state == "closed" and self._consecutive_failures >= self._threshold
        ):
            self._state = "open"
            self._opened_at = self._clock.monotonic()
            self.opened += 1

    def record_neutral(self) -> None:
        """STS answered without proving itself healthy (throttled): frees a probe slot only."""
        if self._state == "half_open":
            self._probe_in_flight = False

    def _cool_down_over(self) -> bool:
        return self._clock.monotonic() - self._opened_at >= self._cool_down
