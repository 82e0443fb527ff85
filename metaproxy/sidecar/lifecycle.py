"""The task's end, announced the way EC2 announces an instance's.

Spot-aware software (Spark, Ray, Flink, CI runners, aws-node-termination-handler) polls
`meta-data/spot/instance-action` and `meta-data/autoscaling/target-lifecycle-state` and
checkpoints when they appear. When the task is being stopped — SIGTERM to the sidecar — the
sidecar serves both for the rest of its drain, so those applications leave as they do on EC2. No
other metadata proxy does this; on a plain container platform nothing tells the application in
advance at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from metaproxy.clock import iso_z


@dataclass(frozen=True, slots=True)
class Termination:
    """The task is stopping: noticed at `noticed`, gone at `action_time` (the drain's end)."""

    noticed: datetime
    action_time: datetime

    @classmethod
    def starting(cls, now: datetime, drain_seconds: float) -> Termination:
        return cls(now, now + timedelta(seconds=drain_seconds))

    def tree(self) -> dict[str, Any]:
        """The `meta-data/` entries EC2 has while an instance is being terminated."""
        when = iso_z(self.action_time)
        # AWS's documented shape: {"action": "terminate", "time": "2017-09-18T08:22:00Z"}.
        action = json.dumps({"action": "terminate", "time": when})
        return {
            "autoscaling": {"target-lifecycle-state": "Terminated"},
            "spot": {"instance-action": action, "termination-time": when},
        }


class TerminationNotice:
    """Whether the task is stopping (`begin` at SIGTERM), as the metadata view reads it."""

    __slots__ = ("termination",)

    def __init__(self) -> None:
        self.termination: Termination | None = None

    def begin(self, now: datetime, drain_seconds: float) -> None:
        if self.termination is None:
            self.termination = Termination.starting(now, drain_seconds)

    def overlay(self) -> dict[str, Any] | None:
        return self.termination.tree() if self.termination is not None else None
