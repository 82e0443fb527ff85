"""Helpers shared by the benchmarks (and the broker load tests): percentiles, result files,
tenant policies generated for load.
"""

from __future__ import annotations

import json
import math
import os
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
