"""Three broker replicas (processes) on one cold burst: the fleet's STS budget shared through a
real Valkey/Redis, against the static split it replaces (each replica in memory mode with the
budget ÷ maxReplicas 12). Then, on the shared fleet: duplicate STS calls for identical requests
sent to every replica at once, the time the store adds to one issued credential, and how fast
a revocation through one replica's control API reaches the others.

STS is moto's STS alone behind the fault proxy (50 ms latency), which counts every AssumeRole
where AWS would. Clients behave like sidecars (bench/fleet_harness.py). Loopback only.
Writes bench/results/broker_fleet.json and bench/results/broker_fleet.png.

    python bench/broker_fleet.py [--requests 3000] [--budget 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from bench.common import RESULTS, percentile, process_cpu_seconds, write_json
from bench.fleet_harness import (
    FleetFiles,
    Replica,
    calls_per_second,
    make_fleet_files,
    run_burst,
    start_replicas,
    stop_replicas,
    sustained_rate,
)
from metaproxy.testing.faultproxy import FaultProxy
from metaproxy.testing.recording import max_calls_in_window

TENANTS = ("t1", "t2", "t3")
MAX_REPLICAS = 12  # the HorizontalPodAutoscaler's maxReplicas the static split divides by
STS_LATENCY = 0.05


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def burst_run(
    name: str,
    files: FleetFiles,
    work: Path,
    proxy: FaultProxy,
    replicas: list[Replica],
    requests: int,
) -> dict[str, Any]:
    arrivals = [
        (n % len(replicas), files.token(TENANTS[n % len(TENANTS)], f"{name}-{n}"))
        for n in range(requests)
    ]
    proxy.reset_counters()
    cpu_before = {r.name: process_cpu_seconds(r.pid) for r in replicas}
    started = time.monotonic()
    outcome = await run_burst(work, name, [r.url for r in replicas], arrivals, seconds=300)
    calls = proxy.assume_role_timeline()
    return {
        "failed": outcome.failed,
        "statuses": outcome.statuses,
        "sts_calls": len(calls),
        "max_sts_rate": max_calls_in_window(calls),
        "sustained_rate": round(sustained_rate(calls), 1),
        "drain_s": round(outcome.last, 2),
        "latency_p50_s": round(outcome.latency_p50, 2),
        "latency_p99_s": round(outcome.latency_p99, 2),
        "broker_cpu_seconds": {
            r.name: round(process_cpu_seconds(r.pid) - cpu_before[r.name], 1) for r in replicas
        },
        "series": calls_per_second(calls, started, 0.5),
    }


async def duplicates(
    files: FleetFiles, proxy: FaultProxy, replicas: list[Replica], keys: int, per_replica: int
) -> int:
    """`keys` cold tasks, each asked `per_replica` times of every replica at once: the AssumeRole
    calls at the proxy beyond one per task."""
    proxy.reset_counters()
    tokens = [files.token("t1", f"same-{n}") for n in range(keys)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def ask(url: str, token: str) -> int:
            headers = {"Authorization": f"Bearer {token}"}
            async with session.post(url + "/v1/credentials", json={}, headers=headers) as answer:
                await answer.read()
                return answer.status

        statuses = await asyncio.gather(
            *(
                ask(replica.url, token)
                for token in tokens
                for replica in replicas
                for _ in range(per_replica)
            )
        )
    if set(statuses) != {200}:
        raise RuntimeError(f"duplicate run: statuses {sorted(set(statuses))}")
    return len(proxy.assume_role_timeline()) - keys


async def issue_latencies(
    session: aiohttp.ClientSession, url: str, tokens: list[str]
) -> list[float]:
    latencies = []
    for token in tokens:
        headers = {"Authorization": f"Bearer {token}"}
        started = time.perf_counter()
        async with session.post(url + "/v1/credentials", json={}, headers=headers) as answer:
            await answer.read()
            if answer.status != 200:
                raise RuntimeError(f"issue latency: {answer.status}")
        latencies.append(time.perf_counter() - started)
    return latencies


async def store_cost(
    files: FleetFiles, proxy: FaultProxy, shared: Replica, memory: Replica, samples: int
) -> dict[str, Any]:
    """Sequential requests, one at a time, alternating between a replica on the shared store and
    a broker on the memory store (same machine, same STS, same moment): cold (a new task: the
    tenant limits, the shared cache's read, lease, write and release, the budget's reservation)
    and warm (cached: the tenant limits only). The store's share is the difference."""
    proxy.set(latency=0.0)
    result: dict[str, list[float]] = {"redis_cold": [], "memory_cold": [], "redis_warm": []}
    result["memory_warm"] = []
    async with aiohttp.ClientSession() as session:
        for batch in range(samples // 10):
            for store, replica in (("redis", shared), ("memory", memory)):
                tokens = [files.token("t2", f"cost-{store}-{batch}-{n}") for n in range(10)]
                result[f"{store}_cold"] += await issue_latencies(session, replica.url, tokens)
                result[f"{store}_warm"] += await issue_latencies(session, replica.url, tokens)
    proxy.set(latency=STS_LATENCY)
    figures: dict[str, Any] = {}
    for kind in ("cold", "warm"):
        redis, memory_ = result[f"redis_{kind}"], result[f"memory_{kind}"]
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            figures[f"{kind}_redis_ms_{label}"] = ms(percentile(redis, q))
            figures[f"{kind}_memory_ms_{label}"] = ms(percentile(memory_, q))
            figures[f"{kind}_store_ms_{label}"] = ms(percentile(redis, q) - percentile(memory_, q))
    figures["samples_per_kind"] = len(result["redis_cold"])
    return figures


async def revocation_propagation(
    files: FleetFiles, replicas: list[Replica], trials: int
) -> list[float]:
    """Revoke a task through replica 1's control API; poll replicas 2 and 3 until both refuse.
    Timed from the moment the revoke request is sent."""
    control_token = files.secrets.control_token_file.read_text().strip()
    one, others = replicas[0], replicas[1:]
    seconds = []
    async with aiohttp.ClientSession() as session:

        async def status(url: str, token: str) -> int:
            headers = {"Authorization": f"Bearer {token}"}
            async with session.post(url + "/v1/credentials", json={}, headers=headers) as answer:
                await answer.read()
                return answer.status

        async def refused_after(replica: Replica, token: str, since: float) -> float:
            while await status(replica.url, token) != 403:
                if time.monotonic() - since > 10:
                    raise RuntimeError(f"{replica.name} still issuing 10 s after the revoke")
                await asyncio.sleep(0.002)
            return time.monotonic() - since

        for trial in range(trials):
            task = f"revoked-{trial}"
            token = files.token("t3", task)
            for replica in others:
                if await status(replica.url, token) != 200:
                    raise RuntimeError("revocation trial: the task was not issued first")
            since = time.monotonic()
            body = {"tenant": "t3", "task": task}
            headers = {"Authorization": f"Bearer {control_token}"}
            revoke = session.post(one.control_url + "/v1/revocations", json=body, headers=headers)
            async with revoke as answer:
                if answer.status != 200:
                    raise RuntimeError(f"revoke: {answer.status} {await answer.text()}")
            waits = await asyncio.gather(*(refused_after(r, token, since) for r in others))
            seconds.append(max(waits))
    return seconds


def plot(shared: dict[str, Any], static: dict[str, Any], budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 5))
    for run, label, style in (
        (shared, "shared budget (Valkey/Redis store)", "-"),
        (static, f"static split (budget ÷ {MAX_REPLICAS} per replica, memory store)", "--"),
    ):
        axis.plot([t for t, _ in run["series"]], [r for _, r in run["series"]], style, label=label)
    axis.axhline(budget, color="red", linewidth=0.8, label=f"budget {budget:g}/s")
    axis.set_xlabel("seconds since the burst started")
    axis.set_ylabel("AssumeRole calls/s at the fault proxy (0.5 s bins)")
    axis.set_title("3 broker replicas, one cold burst")
    axis.legend(loc="upper right", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from metaproxy.testing.emulator import StsEmulator
    from metaproxy.testing.redis_server import RedisServer

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="broker-fleet-") as tmp:
        work = Path(tmp)
        files = make_fleet_files(work / "files", TENANTS)
        redis = RedisServer(work / "redis")
        redis.start()
        try:
            with StsEmulator(sts_only=True) as emulator:
                async with FaultProxy(emulator.url) as proxy:
                    proxy.set(latency=STS_LATENCY)
                    options = {"sts_endpoint": proxy.url, "budget": args.budget}
                    fleet = await start_replicas(files, 3, store=redis.url, **options)
                    try:
                        shared = await burst_run("shared", files, work, proxy, fleet, args.requests)
                        print(f"shared: {without_series(shared)}", flush=True)
                        duplicate = await duplicates(files, proxy, fleet, 100, 2)
                        print(f"duplicate STS calls: {duplicate}", flush=True)
                        # Two fresh brokers side by side, one more replica on the store and one
                        # on its own: the burst's replicas hold its heap (cache, owners, views),
                        # whose garbage collection is no part of what the store costs.
                        pair = await asyncio.gather(
                            start_replicas(files, 1, prefix="cost", store=redis.url, **options),
                            start_replicas(files, 1, prefix="memory", store="memory", **options),
                        )
                        shared_fresh, memory = pair[0][0], pair[1][0]
                        try:
                            cost = await store_cost(
                                files, proxy, shared_fresh, memory, args.samples
                            )
                        finally:
                            await stop_replicas([shared_fresh, memory])
                        print(f"store cost: {cost}", flush=True)
                        revocation = await revocation_propagation(files, fleet, args.trials)
                    finally:
                        await stop_replicas(fleet)
                    static_options = {**options, "budget": args.budget / MAX_REPLICAS}
                    split = await start_replicas(
                        files, 3, prefix="static", store="memory", **static_options
                    )
                    try:
                        static = await burst_run("static", files, work, proxy, split, args.requests)
                    finally:
                        await stop_replicas(split)
                    print(f"static: {without_series(static)}", flush=True)
        finally:
            redis.stop()
    result: dict[str, Any] = {
        "requests": args.requests,
        "replicas": 3,
        "budget": args.budget,
        "static_budget_per_replica": round(args.budget / MAX_REPLICAS, 2),
        "sts_latency_s": STS_LATENCY,
        "budget_utilization_shared": round(shared["sustained_rate"] / args.budget, 3),
        "budget_utilization_static": round(static["sustained_rate"] / args.budget, 3),
        "max_sts_rate": shared["max_sts_rate"],
        "max_sts_rate_static": static["max_sts_rate"],
        "duplicate_sts_calls": duplicate,
        "store_ms_per_issue_p50": cost["cold_store_ms_p50"],
        "store_ms_per_issue_p99": cost["cold_store_ms_p99"],
        "store_cost": cost,
        "revocation_propagation_ms_p50": ms(percentile(revocation, 0.5)),
        "revocation_propagation_ms_p99": ms(percentile(revocation, 0.99)),
        "revocation_propagation_ms_max": ms(max(revocation)),
        "revocation_trials": len(revocation),
        "shared": without_series(shared),
        "static": without_series(static),
        "methods": {
            "budget_utilization": "AssumeRole calls counted at the fault proxy from 1 s after "
            "the first call (the ramp) to the last, over that span, divided by the budget; the "
            "burst is queued throughout (all tasks arrive at once, round robin over replicas).",
            "duplicate_sts_calls": "100 cold tasks, each asked twice of each of the 3 replicas "
            "at once (600 requests): AssumeRole calls at the proxy minus 100.",
            "store_ms_per_issue": "cold-issue latency through a fresh 4th replica on the Redis "
            "store (the fleet's other 3 running) minus the same through a fresh broker on the "
            "memory store, both started for this, sequential requests "
            "alternating in batches of 10 between the two, STS latency 0, same machine and "
            "moment; p50 is the difference of medians, p99 the difference of p99s (not a "
            "percentile of per-request differences, which cannot be observed from outside). "
            "warm_* is the same for cached credentials (only the tenant limits touch the store).",
            "revocation_propagation": "POST /v1/revocations on replica 1's control API; replicas "
            "2 and 3 polled every ~2 ms until both answer 403; timed from sending the revoke.",
        },
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": (
            f"{os.cpu_count()} cores shared by 3 brokers (or 4), moto, the fault proxy, "
            "Valkey/Redis and the load generator, and by other jobs on the machine (load "
            "averages above): broker event loops run late during the burst's first seconds "
            "(thousands of connections to accept), which the sustained rate includes."
        ),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(shared, static, args.budget, RESULTS / "broker_fleet.png")
    write_json("broker_fleet.json", result)
    return result


def without_series(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "series"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--budget", type=float, default=300.0)
    parser.add_argument("--samples", type=int, default=400, help="issue-latency samples a store")
    parser.add_argument("--trials", type=int, default=50, help="revocation trials")
    return parser.parse_args()


if __name__ == "__main__":
    import logging

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")  # moto's documented fake
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    logging.basicConfig(level=logging.WARNING)
    summary = asyncio.run(main(parse_args()))
    print({k: v for k, v in summary.items() if k not in ("note", "methods", "shared", "static")})
