"""Sidecar credential-path benchmark against nginx serving the same JSON, in one run.

Each server gets one core (core 0); the load generators get the other. Reports:
- throughput: `wrk` (max rate, 50 connections) against both → `ratio` = sidecar / nginx;
- latency at a fixed 1,000 req/s: `h2load --h1 --rps` with a per-request log → p50/p99;
- memory: RSS idle and the peak under load;
- start-up: process start to `/readyz` true with a warm broker, against the floor of
  `python -c 'import aiohttp.web'` measured in the same run.

Writes bench/results/sidecar.json. Loopback only; every load is bounded in count and time.
"""

from __future__ import annotations

import argparse
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

from bench.common import percentile, pin  # noqa: E402
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


def sample_peak_rss(pid: int, stop: threading.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mb(pid))
        time.sleep(0.05)


def import_floor_ms(runs: int = 7) -> float:
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import aiohttp.web"], check=True)
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


def bench_policies(target: Path) -> Path:
    """The sample policies with sidecar limits raised: this measures speed, not the limiter."""
    shutil.copytree(REPO / "policies", target)
    for policy in target.glob("*.toml"):
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
    for tool in ("wrk", "h2load", "nginx", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install wrk nghttp2-client nginx-light util-linux")
            return 2

    from metaproxy.identity.issue import issue_token
    from metaproxy.testing.emulator import StsEmulator

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

            def sidecar(name: str) -> tuple[Child, float]:
                started = time.monotonic()
                child = start_metaproxy(
                    name,
                    sidecar_args(
                        keys,
                        broker_url=broker.ready["url"],
                        identity_file=token_file,
                        authorization_file=tmp / "auth-token",
                    ),
                    ready_file=tmp / f"{name}.ready",
                    log_file=tmp / f"{name}.log",
                )
                children.append(child)
                ready_at = wait_ready(child.ready["admin_url"], poll=0.002)
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
            pin(child.process.pid, {SERVER_CORE})
            time.sleep(0.5)
            rss_idle = rss_mb(child.process.pid)
            imds = child.ready["imds_urls"][0]
            request = urllib.request.Request(
                imds + "/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
            )
            token = urllib.request.urlopen(request, timeout=5).read().decode()
            headers = {"X-aws-ec2-metadata-token": token}
            role = (
                urllib.request.urlopen(
                    urllib.request.Request(
                        imds + "/latest/meta-data/iam/security-credentials/", headers=headers
                    ),
                    timeout=5,
                )
                .read()
                .decode()
            )
            url = f"{imds}/latest/meta-data/iam/security-credentials/{role}"
            body = (
                urllib.request.urlopen(
                    urllib.request.Request(url, headers=headers),
                    timeout=5,
                )
                .read()
                .decode()
            )

            stop, peak = threading.Event(), [rss_idle]
            sampler = threading.Thread(
                target=sample_peak_rss, args=(child.process.pid, stop, peak), daemon=True
            )
            sampler.start()
            wrk(url, headers, 2)  # warm-up
            sidecar_rps = wrk(url, headers, args.seconds)
            sidecar_lat = fixed_rate_latencies(url, headers, args.rate, args.seconds)
            stop.set()
            sampler.join()

            nginx, nginx_url = start_nginx(tmp / "nginx", body)
            try:
                wrk(nginx_url, {}, 2)
                nginx_rps = wrk(nginx_url, {}, args.seconds)
                nginx_lat = fixed_rate_latencies(nginx_url, {}, args.rate, args.seconds)
            finally:
                nginx.terminate()
                nginx.wait(10)
        finally:
            for child in reversed(children):
                child.stop()

    result = {
        "sidecar_rps": round(sidecar_rps, 1),
        "nginx_rps": round(nginx_rps, 1),
        "ratio": round(sidecar_rps / nginx_rps, 3),
        "p50_ms": round(percentile(sidecar_lat, 0.50), 3),
        "p99_ms": round(percentile(sidecar_lat, 0.99), 3),
        "nginx_p50_ms": round(percentile(nginx_lat, 0.50), 3),
        "nginx_p99_ms": round(percentile(nginx_lat, 0.99), 3),
        "fixed_rate_rps": args.rate,
        "rss_idle_mb": round(rss_idle, 1),
        "rss_load_mb": round(peak[0], 1),
        "ready_ms": round(statistics.median(ready_samples), 1),
        "ready_samples_ms": [round(s, 1) for s in ready_samples],
        "import_floor_ms": round(floor, 1),
        "ready_budget_ms": round(1.5 * floor + 50, 1),
        "targets": {
            "ratio": ">= 0.5",
            "p99_ms": "<= 5",
            "rss_load_mb": "<= 40",
            "ready_ms": "<= 1.5 * import_floor_ms + 50",
        },
        "cpu_count": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
