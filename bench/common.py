"""Helpers shared by the benchmarks (and the broker load tests): percentiles, result files,
tenant policies generated for load.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# High enough that the per-tenant rate limits never interfere with a load test: those are tested
# on their own; here the queue, the workers and the STS budget are under test.
UNLIMITED_BROKER_LIMITS = {
    "requests_per_second": 100_000,
    "burst": 100_000,
    "max_in_flight": 100_000,
    "per_identity_rps": 100_000,
    "per_identity_burst": 100_000,
}


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (`fraction` in [0, 1]); 0.0 for no values."""
    if not values:
        return 0.0
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("fraction must be between 0 and 1")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def write_json(name: str, data: dict[str, Any], directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def tenant_policy(
    tenant: str, *, account: str = "111111111111", duration_seconds: int = 3600
) -> str:
    """A policy file for tenant `tenant`: platform tokens with tenant claim `tenant`, one role,
    broker limits out of the way."""
    limits = "\n".join(f"{key} = {value}" for key, value in UNLIMITED_BROKER_LIMITS.items())
    return f"""tenant = "{tenant}"
team = "bench"

[[identities]]
kind = "platform"
tenant = "{tenant}"

[[roles]]
arn = "arn:aws:iam::{account}:role/{tenant}-app"
default = true
apps = ["*"]
duration_seconds = {duration_seconds}

[session]
name = "${{tenant}}.${{task}}"

[limits.broker]
{limits}

# end of policy
"""


def write_tenant_policies(
    directory: Path, tenants: Iterable[str], *, duration_seconds: int = 3600
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for tenant in tenants:
        text = tenant_policy(tenant, duration_seconds=duration_seconds)
        (directory / f"{tenant}.toml").write_text(text)
    return directory


def pin(pid: int, cores: set[int]) -> None:
    """Keep a process on these cores (servers on one, load generators on the other)."""
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, cores)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a running process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may contain spaces; the fields after it are space-separated.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_jiffies() -> dict[int, tuple[int, int]]:
    """Each core's (busy, total) jiffies since boot, from /proc/stat; idle and iowait are not
    busy. Two readings give how busy each core was between them, whoever kept it busy."""
    cores = {}
    with open("/proc/stat") as stat:
        for line in stat:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                times = [int(value) for value in values]
                cores[int(name[3:])] = (sum(times) - times[3] - times[4], sum(times))
    return cores


class CpuWatch:
    """CPU used between `start()` and `stop()` by some processes (user + system, from
    /proc/PID/stat, their threads included) and by each core (from /proc/stat).

    `share(pids, cores)` is their CPU over the wall time as a fraction of `cores` cores: 1.0 is
    a process that kept the one core it is pinned to busy the whole time.
    """

    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = tuple(pids)
        self._cpu: dict[int, float] = {}
        self._cores: dict[int, tuple[int, int]] = {}
        self._started = 0.0
        self.wall = 0.0
        self.cpu: dict[int, float] = {}  # pid → CPU seconds in the window
        self.core_busy: dict[int, float] = {}  # core → busy share of the window

    def start(self) -> None:
        self._cpu = {pid: process_cpu_seconds(pid) for pid in self.pids}
        self._cores = core_jiffies()
        self._started = time.monotonic()

    def stop(self) -> None:
        self.wall = time.monotonic() - self._started
        self.cpu = {pid: process_cpu_seconds(pid) - self._cpu[pid] for pid in self.pids}
        now = core_jiffies()
        self.core_busy = {
            core: (busy - self._cores[core][0]) / max(1, total - self._cores[core][1])
            for core, (busy, total) in now.items()
        }

    def share(self, pids: Iterable[int], cores: int = 1) -> float:
        """CPU of `pids` together over the window's wall time, per core of `cores`."""
        return sum(self.cpu[pid] for pid in pids) / (self.wall * cores) if self.wall else 0.0
