"""Abuse benchmark: does a well-behaved client notice an abusive neighbour?

One run, real child processes on loopback (moto's STS, the broker, one sidecar for an acme task):
1. sidecar: a victim's IMDSv2 credential fetches at a fixed rate, alone (baseline), then while an
   abuser process from another loopback address keeps 2,000 connections looping on the
   credential path (reconnecting whenever the sidecar closes one); the sidecar's open file
   descriptors are sampled from /proc/PID/fd throughout;
2. broker: another tenant's (globex) credential requests at a fixed rate, alone, then while a
   flooder process sends acme requests from 200 identities as fast as it can.

Writes bench/results/abuse.json. Targets: victim_errors = 0, victim p99 <= 2x baseline,
sidecar_max_fds <= fd_cap. Every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import percentile, pin, write_json  # noqa: E402
from metaproxy.demo.local import (  # noqa: E402
    AUDIENCE,
    EMULATOR_CREDENTIALS,
    ISSUER,
    broker_args,
    make_local_keys,
    sidecar_args,
)
from metaproxy.demo.processes import Child, start_metaproxy, wait_ready  # noqa: E402

CREDS = "/latest/meta-data/iam/security-credentials/acme-app"
VICTIM, ABUSER = "127.0.0.1", "127.0.0.2"


def raise_fd_limit(wanted: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.split("://", 1)[1].rpartition(":")
    return host, int(port)


async def read_status(reader: asyncio.StreamReader) -> int | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        return int(lines[0].split()[1])
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
        return None


# -- the abusive processes --------------------------------------------------------------------


async def abuse_sidecar(url: str, connections: int, seconds: float) -> dict[str, int]:
    """Thousands of connections looping on the credential path, never closed by this client."""
    host, port = host_port(url)
    reader, writer = await asyncio.open_connection(host, port, local_addr=(ABUSER, 0))
    # Addressed as an SDK addresses IMDS (an IP literal): any other Host is refused before
    # the credential path (the DNS-rebinding defence), which is not what this abuser tests.
    host_header = f"Host: {host}:{port}\r\n".encode()
    writer.write(
        b"PUT /latest/api/token HTTP/1.1\r\n"
        + host_header
        + b"X-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"abuser: no IMDSv2 token ({head.splitlines()[0]!r})")
    length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
    token = await reader.readexactly(length)
    request = b"GET %s HTTP/1.1\r\n%sX-aws-ec2-metadata-token: %s\r\n\r\n" % (
        CREDS.encode(),
        host_header,
        token,
    )
    counts: collections.Counter[str] = collections.Counter()
    end = time.monotonic() + seconds
    held: list[asyncio.StreamWriter] = [writer]

    async def loop_on_credentials() -> None:
        while (left := end - time.monotonic()) > 0:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, local_addr=(ABUSER, 0)), left
                )
            except (OSError, TimeoutError):
                counts["connect_error"] += 1
                await asyncio.sleep(0.01)
                continue
            held.append(writer)
            while (left := end - time.monotonic()) > 0:
                try:
                    writer.write(request)
                    status = await asyncio.wait_for(read_status(reader), left)
                except (ConnectionError, TimeoutError):
                    break
                if status is None:
                    counts["closed_by_sidecar"] += 1
                    break
                counts[str(status)] += 1
            if time.monotonic() < end:
                # The sidecar closed it; keeping our half open would only cost us descriptors.
                held.remove(writer)
                writer.close()

    await asyncio.gather(*(loop_on_credentials() for _ in range(connections)))
    for writer in held:
        writer.close()
    return dict(counts)


async def flood_broker(
    url: str, ca: str, key: str, identities: int, seconds: float
) -> dict[str, int]:
    """One tenant (acme) flooding from many identities, as fast as 64 connections allow."""
    from metaproxy.identity.issue import issue_token

    tokens = [
        issue_token(Path(key), issuer=ISSUER, audience=AUDIENCE, task=f"flood-{i}", tenant="acme")
        for i in range(identities)
    ]
    counts: collections.Counter[str] = collections.Counter()
    end = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=ca), limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(offset: int) -> None:
            i = offset
            while time.monotonic() < end:
                headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
                async with session.post(url + "/v1/credentials", json={}, headers=headers) as r:
                    await r.read()
                    counts[str(r.status)] += 1
                i += 64

        await asyncio.gather(*(worker(n) for n in range(64)))
    return dict(counts)


# -- the well-behaved clients -----------------------------------------------------------------


async def paced(
    rate: float,
    seconds: float,
    request: Callable[[int], AbstractAsyncContextManager[aiohttp.ClientResponse]],
) -> tuple[list[float], int]:
    """`request(n)` at a fixed rate, one at a time (a well-behaved client): ms each, errors."""
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    for n in range(int(rate * seconds)):
        start = time.perf_counter()
        try:
            async with request(n) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                    ERROR_ANSWERS[f"{response.status} {await response.text()}"[:120]] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors += 1
            ERROR_ANSWERS[repr(exc)[:120]] += 1
        latencies.append((time.perf_counter() - start) * 1000)
        await asyncio.sleep(max(0.0, started + (n + 1) / rate - time.perf_counter()))
    return latencies, errors


async def victim_latencies(imds_url: str, rate: float, seconds: float) -> tuple[list[float], int]:
    """IMDSv2 credential fetches on one keep-alive connection at a fixed rate: ms, errors."""
    connector = aiohttp.TCPConnector(limit=1, local_addr=(VICTIM, 0))
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async with session.put(
            imds_url + "/latest/api/token",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
        ) as response:
            token = await response.text()
        headers = {"X-aws-ec2-metadata-token": token}
        return await paced(rate, seconds, lambda _n: session.get(imds_url + CREDS, headers=headers))


async def tenant_latencies(
    broker_url: str, ca: Path, tokens: list[str], rate: float, seconds: float
) -> tuple[list[float], int]:
    """Another tenant's credential requests to the broker at a fixed rate, spread over its tasks
    (each within the per-identity rate of the shipped policy): ms, errors."""
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(ca)), limit=1)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await paced(
            rate,
            seconds,
            lambda n: session.post(
                broker_url + "/v1/credentials",
                json={},
                headers={"Authorization": f"Bearer {tokens[n % len(tokens)]}"},
            ),
        )


ERROR_ANSWERS: collections.Counter[str] = collections.Counter()  # what another tenant saw


class FdSampler(threading.Thread):
    """Peak of /proc/PID/fd of a child process while running."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stopping = threading.Event()

    def count(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return 0

    def run(self) -> None:
        while not self.stopping.is_set():
            self.peak = max(self.peak, self.count())
            time.sleep(0.005)


def start_helper(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)


def soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError(f"no NOFILE limit for {pid}")


def sidecar_caps(pid: int) -> tuple[int, int]:
    """(connection cap, fd budget) of the sidecar process, by the formula its guard uses: the
    shipped policy sets no connection limits, so the defaults of SidecarLimits apply."""
    from metaproxy.models import SidecarLimits
    from metaproxy.net.connguard import fd_budget
    from metaproxy.sidecar.guards import SIDECAR_FD_RESERVE

    soft = soft_nofile(pid)
    cap = min(SidecarLimits().max_connections, soft - SIDECAR_FD_RESERVE)
    return cap, fd_budget(cap, SIDECAR_FD_RESERVE, soft)


# Servers get core 0; clients core 1. The abusive processes run at nice 10, standing in for the
# CPU limit of the task's own container: this measures the sidecar's defences, not how Linux
# shares two cores among three busy processes.
SERVER_CORES, CLIENT_CORES, ABUSER_NICE = {0}, {1}, 10


def progress(message: str) -> None:
    print(f"[abuse] {message}", file=sys.stderr, flush=True)


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(latencies, 0.50), 3),
        "p99": round(percentile(latencies, 0.99), 3),
    }


# -- orchestration ----------------------------------------------------------------------------


def start_system(tmp: Path, sts_url: str) -> tuple[Child, Child, dict[str, Path]]:
    from metaproxy.identity.issue import issue_token

    keys = make_local_keys(tmp / "keys")
    shutil.copytree(REPO / "policies", tmp / "policies")  # the shipped limits, as in production
    broker = start_metaproxy(
        "broker",
        broker_args(
            keys,
            policies_dir=tmp / "policies",
            audit_dir=tmp / "audit",
            sts_endpoint=sts_url,
            instance="abuse-broker",
        ),
        ready_file=tmp / "broker.ready",
        log_file=tmp / "broker.log",
        env=EMULATOR_CREDENTIALS,
    )
    token_file = tmp / "identity.jwt"
    token_file.write_text(
        issue_token(
            keys.identity_key,
            issuer=ISSUER,
            audience=AUDIENCE,
            task="victim",
            tenant="acme",
            ttl=7200,
        )
    )
    sidecar = start_metaproxy(
        "sidecar",
        sidecar_args(
            keys,
            broker_url=broker.ready["url"],
            identity_file=token_file,
            authorization_file=tmp / "auth-token",
        ),
        ready_file=tmp / "sidecar.ready",
        log_file=tmp / "sidecar.log",
    )
    return broker, sidecar, {"key": keys.identity_key, "ca": keys.ca}


def measure(args: argparse.Namespace, tmp: Path, sts_url: str) -> dict[str, Any]:
    from metaproxy.identity.issue import issue_token

    broker, sidecar, files = start_system(tmp, sts_url)
    try:
        try:
            wait_ready(sidecar.ready["admin_url"])
        except TimeoutError:
            print((tmp / "sidecar.log").read_text()[-3000:], file=sys.stderr)
            raise
        imds_url = sidecar.ready["imds_urls"][0]
        pin(sidecar.process.pid, SERVER_CORES)
        pin(broker.process.pid, SERVER_CORES)
        pin(0, CLIENT_CORES)
        sampler = FdSampler(sidecar.process.pid)
        idle_fds = sampler.count()
        progress("victim alone")
        base, base_errors = asyncio.run(victim_latencies(imds_url, args.rate, args.seconds))

        progress("victim beside an abuser with 2,000 connections")
        abuser = start_helper("--abuse-sidecar", imds_url, "--seconds", str(args.seconds + 3))
        sampler.start()
        time.sleep(1.5)  # let the abuser ramp up to its 2,000 connections
        loaded, loaded_errors = asyncio.run(victim_latencies(imds_url, args.rate, args.seconds))
        abuse_counts: dict[str, int] = json.loads(abuser.communicate(timeout=60)[0])
        sampler.stopping.set()
        sampler.join()
        connection_cap, fd_cap = sidecar_caps(sidecar.process.pid)

        other = [
            issue_token(
                files["key"], issuer=ISSUER, audience=AUDIENCE, task=f"calm-{i}", tenant="globex"
            )
            for i in range(10)
        ]
        broker_url, ca = broker.ready["url"], files["ca"]
        progress("another tenant at the broker, alone")
        quiet, quiet_errors = asyncio.run(
            tenant_latencies(broker_url, ca, other, args.rate, args.seconds)
        )
        progress("another tenant at the broker, beside a flooding tenant")
        flooder = start_helper(
            "--flood-broker", broker_url, "--ca", str(ca), "--key", str(files["key"]),
            "--seconds", str(args.seconds + 3),
        )  # fmt: skip
        time.sleep(1.5)
        flooded, flooded_errors = asyncio.run(
            tenant_latencies(broker_url, ca, other, args.rate, args.seconds)
        )
        flood_counts: dict[str, int] = json.loads(flooder.communicate(timeout=60)[0])
    finally:
        sidecar.stop()
        broker.stop()

    answered = sum(v for k, v in abuse_counts.items() if k.isdigit())
    flood_total = sum(flood_counts.values())
    victim, baseline = summary(loaded), summary(base)
    other_loaded, other_quiet = summary(flooded), summary(quiet)
    return {
        "victim_p50_ms": victim["p50"],
        "victim_p99_ms": victim["p99"],
        "victim_p50_baseline_ms": baseline["p50"],
        "victim_p99_baseline_ms": baseline["p99"],
        "victim_errors": loaded_errors + base_errors,
        "victim_requests": len(loaded) + len(base),
        "abuser_responses": abuse_counts,
        "abuser_429_ratio": round(abuse_counts.get("429", 0) / answered, 4) if answered else 0.0,
        "sidecar_idle_fds": idle_fds,
        "sidecar_max_fds": sampler.peak,
        "fd_cap": fd_cap,
        "connection_cap": connection_cap,
        "broker_other_tenant_p50_ms": other_loaded["p50"],
        "broker_other_tenant_p99_ms": other_loaded["p99"],
        "broker_other_tenant_p50_baseline_ms": other_quiet["p50"],
        "broker_other_tenant_p99_baseline_ms": other_quiet["p99"],
        "broker_other_tenant_errors": quiet_errors + flooded_errors,
        "broker_other_tenant_error_answers": dict(ERROR_ANSWERS),
        "flood_responses": flood_counts,
        "flood_429_ratio": round(flood_counts.get("429", 0) / flood_total, 4) if flood_total else 0,
        "rate_per_second": args.rate,
        "seconds_per_phase": args.seconds,
        "cpus": os.cpu_count(),
        "placement": "servers on core 0; clients on core 1; abuser and flooder at nice 10",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=40.0, help="well-behaved requests/second")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--abuse-sidecar", metavar="IMDS_URL", help=argparse.SUPPRESS)
    parser.add_argument("--flood-broker", metavar="BROKER_URL", help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_fd_limit()
    if args.abuse_sidecar or args.flood_broker:
        os.nice(ABUSER_NICE)
    if args.abuse_sidecar:
        counts = asyncio.run(abuse_sidecar(args.abuse_sidecar, args.connections, args.seconds))
        print(json.dumps(counts))
        return 0
    if args.flood_broker:
        counts = asyncio.run(flood_broker(args.flood_broker, args.ca, args.key, 200, args.seconds))
        print(json.dumps(counts))
        return 0

    from metaproxy.testing.emulator import StsEmulator

    with tempfile.TemporaryDirectory(prefix="bench-abuse-") as name, StsEmulator() as emulator:
        result = measure(args, Path(name), emulator.url)
    result["targets_met"] = {
        "victim_errors_zero": result["victim_errors"] == 0,
        "victim_p99_within_2x": result["victim_p99_ms"] <= 2 * result["victim_p99_baseline_ms"],
        "fds_within_cap": result["sidecar_max_fds"] <= result["fd_cap"],
    }
    path = write_json("abuse.json", result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
