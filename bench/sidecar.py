"""Sidecar benchmark, in one run: speed against the limit of its own stack and against nginx,
memory, fairness inside a pod, start-up. Writes bench/results/sidecar.json.

Speed. Servers run on core 0, load generators on core 1 (the machine has 2). Three servers
answer the same two requests (the "faces"):
- `imds`: the IMDS credential document, GET with an IMDSv2 token; the sidecar signs tokens with
  the key of `--imds-token-key-file` and puts the token's remaining TTL, computed per request,
  on every answer;
- `container`: the container endpoint's secret path (`--container-credentials-path`, no header).
The servers:
- the sidecar, credentials cached (the hot path: a repeated request recognised by its bytes,
  the rate limit, the token's check, one lookup, one write of prepared bytes);
- the stack limit (`bench/stack_limit.py`): uvloop + an asyncio.Protocol + httptools, writing
  for every request exactly the bytes the sidecar sent for it (captured once from the running
  sidecar; Date kept fresh), its own process, pinned as the sidecar is;
- nginx, one worker serving the same bodies from files: the outside reference.

Rates come from wrk: one thread, 50 kept-alive connections, each with `depth` requests
pipelined (sent at once; the sidecar reads up to 16 ahead). While wrk runs, the CPU of the wrk
process and of the server (user + system from /proc/PID/stat over the wall time, as a share of
the one core each is pinned to) and how busy each core was, whoever kept it busy (/proc/stat),
are read over the run minus its first and last half second. A rate is refused — listed with the
reason, never used in a figure — when
- its generator used >= 90% of its core: the generator set the rate, not the server;
- its server used < 90% of its core: not the server's limit either (other work on the machine
  took the server's core or the generator's); it is measured again, up to 4 attempts;
- wrk saw a non-2xx answer or a socket error.

Why pipelining: on one core, one wrk thread does not outrun the stack limit one request at a
time (it saturates its core at about the stack limit's rate). So the bench first chooses the
depth: the least of 1, 2, 4, 8, 16 at which wrk would use < 80% of its core with the server at
100% of its own (wrk's CPU over the server's, from a 3 s probe of the stack limit and nginx on
both faces, all listed under `load.probes`: a ratio other work on the machine does not skew).
Every rate uses that depth, so the three servers face the same generator; more wrk threads would
share the same one core and gain nothing. Should wrk still saturate against the sidecar or the
stack limit, the rounds start again one depth deeper (`load.discarded`). If no depth outruns
nginx, nginx's rates are refused — its absolute rate would be the generator's — and the honest
speed figure is `ratio_to_stack_limit`, measured under the same generator; `load.nginx` says
which held in this run.

Rates are measured in rounds (default 5) of `seconds` each (default 5): each round measures the
three servers on both faces, in an order rotated every round, so that the machine's noise falls
on all of them alike; a face one of whose servers has fewer than 3 usable rates after them gets
more rounds, up to as many again. Figures are medians over the rounds with [min, max]
(`rps_spread`): `ratio_to_stack_limit` = sidecar_rps / stack_limit_rps (target >= 0.9),
`ratio_to_nginx` = sidecar_rps / nginx_rps, the ratio of each round (`*_rounds`), the median
`generator_cpu` and `server_cpu` of each server's rates, and each server's requests per
CPU-second with their ratio (`ratio_to_stack_limit_per_cpu`: what each request costs, which other
work on the core does not skew). Top-level figures are the IMDS face's (what `sidecar_rps` always
measured); the container face's are under `container`; every rate with its CPU figures is under
`samples`. If the sidecar or the stack limit has fewer than 3 usable rates on a face, its speed
figures are refused, the JSON says why (`refused`, `speed_refused`) and the bench exits non-zero.

Latency at a fixed 1,000 req/s: `h2load --h1 --rps`, 10 clients, a per-request log → p50/p99,
for the three servers on the IMDS face, each with h2load's CPU and the server's.

Memory: anonymous memory (`/proc/PID/smaps_rollup`, what no other process shares) and RSS of
the sidecar under test (both faces on, the token key file in place), idle and after load (the
rates above, then 20,000 IMDS and 5,000 container requests on 8 kept-alive connections); the
peak RSS sampled every 50 ms. Fairness inside one pod (issue 13): from one address, 4
connections looping on the token path, 2,000 leaked connections and an SDK fetching token + role
+ credentials every 200 ms in its own process, against a tenant with the policy's default limits
→ `same_pod_victim_success`, `same_pod_victim_p99_ms`, `flood_cpu_percent` (the sidecar's CPU
during the flood). Start-up: process start to `/readyz` true with a warm broker, against the
floor of a bare `python -c 'import asyncio, ssl'` measured in the same run.

wrk, h2load and nginx missing: the speed and latency figures are skipped, and said so.
Loopback only; every load is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import stack_limit  # noqa: E402
from bench.common import CpuWatch, percentile, pin, process_cpu_seconds  # noqa: E402
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
CLIENT_CORE = 1 if (os.cpu_count() or 1) > 1 else 0
SATURATED = 0.9  # a process using this share of its core is the bottleneck
DEPTH_HEADROOM = 0.8  # the depth is chosen so that wrk stays under this, not just under SATURATED
CONNECTIONS = 50
PIPELINE_DEPTHS = (1, 2, 4, 8, 16)  # the sidecar reads up to 16 ahead (http1.MAX_PIPELINED)
PROBE_SECONDS = 3
ATTEMPTS = 4  # per rate, while it is refused (`Rate.refused`) but not for its generator
MIN_RATES = 3  # usable rates per server below which a speed figure is refused
EDGE_SECONDS = 0.5  # left out of each CPU window at both ends: connecting, the last answers
SERVERS = ("sidecar", "stack_limit", "nginx")
FACES = ("imds", "container")

# A GET wrk formats once and sends `depth` times back to back: wrk.init keeps what
# `wrk.format()` returns after `init` as its static request, and counts the requests in it.
# Static, so wrk runs no Lua per request (a `request` function would cost one call per batch).
PIPELINE_SCRIPT = """\
init = function(args)
  local depth = tonumber(args[1]) or 1
  local format = wrk.format
  wrk.format = function(...) return string.rep(format(...), depth) end
end
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def anonymous_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return sum(int(m) for m in re.findall(r"^Anonymous:\s+(\d+)", text, re.M)) / 1024


# -- speed ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One server answering one face's request."""

    server: str  # one of SERVERS
    url: str
    headers: dict[str, str]
    pids: tuple[int, ...]  # whose CPU is the server's (nginx: master and worker)


@dataclass(frozen=True)
class Rate:
    """One wrk run and what the machine did meanwhile."""

    server: str
    rps: float
    depth: int
    generator_cpu: float  # wrk's CPU over the wall time, a share of its one core
    server_cpu: float  # likewise the server's
    server_core_busy: float  # how busy the server's core was, whoever kept it busy
    client_core_busy: float
    errors: str = ""  # wrk's line on non-2xx answers or socket errors

    @property
    def generator_saturated(self) -> bool:
        return self.generator_cpu >= SATURATED

    @property
    def server_bound(self) -> bool:
        return self.server_cpu >= SATURATED

    @property
    def refused(self) -> str:
        """Why this rate is not a figure of the server's ("" → it is)."""
        if self.errors:
            return self.errors
        if self.generator_saturated:
            return f"generator saturated: wrk used {self.generator_cpu:.0%} of its core"
        if not self.server_bound:
            return (
                f"server not the bottleneck: it used {self.server_cpu:.0%} of its core (busy "
                f"{self.server_core_busy:.0%} in all; wrk's core {self.client_core_busy:.0%})"
            )
        return ""

    @property
    def generator_share_at_full_server(self) -> float:
        """What wrk would use of its core with the server using all of its own: wrk's CPU per
        request over the server's. Other work on the machine slows both alike, so unlike
        `generator_cpu` this does not depend on how busy the machine was."""
        return self.generator_cpu / self.server_cpu if self.server_cpu else 1.0

    def as_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "rps": round(self.rps, 1),
            "depth": self.depth,
            "generator_cpu": round(self.generator_cpu, 3),
            "server_cpu": round(self.server_cpu, 3),
            "server_core_busy": round(self.server_core_busy, 3),
            "client_core_busy": round(self.client_core_busy, 3),
            "generator_share_at_full_server": round(self.generator_share_at_full_server, 3),
            "refused": self.refused or None,
        }


def max_rate(target: Target, depth: int, seconds: int, script: Path) -> Rate:
    """wrk at full speed against `target` for `seconds`, `depth` requests pipelined."""
    args = ["taskset", "-c", str(CLIENT_CORE), "wrk", "-t1", f"-c{CONNECTIONS}"]
    args += [f"-d{seconds}s", "-s", str(script)]
    for name, value in target.headers.items():
        args += ["-H", f"{name}: {value}"]
    # taskset execs wrk: this pid is wrk's.
    wrk = subprocess.Popen(
        [*args, target.url, "--", str(depth)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watch = CpuWatch((wrk.pid, *target.pids))
    try:
        time.sleep(EDGE_SECONDS)
        watch.start()
        time.sleep(seconds - 2 * EDGE_SECONDS)
        watch.stop()
    finally:
        out, _ = wrk.communicate(timeout=seconds + 30)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if wrk.returncode != 0 or not match:
        raise RuntimeError(f"wrk said: {out}")
    errors = [line.strip() for line in out.splitlines() if "Non-2xx" in line or "errors" in line]
    return Rate(
        target.server,
        float(match.group(1)),
        depth,
        watch.share([wrk.pid]),
        watch.share(target.pids),
        watch.core_busy.get(SERVER_CORE, 0.0),
        watch.core_busy.get(CLIENT_CORE, 0.0),
        "; ".join(errors),
    )


UNDER = f"would use < {DEPTH_HEADROOM:.0%} of its core with the server at 100% of its own against"


def choose_depth(references: list[Target], script: Path) -> tuple[int, str, list[Rate]]:
    """The least pipelining at which wrk outruns the stack limit and nginx: (depth, why,
    probes). Judged by `generator_share_at_full_server`, which other work on the machine
    does not skew. If no depth outruns nginx, the least that outruns the stack limit: the
    sidecar's figure is its ratio to the stack limit, and nginx's rates will be refused."""
    probes: list[Rate] = []
    fits_stack: int | None = None
    for depth in PIPELINE_DEPTHS:
        rates = [max_rate(target, depth, PROBE_SECONDS, script) for target in references]
        probes += rates
        fits = {rate.server: True for rate in rates}
        for rate in rates:
            fits[rate.server] &= (
                not rate.errors and rate.generator_share_at_full_server < DEPTH_HEADROOM
            )
        if all(fits.values()):
            return depth, f"the least depth at which wrk {UNDER} every reference", probes
        if fits_stack is None and fits.get("stack_limit", False):
            fits_stack = depth
    if fits_stack is not None:
        why = (
            f"no depth at which wrk {UNDER} nginx, whose absolute rate is therefore the "
            f"generator's; the least depth at which it does against the stack limit"
        )
        return fits_stack, why, probes
    return PIPELINE_DEPTHS[-1], f"no depth at which wrk {UNDER} the stack limit", probes


def measure_rounds(
    targets: dict[str, list[Target]], depth: int, rounds: int, seconds: int, script: Path
) -> list[tuple[str, int, Rate]]:
    """Every attempt as (face, round, rate). A rate refused for anything but its generator (see
    `Rate.refused`) is measured again, up to ATTEMPTS times. A face one of whose servers is
    still short of MIN_RATES after `rounds` rounds gets more, up to as many again. Stops early,
    with a rate refused for its saturated generator, if one of the sidecar's or the stack
    limit's is."""
    runs: list[tuple[str, int, Rate]] = []
    faces = list(targets)
    for number in range(2 * rounds):
        if number >= rounds:
            faces = [face for face in targets if short(face, runs)]
            if not faces:
                break
        for face in faces:
            shift = number % len(targets[face])
            for target in targets[face][shift:] + targets[face][:shift]:
                for _ in range(ATTEMPTS):
                    rate = max_rate(target, depth, seconds, script)
                    runs.append((face, number, rate))
                    if not rate.refused or rate.generator_saturated:
                        break  # measuring again would not unburden the generator
                print(
                    f"  depth {depth} round {number + 1} {face:9} {target.server:11} "
                    f"{rate.rps:9,.0f} req/s  wrk {rate.generator_cpu:4.0%}  "
                    f"server {rate.server_cpu:4.0%}  {rate.refused}",
                    flush=True,
                )
                if rate.generator_saturated and target.server != "nginx":
                    return runs
    return runs


def short(face: str, runs: list[tuple[str, int, Rate]]) -> bool:
    """Whether a server of `face` has fewer than MIN_RATES usable rates for a reason another
    round may remove (nginx refused for its generator stays refused)."""
    for server in SERVERS:
        rates = [rate for f, _, rate in runs if f == face and rate.server == server]
        usable = sum(1 for rate in rates if not rate.refused)
        if usable < MIN_RATES and not any(rate.generator_saturated for rate in rates):
            return True
    return False


def spread(values: list[float], digits: int) -> list[float]:
    return [round(min(values), digits), round(max(values), digits)] if values else []


def median(values: list[float], digits: int) -> float | None:
    return round(statistics.median(values), digits) if values else None


def summarize(runs: list[tuple[int, Rate]]) -> dict[str, Any]:
    """One face's figures from its rounds' rates; `refused` says why a figure is missing."""
    used = {
        server: [r for _, r in runs if r.server == server and not r.refused] for server in SERVERS
    }
    rps = {server: median([r.rps for r in rates], 1) for server, rates in used.items()}
    refused = {
        server: f"{len(rates)} usable rates, {MIN_RATES} needed"
        for server, rates in used.items()
        if len(rates) < MIN_RATES
    }
    by_round: dict[int, dict[str, float]] = {}
    for number, rate in runs:
        if not rate.refused:
            by_round.setdefault(number, {})[rate.server] = rate.rps
    per_cpu = {
        server: median([r.rps / r.server_cpu for r in rates], 1) for server, rates in used.items()
    }

    def ratio(reference: str, figures: dict[str, float | None]) -> float | None:
        sidecar, other = figures["sidecar"], figures[reference]
        if "sidecar" in refused or reference in refused or not sidecar or not other:
            return None
        return round(sidecar / other, 3)

    def rounds(reference: str) -> list[float]:
        return [
            round(pair["sidecar"] / pair[reference], 3)
            for pair in by_round.values()
            if "sidecar" in pair and reference in pair
        ]

    return {
        "sidecar_rps": None if "sidecar" in refused else rps["sidecar"],
        "stack_limit_rps": None if "stack_limit" in refused else rps["stack_limit"],
        "nginx_rps": None if "nginx" in refused else rps["nginx"],
        "ratio_to_stack_limit": ratio("stack_limit", rps),
        "ratio_to_nginx": ratio("nginx", rps),
        "ratio_to_stack_limit_rounds": rounds("stack_limit"),
        "ratio_to_nginx_rounds": rounds("nginx"),
        "rps_spread": {server: spread([r.rps for r in rates], 1) for server, rates in used.items()},
        "generator_cpu": {s: median([r.generator_cpu for r in rs], 3) for s, rs in used.items()},
        "server_cpu": {s: median([r.server_cpu for r in rs], 3) for s, rs in used.items()},
        "requests_per_cpu_second": per_cpu,
        "ratio_to_stack_limit_per_cpu": ratio("stack_limit", per_cpu),
        "refused": refused,
        "samples": [{"round": number + 1, **rate.as_json()} for number, rate in runs],
    }


@dataclass(frozen=True)
class FixedRate:
    latencies_ms: list[float]
    generator_cpu: float
    server_cpu: float

    def as_json(self) -> dict[str, Any]:
        refused = self.generator_cpu >= SATURATED
        return {
            "p50_ms": None if refused else round(percentile(self.latencies_ms, 0.50), 3),
            "p99_ms": None if refused else round(percentile(self.latencies_ms, 0.99), 3),
            "generator_cpu": round(self.generator_cpu, 3),
            "server_cpu": round(self.server_cpu, 3),
            "refused": f"generator saturated ({self.generator_cpu:.0%})" if refused else None,
        }


def fixed_rate(target: Target, rate: int, seconds: int) -> FixedRate:
    """h2load: 10 clients at rate/10 req/s each over HTTP/1.1; per-request durations in ms."""
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        clients = 10
        args = ["taskset", "-c", str(CLIENT_CORE), "h2load", "--h1", "-c", str(clients)]
        args += ["--rps", str(rate // clients), "-n", str(rate * seconds), "--log-file", log.name]
        for name, value in target.headers.items():
            args += ["-H", f"{name}: {value}"]
        h2load = subprocess.Popen(
            [*args, target.url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        watch = CpuWatch((h2load.pid, *target.pids))
        try:
            time.sleep(EDGE_SECONDS)
            watch.start()
            time.sleep(seconds - 2 * EDGE_SECONDS)
            watch.stop()
        finally:
            out, _ = h2load.communicate(timeout=seconds + 60)
        if h2load.returncode != 0 or not re.search(r"(\d+) succeeded", out):
            raise RuntimeError(out)
        rows = [line.split("\t") for line in Path(log.name).read_text().splitlines() if line]
    statuses = {row[1] for row in rows}
    if statuses != {"200"}:
        raise RuntimeError(f"non-200 answers at fixed rate: {statuses}")
    return FixedRate(
        [int(row[2]) / 1000 for row in rows],
        watch.share([h2load.pid]),
        watch.share(target.pids),
    )


def start_nginx(workdir: Path, bodies: dict[str, bytes]) -> tuple[subprocess.Popen[bytes], str]:
    """nginx, one worker pinned like the sidecar, serving each body at its path (the path the
    sidecar serves it at, so that the requests are the same)."""
    for path, body in bodies.items():
        file = workdir / "www" / path.lstrip("/")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(body)
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
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(url + next(iter(bodies)), timeout=1).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    pin(process.pid, {SERVER_CORE})
    for pid in nginx_pids(process):
        pin(pid, {SERVER_CORE})
    return process, url


def nginx_pids(process: subprocess.Popen[bytes]) -> tuple[int, ...]:
    workers = subprocess.run(
        ["pgrep", "-P", str(process.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    return (process.pid, *map(int, workers))


# -- memory, fairness, start-up -------------------------------------------------------------


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
        text = re.sub(r"(?ms)^\[limits\.sidecar\].*?(?=^\[|^# end of policy$)", "", text)
        body = text.removesuffix("# end of policy\n")
        policy.write_text(
            body + "\n[limits.sidecar]\ntoken_rps = 1000000.0\ncredentials_rps = 1000000.0\n"
            "metadata_rps = 1000000.0\nburst = 1000000\nmax_connections = 1024\n"
            "max_connections_per_client = 1024\n\n# end of policy\n"
        )
    return target


# -- the run --------------------------------------------------------------------------------


def without_samples(result: dict[str, Any]) -> dict[str, Any]:
    """The result as printed: every figure, without the samples and probes behind them."""
    hidden = ("samples", "probes", "discarded")
    return {
        key: without_samples(value) if isinstance(value, dict) else value
        for key, value in result.items()
        if key not in hidden
    }


def verdict(value: float | None, target: str) -> str:
    """ "pass", "fail" or "no figure", for a target written as "<= 15" or ">= 0.9"."""
    if value is None:
        return "no figure"
    op, bound = target.split()[:2]
    ok = value <= float(bound) if op == "<=" else value >= float(bound)
    return "pass" if ok else "fail"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="duration of each rate (>= 2)")
    parser.add_argument("--rounds", type=int, default=5, help="rates per server and face")
    parser.add_argument("--rate", type=int, default=1000, help="the fixed rate of the latencies")
    parser.add_argument("--latency-seconds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sidecar.json")
    args = parser.parse_args()
    if args.seconds < 2 or args.latency_seconds < 2:
        parser.error("each measurement needs at least 2 s (its CPU is read over all but 1 s)")
    missing = [tool for tool in ("wrk", "h2load", "nginx", "taskset") if not shutil.which(tool)]
    if missing:
        print(
            f"{', '.join(missing)} missing (apt-get install wrk nghttp2-client nginx-light "
            "util-linux): the speed figures and fixed-rate latencies are skipped"
        )

    from metaproxy.identity.issue import issue_token
    from metaproxy.testing.emulator import StsEmulator

    compile_bytecode()
    children: list[Child] = []
    servers: list[subprocess.Popen[Any]] = []
    secret_path = "/v2/credentials/" + secrets.token_urlsafe(24)
    with (
        tempfile.TemporaryDirectory(prefix="bench-sidecar-") as tmp_name,
        StsEmulator() as emulator,
    ):
        tmp = Path(tmp_name)
        keys = make_local_keys(tmp / "keys")
        try:
            broker = start_metaproxy(
                "broker",
                broker_args(
                    keys,
                    policies_dir=bench_policies(tmp / "policies"),
                    audit_dir=tmp / "audit",
                    sts_endpoint=emulator.url,
                    instance="bench-broker",
                ),
                ready_file=tmp / "broker.ready",
                log_file=tmp / "broker.log",
                env=EMULATOR_CREDENTIALS,
            )
            children.append(broker)

            def identity(task: str, tenant: str, app: str = "") -> Path:
                path = tmp / f"identity-{task}.jwt"
                path.write_text(
                    issue_token(
                        keys.identity_key,
                        issuer=ISSUER,
                        audience=AUDIENCE,
                        task=task,
                        tenant=tenant,
                        app=app,
                        ttl=7200,
                    )
                )
                return path

            token_file = identity("bench-1", "acme")
            fair_token_file = identity("bench-fair", FAIRNESS_TENANT, "web")

            def sidecar(name: str, identity_file: Path = token_file) -> tuple[Child, float]:
                """A sidecar as a pod runs one: both faces, the secret path, the token key in a
                file of its own (made at start, as in a new pod)."""
                started = time.monotonic()
                child = start_metaproxy(
                    name,
                    [
                        *sidecar_args(
                            keys,
                            broker_url=broker.ready["url"],
                            identity_file=identity_file,
                            authorization_file=tmp / f"{name}.auth",
                        ),
                        *("--container-credentials-path", secret_path),
                        *("--imds-token-key-file", str(tmp / f"{name}.imds-token.key")),
                    ],
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
            sidecar_urls = {
                "imds": f"{imds}/latest/meta-data/iam/security-credentials/{role}",
                "container": child.ready["container_urls"][0] + secret_path,
            }
            face_headers = {"imds": headers, "container": {}}
            answers = {
                face: stack_limit.capture(sidecar_urls[face], face_headers[face]) for face in FACES
            }

            stop, peak = threading.Event(), [rss_idle]
            sampler = threading.Thread(target=sample_peak_rss, args=(pid, stop, peak), daemon=True)
            sampler.start()
            speed: dict[str, Any] = {"skipped": f"{', '.join(missing)} not installed"}
            failed: list[str] = []
            if not missing:
                speed, failed = measure_speed(
                    args, tmp, pid, sidecar_urls, face_headers, answers, servers
                )
            keepalive_load(sidecar_urls["imds"], headers, requests=20_000, connections=8)
            keepalive_load(sidecar_urls["container"], {}, requests=5_000, connections=8)
            stop.set()
            sampler.join()
            rss_load, anon_load = rss_mb(pid), anonymous_mb(pid)
            for server in servers:
                server.terminate()
                server.wait(10)

            fair, _ = sidecar("sidecar-fair", fair_token_file)
            pin(fair.process.pid, {SERVER_CORE})
            fairness = same_pod_fairness(fair.ready["imds_urls"][0], fair.process.pid, 20.0)
            fairness["anon_after_flood_mb"] = round(anonymous_mb(fair.process.pid), 1)
            fairness["rss_after_flood_mb"] = round(rss_mb(fair.process.pid), 1)
        finally:
            for server in servers:
                if server.poll() is None:
                    server.kill()
                    server.wait()
            for child in reversed(children):
                child.stop()

    targets = {
        "ratio_to_stack_limit": ">= 0.9",
        "anon_load_mb": "<= 15",
        "rss_load_mb": "<= 28",
        "same_pod_victim_success": ">= 0.99",
        "same_pod_victim_p99_ms": "<= 50",
    }
    result: dict[str, Any] = {
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
    }
    verdicts = {name: verdict(result.get(name), target) for name, target in targets.items()}
    verdicts["ready_ms"] = "pass" if result["ready_ms"] <= result["ready_budget_ms"] else "fail"
    if "container" in speed:
        verdicts["container_ratio_to_stack_limit"] = verdict(
            speed["container"]["ratio_to_stack_limit"], targets["ratio_to_stack_limit"]
        )
    result["targets"] = {
        **targets,
        "ready_ms": "<= 1.5 * import_floor_ms + 100 (python -c 'import asyncio, ssl')",
        "generator_cpu": f"< {SATURATED} of its core, else the rate is refused",
    }
    result["verdicts"] = verdicts
    result["speed_refused"] = failed
    result["cpu_count"] = os.cpu_count()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(without_samples(result), indent=2))
    if failed:
        print("speed figures refused: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def same_answers(sidecar: bytes, stack: Target, nginx: Target) -> None:
    """The stack limit answers the sidecar's bytes (but for Date), nginx its body."""
    undated = re.compile(rb"\r\nDate: [^\r]*")
    if undated.sub(b"", stack_limit.capture(stack.url, stack.headers)) != undated.sub(b"", sidecar):
        raise RuntimeError("the stack limit does not answer what the sidecar answered")
    if (
        stack_limit.capture(nginx.url, nginx.headers).partition(b"\r\n\r\n")[2]
        != (sidecar.partition(b"\r\n\r\n")[2])
    ):
        raise RuntimeError("nginx does not serve the body the sidecar served")


def nginx_reading(runs: list[tuple[str, int, Rate]]) -> str:
    """Whether nginx's absolute rate is its own or the generator's, in one sentence."""
    rates = [rate for _, _, rate in runs if rate.server == "nginx"]
    saturated = [rate for rate in rates if rate.generator_saturated]
    if len(rates) - len(saturated) < MIN_RATES:
        return (
            "one wrk core does not outrun nginx: its absolute rate would be the generator's "
            "and is refused; the honest figure is ratio_to_stack_limit, measured under the "
            "same generator"
        )
    top = max(rate.generator_cpu for rate in rates if not rate.generator_saturated)
    return (
        f"nginx's rates are its own: wrk used at most {top:.0%} of its core against it "
        f"({len(saturated)} rate(s) refused for a saturated generator); ratio_to_nginx compares "
        "the two servers under the same generator"
    )


def measure_speed(
    args: argparse.Namespace,
    tmp: Path,
    sidecar_pid: int,
    sidecar_urls: dict[str, str],
    face_headers: dict[str, dict[str, str]],
    answers: dict[str, bytes],
    servers: list[subprocess.Popen[Any]],
) -> tuple[dict[str, Any], list[str]]:
    """The speed and latency figures (see the module's docstring), and what was refused.
    Starts the stack limit and nginx, appending them to `servers` for the caller to stop."""
    stack, stack_urls = stack_limit.start(answers, tmp)
    servers.append(stack)
    pin(stack.pid, {SERVER_CORE})
    paths = {face: urlsplit(url).path for face, url in sidecar_urls.items()}
    bodies = {paths[face]: answer.partition(b"\r\n\r\n")[2] for face, answer in answers.items()}
    nginx, nginx_url = start_nginx(tmp / "nginx", bodies)
    servers.append(nginx)
    # The same request to each server (but for the port): the same path, the same headers.
    targets = {
        face: [
            Target("sidecar", sidecar_urls[face], face_headers[face], (sidecar_pid,)),
            Target("stack_limit", stack_urls[face] + paths[face], face_headers[face], (stack.pid,)),
            Target("nginx", nginx_url + paths[face], face_headers[face], nginx_pids(nginx)),
        ]
        for face in FACES
    }
    for face, (_, stack_target, nginx_target) in targets.items():
        same_answers(answers[face], stack_target, nginx_target)
    script = tmp / "pipeline.lua"
    script.write_text(PIPELINE_SCRIPT)
    for face_targets in targets.values():  # warm-up: the sidecar keeps its answers on first use
        max_rate(face_targets[0], 1, 2, script)
    references = [t for face_targets in targets.values() for t in face_targets[1:]]
    depth, why, probes = choose_depth(references, script)
    print(f"pipelining {depth} request(s) per connection: {why}", flush=True)
    discarded: list[tuple[str, int, Rate]] = []
    while True:
        runs = measure_rounds(targets, depth, args.rounds, args.seconds, script)
        last = runs[-1][2]
        if not last.generator_saturated or last.server == "nginx" or depth == PIPELINE_DEPTHS[-1]:
            break
        # The probes misjudged: start again, deeper, so that all servers face one generator.
        discarded += runs
        depth = next(deeper for deeper in PIPELINE_DEPTHS if deeper > depth)
        why += f"; raised to {depth} after wrk saturated against the {last.server}"
        print(f"pipelining {depth}: wrk saturated against the {last.server}", flush=True)
    faces = {
        face: summarize([(number, rate) for f, number, rate in runs if f == face]) for face in FACES
    }
    used = [rate for _, _, rate in runs if not rate.refused]
    busiest = {
        server: max((r.generator_cpu for r in used if r.server == server), default=None)
        for server in SERVERS
    }

    imds = targets["imds"]
    lat = {t.server: fixed_rate(t, args.rate, args.latency_seconds).as_json() for t in imds}
    # nginx refused is no failure: the sidecar's figure is its ratio to the stack limit.
    failed = [
        f"{face} {server}: {reason}"
        for face, figures in faces.items()
        for server, reason in figures["refused"].items()
        if server != "nginx"
    ]
    failed += [f"fixed rate {server}: {f['refused']}" for server, f in lat.items() if f["refused"]]
    speed = {
        **faces["imds"],
        "p50_ms": lat["sidecar"]["p50_ms"],
        "p99_ms": lat["sidecar"]["p99_ms"],
        "stack_limit_p50_ms": lat["stack_limit"]["p50_ms"],
        "stack_limit_p99_ms": lat["stack_limit"]["p99_ms"],
        "nginx_p50_ms": lat["nginx"]["p50_ms"],
        "nginx_p99_ms": lat["nginx"]["p99_ms"],
        "fixed_rate_rps": args.rate,
        "fixed_rate": lat,
        "container": faces["container"],
        "load": {
            "generator": f"wrk, 1 thread, {CONNECTIONS} kept-alive connections, on core "
            f"{CLIENT_CORE}; servers on core {SERVER_CORE}",
            "pipeline_depth": depth,
            "depth_reason": why,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "saturated_at": SATURATED,
            "generator_cpu_max": {
                s: None if c is None else round(c, 3) for s, c in busiest.items()
            },
            "nginx": nginx_reading(runs),
            "probes": [rate.as_json() for rate in probes],
            "discarded": [
                {"face": face, "round": number + 1, **rate.as_json()}
                for face, number, rate in discarded
            ],
            "answer_bytes": {face: len(answer) for face, answer in answers.items()},
        },
    }
    return speed, failed


if __name__ == "__main__":
    raise SystemExit(main())
