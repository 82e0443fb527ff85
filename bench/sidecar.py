"""Sidecar benchmark, in one run: speed against nginx, memory, fairness inside a pod, start-up.

Each server gets one core (core 0); the load generators get the other. Reports:
- throughput: `wrk` (max rate, 50 connections) against both → `ratio` = sidecar / nginx;
- latency at a fixed 1,000 req/s: `h2load --h1 --rps` with a per-request log → p50/p99;
  (both skipped, and said so, when wrk, h2load or nginx is not installed);
- memory: anonymous memory (`/proc/PID/smaps_rollup`, what no other process shares) and RSS,
  idle and after load (20,000 cached-credential requests on 8 kept-alive connections, plus the
  fairness flood below);
- fairness inside one pod (issue 13): from one address, 4 connections looping on the token path,
  2,000 leaked connections and an SDK fetching token + role + credentials every 200 ms in its own
  process, against a tenant with the policy's default limits → `same_pod_victim_success`,
  `same_pod_victim_p99_ms`, `flood_cpu_percent` (the sidecar's CPU during the flood);
- start-up: process start to `/readyz` true with a warm broker, against the floor of a bare
  `python -c 'import asyncio, ssl'` measured in the same run.

Writes bench/results/sidecar.json. Loopback only; every load is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import percentile, pin, process_cpu_seconds  # noqa: E402
from metaproxy.demo.local import (  # noqa: E402
    AUDIENCE,
    EMULATOR_CREDENTIALS,
    ISSUER,
    broker_args,
    make_local_keys,
    sidecar_args,
)
from metaproxy.demo.processes import Child, start_metaproxy, wait_ready  # noqa: E402

SERVER_CORE = 0
CLIENT_CORES = "1" if (os.cpu_count() or 1) > 1 else "0"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wrk(url: str, headers: dict[str, str], seconds: int) -> float:
    args = ["taskset", "-c", CLIENT_CORES, "wrk", "-t1", "-c50", f"-d{seconds}s"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise RuntimeError(f"wrk said: {out}")
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors: {out}")
    return float(match.group(1))


def fixed_rate_latencies(url: str, headers: dict[str, str], rate: int, seconds: int) -> list[float]:
    """h2load: 10 clients at rate/10 req/s each over HTTP/1.1; per-request durations in ms."""
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        clients = 10
        args = [
            "taskset",
            "-c",
            CLIENT_CORES,
            "h2load",
            "--h1",
            "-c",
            str(clients),
            "--rps",
            str(rate // clients),
            "-n",
            str(rate * seconds),
            "--log-file",
            log.name,
        ]
        for name, value in headers.items():
            args += ["-H", f"{name}: {value}"]
        out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
        if not re.search(r"(\d+) succeeded", out):
            raise RuntimeError(out)
        rows = [line.split("\t") for line in Path(log.name).read_text().splitlines() if line]
    statuses = {row[1] for row in rows}
    if statuses != {"200"}:
        raise RuntimeError(f"non-200 answers at fixed rate: {statuses}")
    return [int(row[2]) / 1000 for row in rows]


def anonymous_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return sum(int(m) for m in re.findall(r"^Anonymous:\s+(\d+)", text, re.M)) / 1024


def keepalive_load(url: str, headers: dict[str, str], requests: int, connections: int) -> None:
    """`requests` GETs of `url` over `connections` kept-alive connections (plain Python)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)

    def one_connection(count: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=5)
        for _ in range(count):
            conn.request("GET", parts.path, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"load got {response.status}")
        conn.close()

    threads = [
        threading.Thread(target=one_connection, args=(requests // connections,))
        for _ in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def same_pod_fairness(imds_url: str, pid: int, seconds: float) -> dict[str, float]:
    """The issue-13 scenario against the sidecar `pid`; its figures."""
    import asyncio
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    host, _, port_text = imds_url.removeprefix("http://").rpartition(":")
    port = int(port_text)
    put = (
        b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
        b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n"
    )

    async def scenario() -> tuple[list[list[float]], float]:
        stop = asyncio.Event()
        leaked: list[asyncio.StreamWriter] = []

        async def loop_on_tokens() -> None:
            while not stop.is_set():
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    while not stop.is_set():
                        writer.write(put)
                        head = await reader.readuntil(b"\r\n\r\n")
                        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                        await reader.readexactly(length)
                except (ConnectionError, asyncio.IncompleteReadError):
                    pass
                writer.close()

        async def leak() -> None:
            for _ in range(2000):
                with contextlib.suppress(OSError):
                    leaked.append((await asyncio.open_connection(host, port))[1])
                await asyncio.sleep(seconds / 2 / 2000)

        cpu_before, wall_before = process_cpu_seconds(pid), time.monotonic()
        tasks = [asyncio.create_task(loop_on_tokens()) for _ in range(4)]
        tasks.append(asyncio.create_task(leak()))
        victim = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "metaproxy.testing.polite_sdk", host, str(port), str(seconds),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await victim.communicate()
        cpu = (process_cpu_seconds(pid) - cpu_before) / (time.monotonic() - wall_before)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in leaked:
            writer.close()
        return json.loads(out), cpu

    fetches, cpu = asyncio.run(scenario())
    latencies = [elapsed * 1000 for _, elapsed in fetches]
    return {
        "same_pod_victim_fetches": len(fetches),
        "same_pod_victim_success": round(sum(ok for ok, _ in fetches) / len(fetches), 4),
        "same_pod_victim_p99_ms": round(percentile(latencies, 0.99), 1),
        "flood_cpu_percent": round(cpu * 100, 1),
    }


def sample_peak_rss(pid: int, stop: threading.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mb(pid))
        time.sleep(0.05)


def import_floor_ms(runs: int = 7) -> float:
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import asyncio, ssl"], check=True)
        timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)


def start_nginx(workdir: Path, body: str) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    (workdir / "www").mkdir(parents=True)
    (workdir / "www" / "credentials").write_text(body)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
user root;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 100000;
  default_type text/plain;
  server {{
    listen 127.0.0.1:{port};
    root {workdir}/www;
  }}
}}
""")
    process = subprocess.Popen(["nginx", "-c", str(conf)])
    url = f"http://127.0.0.1:{port}/credentials"
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    for pid_text in subprocess.run(
        ["pgrep", "-P", str(process.pid)], capture_output=True, text=True, check=False
    ).stdout.split():
        pin(int(pid_text), {SERVER_CORE})
    pin(process.pid, {SERVER_CORE})
    return process, url


FAIRNESS_TENANT = "globex"  # keeps the shipped (default) sidecar limits: fairness is measured


def compile_bytecode() -> None:
    """Compile the package as `pip install` does for the image (Dockerfile), so the sidecars
    measured here load bytecode as a pod's does. From a source tree under
    PYTHONDONTWRITEBYTECODE=1, every module edited since its last .pyc would be compiled again
    at each start: memory (a fifth of a megabyte of the figures) and time no pod spends."""
    import compileall

    compileall.compile_dir(REPO / "metaproxy", quiet=1)


def bench_policies(target: Path) -> Path:
    """The sample policies with sidecar limits raised, so the speed runs measure the cached path
    and not the limiter — except FAIRNESS_TENANT's, which the fairness run needs as shipped."""
    shutil.copytree(REPO / "policies", target)
    for policy in target.glob("*.toml"):
        if policy.stem == FAIRNESS_TENANT:
            continue
        text = policy.read_text()
        text = re.sub(r"(?ms)^\[limits\.sidecar\].*?(?=^\[|\Z)", "", text)
        policy.write_text(
            text + "\n[limits.sidecar]\ntoken_rps = 1000000.0\ncredentials_rps = 1000000.0\n"
            "metadata_rps = 1000000.0\nburst = 1000000\nmax_connections = 1024\n"
            "max_connections_per_client = 1024\n"
        )
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="duration of each load phase")
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sidecar.json")
    args = parser.parse_args()
    missing = [tool for tool in ("wrk", "h2load", "nginx", "taskset") if not shutil.which(tool)]
    if missing:
        print(
            f"{', '.join(missing)} missing (apt-get install wrk nghttp2-client nginx-light "
            "util-linux): the nginx comparison and fixed-rate latencies are skipped"
        )

    from metaproxy.identity.issue import issue_token
    from metaproxy.testing.emulator import StsEmulator

    compile_bytecode()
    children: list[Child] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-sidecar-") as tmp_name,
        StsEmulator() as emulator,
    ):
        tmp = Path(tmp_name)
        keys = make_local_keys(tmp / "keys")
        sts_url = emulator.url
        try:
            broker = start_metaproxy(
                "broker",
                broker_args(
                    keys,
                    policies_dir=bench_policies(tmp / "policies"),
                    audit_dir=tmp / "audit",
                    sts_endpoint=sts_url,
                    instance="bench-broker",
                ),
                ready_file=tmp / "broker.ready",
                log_file=tmp / "broker.log",
                env=EMULATOR_CREDENTIALS,
            )
            children.append(broker)
            token_file = tmp / "identity.jwt"
            token_file.write_text(
                issue_token(
                    keys.identity_key,
                    issuer=ISSUER,
                    audience=AUDIENCE,
                    task="bench-1",
                    tenant="acme",
                    ttl=7200,
                )
            )

            fair_token_file = tmp / "identity-fair.jwt"
            fair_token_file.write_text(
                issue_token(
                    keys.identity_key,
                    issuer=ISSUER,
                    audience=AUDIENCE,
                    task="bench-fair",
                    tenant=FAIRNESS_TENANT,
                    app="web",
                    ttl=7200,
                )
            )

            def sidecar(name: str, identity: Path = token_file) -> tuple[Child, float]:
                started = time.monotonic()
                child = start_metaproxy(
                    name,
                    sidecar_args(
                        keys,
                        broker_url=broker.ready["url"],
                        identity_file=identity,
                        authorization_file=tmp / f"{name}.auth",
                    ),
                    ready_file=tmp / f"{name}.ready",
                    log_file=tmp / f"{name}.log",
                )
                children.append(child)
                try:
                    ready_at = wait_ready(child.ready["admin_url"], poll=0.002)
                except TimeoutError:
                    print((tmp / f"{name}.log").read_text()[-2000:], file=sys.stderr)
                    raise
                return child, (ready_at - started) * 1000

            warmup, _ = sidecar("sidecar-warmup")  # warms the broker's cache for this task
            warmup.stop()
            ready_samples = []
            for attempt in range(5):
                child, ready_ms = sidecar(f"sidecar-ready-{attempt}")
                ready_samples.append(ready_ms)
                child.stop()
            floor = import_floor_ms()

            child, _ = sidecar("sidecar")
            pid = child.process.pid
            pin(pid, {SERVER_CORE})
            time.sleep(0.5)
            rss_idle, anon_idle = rss_mb(pid), anonymous_mb(pid)
            imds = child.ready["imds_urls"][0]
            request = urllib.request.Request(
                imds + "/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
            )
            token = urllib.request.urlopen(request, timeout=5).read().decode()
            headers = {"X-aws-ec2-metadata-token": token}
            listing = imds + "/latest/meta-data/iam/security-credentials/"
            role = (
                urllib.request.urlopen(urllib.request.Request(listing, headers=headers), timeout=5)
                .read()
                .decode()
            )
            url = f"{imds}/latest/meta-data/iam/security-credentials/{role}"
            body = (
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5)
                .read()
                .decode()
            )

            stop, peak = threading.Event(), [rss_idle]
            sampler = threading.Thread(target=sample_peak_rss, args=(pid, stop, peak), daemon=True)
            sampler.start()
            speed: dict[str, object] = {"skipped": f"{', '.join(missing)} not installed"}
            if not missing:
                wrk(url, headers, 2)  # warm-up
                sidecar_rps = wrk(url, headers, args.seconds)
                sidecar_lat = fixed_rate_latencies(url, headers, args.rate, args.seconds)
            keepalive_load(url, headers, requests=20_000, connections=8)
            stop.set()
            sampler.join()
            rss_load, anon_load = rss_mb(pid), anonymous_mb(pid)

            if not missing:
                nginx, nginx_url = start_nginx(tmp / "nginx", body)
                try:
                    wrk(nginx_url, {}, 2)
                    nginx_rps = wrk(nginx_url, {}, args.seconds)
                    nginx_lat = fixed_rate_latencies(nginx_url, {}, args.rate, args.seconds)
                finally:
                    nginx.terminate()
                    nginx.wait(10)
                speed = {
                    "sidecar_rps": round(sidecar_rps, 1),
                    "nginx_rps": round(nginx_rps, 1),
                    "ratio": round(sidecar_rps / nginx_rps, 3),
                    "p50_ms": round(percentile(sidecar_lat, 0.50), 3),
                    "p99_ms": round(percentile(sidecar_lat, 0.99), 3),
                    "nginx_p50_ms": round(percentile(nginx_lat, 0.50), 3),
                    "nginx_p99_ms": round(percentile(nginx_lat, 0.99), 3),
                    "fixed_rate_rps": args.rate,
                }

            fair, _ = sidecar("sidecar-fair", fair_token_file)
            pin(fair.process.pid, {SERVER_CORE})
            fairness = same_pod_fairness(fair.ready["imds_urls"][0], fair.process.pid, 20.0)
            fairness["anon_after_flood_mb"] = round(anonymous_mb(fair.process.pid), 1)
            fairness["rss_after_flood_mb"] = round(rss_mb(fair.process.pid), 1)
        finally:
            for child in reversed(children):
                child.stop()

    result = {
        **speed,
        "anon_idle_mb": round(anon_idle, 1),
        "anon_load_mb": round(anon_load, 1),
        "rss_idle_mb": round(rss_idle, 1),
        "rss_load_mb": round(rss_load, 1),
        "rss_peak_mb": round(peak[0], 1),
        **fairness,
        "ready_ms": round(statistics.median(ready_samples), 1),
        "ready_samples_ms": [round(sample, 1) for sample in ready_samples],
        "import_floor_ms": round(floor, 1),
        "ready_budget_ms": round(1.5 * floor + 100, 1),
        "targets": {
            "ratio": ">= 0.6",
            "anon_load_mb": "<= 15",
            "rss_load_mb": "<= 28",
            "same_pod_victim_success": ">= 0.99",
            "same_pod_victim_p99_ms": "<= 50",
            "ready_ms": "<= 1.5 * import_floor_ms + 100 (python -c 'import asyncio, ssl')",
        },
        "cpu_count": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
