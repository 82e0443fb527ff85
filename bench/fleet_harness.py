"""Broker replicas as real processes sharing one store, and the clients that load them: what
the fleet's load tests (tests/test_fleet_load.py) and bench/broker_fleet.py share.

- `FleetFiles`: identity key, tenant policies, the store key and the control token.
- `start_replicas` / `Replica`: `metaproxy broker` processes on loopback ports (plain HTTP: the
  clients' TLS handshakes would take the CPU the brokers and the store need on a small machine,
  and TLS is not what these runs measure), each its own audit directory and instance name.
- `run_burst`: a cold burst in a load-generator process of its own, so that the event loop
  counting STS calls at the fault proxy (the caller's) is not the one sending thousands of
  requests. Clients behave like sidecars behind a Service: on 429/503 they come back after
  Retry-After (plus up to a second of jitter), on a connection error they go to the next replica.
- `offer`: requests at a fixed offered rate, one attempt each (a flood, or a steady tenant).
- `sustained_rate`, `calls_per_second`: what the fault proxy's AssumeRole timeline says.

    python bench/fleet_harness.py burst SPEC.json OUT.json   (the load generator)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from bench.common import percentile, tenant_policy
from metaproxy.demo.local import (
    AUDIENCE,
    EMULATOR_CREDENTIALS,
    ISSUER,
    FleetSecrets,
    make_fleet_secrets,
)
from metaproxy.demo.processes import Child, start_metaproxy, wait_ready

HARNESS = Path(__file__).resolve()
# One address (127.0.0.1) holds every client connection here; the broker gives one address a
# quarter of --max-connections, so this leaves room for a 3,000-task burst on one replica.
MAX_CONNECTIONS = 20_000
REPLICA_START_SECONDS = 60.0
# Connections the burst client holds open to one replica; the rest of its tasks wait their turn
# in the client. A deployment's sidecars are thousands of processes, each writing its request
# at once; one Python process opening thousands of sockets cannot, and a head it is slow to
# write past the broker's 5 s header deadline is a 408 that no sidecar would have caused.
# 500 outstanding requests per replica keep every broker's queue deep (well past what a
# second of the budget drains) while the client keeps up.
CONNECTIONS_PER_REPLICA = 500
FAILOVER_PAUSE_SECONDS = 0.05  # a sidecar reconnecting through the Service after a reset


# -- keys, policies, secrets ---------------------------------------------------------------


@dataclass(frozen=True)
class FleetFiles:
    work: Path
    identity_key: Path
    jwks: Path
    policies_dir: Path
    secrets: FleetSecrets

    def token(self, tenant: str, task: str) -> str:
        from metaproxy.identity.issue import issue_token

        return issue_token(
            self.identity_key, issuer=ISSUER, audience=AUDIENCE, task=task, tenant=tenant
        )


def make_fleet_files(
    work: Path,
    tenants: Sequence[str],
    *,
    limited: Mapping[str, Mapping[str, float]] | None = None,
) -> FleetFiles:
    """Keys and one policy per tenant, with limits out of the way unless `limited` names the
    tenant (then those `[limits.broker]` values)."""
    from metaproxy.identity.keys import generate_keypair

    work.mkdir(parents=True, exist_ok=True)
    identity_key, jwks = generate_keypair(work, "identity")
    policies = work / "policies"
    policies.mkdir(exist_ok=True)
    for tenant in tenants:
        text = tenant_policy(tenant)
        if limited and tenant in limited:
            head = text.split("[limits.broker]", 1)[0]
            lines = [f"{key} = {value}" for key, value in limited[tenant].items()]
            text = head + "[limits.broker]\n" + "\n".join(lines) + "\n\n# end of policy\n"
        (policies / f"{tenant}.toml").write_text(text)
    return FleetFiles(work, identity_key, jwks, policies, make_fleet_secrets(work / "secrets"))


# -- replicas --------------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    child: Child

    @property
    def url(self) -> str:
        return str(self.child.ready["url"])

    @property
    def admin_url(self) -> str:
        return str(self.child.ready["admin_url"])

    @property
    def control_url(self) -> str:
        return str(self.child.ready["control_url"])

    @property
    def pid(self) -> int:
        return int(self.child.ready["pid"])

    @property
    def alive(self) -> bool:
        return self.child.process.poll() is None

    def kill(self) -> None:
        """kill -9: no drain, no goodbye to the store (its leases run out on their own)."""
        if self.alive:
            os.kill(self.child.process.pid, signal.SIGKILL)
        self.child.process.wait()

    def stop(self) -> None:
        self.child.stop()


def replica_args(
    files: FleetFiles,
    name: str,
    *,
    sts_endpoint: str,
    store: str,
    budget: float,
    workers_max: int = 64,
    workers_min: int | None = None,
) -> list[str]:
    """`metaproxy broker` for one replica: `store` "memory" (its own budget, limits and cache)
    or a Redis URL shared with the other replicas; `workers_min` None is the broker's default."""
    directory = files.work / name
    args = [
        "broker",
        *("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"),
        *("--policies-dir", str(files.policies_dir)),
        *("--trust", f"{ISSUER},{AUDIENCE},{files.jwks}"),
        *("--audit-dir", str(directory / "audit"), "--state-dir", str(directory / "state")),
        *("--sts-endpoint", sts_endpoint, "--sts-budget-per-second", f"{budget:g}"),
        *("--workers-max", str(workers_max), "--max-connections", str(MAX_CONNECTIONS)),
        *("--instance", name, "--log-format", "json", "--drain-seconds", "2"),
        *("--control-listen", "127.0.0.1:0"),
        *("--control-token-file", str(files.secrets.control_token_file)),
        *("--heartbeat-seconds", "0.5"),
    ]
    if workers_min is not None:
        args += ["--workers-min", str(workers_min)]
    if store != "memory":
        args += ["--store", store, "--store-key-file", str(files.secrets.store_key_file)]
    return args


def start_replica(files: FleetFiles, name: str, **options: Any) -> Replica:
    """Start one replica and wait until it is ready (it has read the revocations)."""
    directory = files.work / name
    directory.mkdir(parents=True, exist_ok=True)
    child = start_metaproxy(
        name,
        replica_args(files, name, **options),
        ready_file=directory / "ready.json",
        log_file=directory / "broker.log",
        env=EMULATOR_CREDENTIALS,
        timeout=REPLICA_START_SECONDS,
    )
    replica = Replica(name, child)
    try:
        wait_ready(replica.admin_url, timeout=REPLICA_START_SECONDS)
    except TimeoutError:
        replica.stop()
        raise
    return replica


async def start_replicas(
    files: FleetFiles, count: int, *, prefix: str = "replica", **options: Any
) -> list[Replica]:
    """`count` replicas started side by side (each in a thread: starting one is blocking)."""
    names = [f"{prefix}-{n}" for n in range(1, count + 1)]
    started = await asyncio.gather(
        *(asyncio.to_thread(start_replica, files, name, **options) for name in names),
        return_exceptions=True,
    )
    replicas = [r for r in started if isinstance(r, Replica)]
    failures = [r for r in started if isinstance(r, BaseException)]
    if failures:
        await stop_replicas(replicas)
        raise failures[0]
    return replicas


async def stop_replicas(replicas: Sequence[Replica]) -> None:
    await asyncio.gather(*(asyncio.to_thread(r.stop) for r in replicas))


# -- clients ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BurstOutcome:
    tasks: int
    failed: int  # tasks that ended without credentials
    statuses: dict[int, int]  # per attempt; 0 is a connection error
    errors: dict[str, int]
    failovers: int  # attempts that went to another replica after a connection error
    latency_p50: float
    latency_p99: float
    last: float  # seconds from the start to the last credentials
    started: float  # time.monotonic() in the load generator when the burst began

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BurstOutcome:
        return cls(
            **{
                **data,
                "statuses": {int(k): v for k, v in data["statuses"].items()},
            }
        )


async def run_burst(
    work: Path,
    name: str,
    urls: Sequence[str],
    arrivals: Sequence[tuple[int, str]],
    *,
    seconds: float = 120.0,
    client_timeout: float = 60.0,
) -> BurstOutcome:
    """Every (replica index, token) at once, from a load-generator process; returns when every
    task has its credentials or `seconds` have passed."""
    spec, out = work / f"burst-{name}.json", work / f"burst-{name}-out.json"
    spec.write_text(
        json.dumps(
            {
                "urls": list(urls),
                "arrivals": [list(a) for a in arrivals],
                "seconds": seconds,
                "client_timeout": client_timeout,
            }
        )
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HARNESS), "burst", str(spec), str(out)
    )
    if await process.wait() != 0:
        raise RuntimeError(f"load generator exited with {process.returncode}")
    return BurstOutcome.from_json(json.loads(out.read_text()))


async def _burst_main(spec_path: Path, out_path: Path) -> None:
    from metaproxy.sidecar.credentials_cache import retry_delay

    spec = json.loads(spec_path.read_text())
    urls: list[str] = spec["urls"]
    started = time.monotonic()
    deadline = started + spec["seconds"]
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    failovers = failed = 0
    timeout = aiohttp.ClientTimeout(total=spec["client_timeout"])
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONNECTIONS_PER_REPLICA), timeout=timeout
        )
        for _ in urls
    ]

    async def cold_start(index: int, token: str) -> None:
        nonlocal failovers, failed
        headers = {"Authorization": f"Bearer {token}"}
        while time.monotonic() < deadline:
            delay: float
            try:
                async with sessions[index].post(
                    urls[index] + "/v1/credentials", json={}, headers=headers
                ) as response:
                    await response.read()
                    statuses[response.status] += 1
                    if response.status == 200:
                        latencies.append(time.monotonic() - started)
                        return
                    if response.status == 408:
                        # The broker's header deadline ran out while its event loop was busy
                        # accepting the burst: the sidecar retries after a jittered backoff.
                        delay = retry_delay(None, 1.0)
                    elif response.status in (429, 503):
                        retry_after = float(response.headers.get("Retry-After", "1"))
                        delay = retry_delay(retry_after, 1.0)
                    else:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The replica went away (reset, refused): the Service sends the next
                # connection to another one.
                statuses[0] += 1
                errors[type(exc).__name__] += 1
                failovers += 1
                index = (index + 1) % len(urls)
                delay = FAILOVER_PAUSE_SECONDS
            await asyncio.sleep(delay)
        failed += 1

    await asyncio.gather(*(cold_start(index, token) for index, token in spec["arrivals"]))
    for session in sessions:
        await session.close()
    outcome = {
        "tasks": len(spec["arrivals"]),
        "failed": failed,
        "statuses": dict(statuses),
        "errors": dict(errors),
        "failovers": failovers,
        "latency_p50": percentile(latencies, 0.5),
        "latency_p99": percentile(latencies, 0.99),
        "last": max(latencies, default=0.0),
        "started": started,
    }
    out_path.write_text(json.dumps(outcome))


@dataclass
class Offered:
    """What `offer` saw: per attempt, (seconds since start, status; 0 a connection error)."""

    answers: list[tuple[float, int]] = field(default_factory=list)

    def count(self, status: int) -> int:
        return sum(1 for _, s in self.answers if s == status)

    def statuses(self) -> dict[int, int]:
        return dict(Counter(s for _, s in self.answers))


async def offer(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    tokens: Sequence[str],
    *,
    rate: float,
    seconds: float,
) -> Offered:
    """`rate` requests a second for `seconds`, round robin over `urls` and `tokens`, each sent
    once whatever its answer (a flood does not wait for Retry-After)."""
    offered = Offered()
    started = time.monotonic()

    async def one(url: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with session.post(url + "/v1/credentials", json={}, headers=headers) as answer:
                await answer.read()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        offered.answers.append((time.monotonic() - started, status))

    pending: set[asyncio.Task[None]] = set()
    total = int(rate * seconds)
    for n in range(total):
        await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
        task = asyncio.create_task(one(urls[n % len(urls)], tokens[n % len(tokens)]))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending)
    return offered


# -- what the fault proxy counted -------------------------------------------------------------


def sustained_rate(timeline: Sequence[float], ramp: float = 1.0) -> float:
    """AssumeRole calls per second while a burst is queued: the calls from `ramp` seconds after
    the first to the last, over that span. The ramp (workers scaling up, the first requests
    reaching the queue) is left out; the queue stays non-empty until the last call is taken,
    so the end needs no trimming."""
    if len(timeline) < 2:
        return 0.0
    ordered = sorted(timeline)
    begin, end = ordered[0] + ramp, ordered[-1]
    if end <= begin:
        return 0.0
    inside = sum(1 for t in ordered if t >= begin)
    return inside / (end - begin)


def best_window_rate(timeline: Sequence[float], window: float = 5.0) -> float:
    """The most calls in any `window` seconds, per second."""
    from metaproxy.testing.recording import max_calls_in_window

    return max_calls_in_window(timeline, window) / window


def calls_per_second(
    timeline: Sequence[float], start: float, bin_seconds: float = 0.5
) -> list[tuple[float, float]]:
    """(seconds since `start`, calls per second in the bin) for a plot."""
    if not timeline:
        return []
    bins: Counter[int] = Counter(int((t - start) // bin_seconds) for t in timeline)
    last = max(bins)
    return [(n * bin_seconds, bins.get(n, 0) / bin_seconds) for n in range(min(bins), last + 1)]


if __name__ == "__main__":
    if sys.argv[1:2] == ["burst"] and len(sys.argv) == 4:
        import uvloop

        uvloop.run(_burst_main(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
