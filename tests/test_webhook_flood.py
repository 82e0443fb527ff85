"""A connection flood does not take the webhook down: with `failurePolicy: Fail`, a webhook that
runs out of memory stops every labelled pod from being created (the hardening finding: 18,000
idle half-requests took it past its 128 MiB limit; idle TLS connections, past 500 MiB).

A real `metaproxy webhook` process with its deployed settings, 20,000 connections from 40
loopback addresses (two `tests.connection_flood` processes), its RSS sampled throughout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaproxy.demo.processes import Child, start_metaproxy
from tests.support import REPO, Pki
from tests.test_webhook import labelled_pod, review

pytestmark = pytest.mark.load  # 20,000 connections: `make load-test`, alone

CONNECTIONS = 20_000
FLOODERS = 2  # each process holds CONNECTIONS / FLOODERS (see tests/connection_flood.py)
# A request cut short: a head announcing a body that never comes.
HALF_REQUEST = (
    "POST /mutate HTTP/1.1\r\nHost: metaproxy-webhook.metaproxy.svc\r\n"
    "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
)
PROMPTLY = 1.0  # seconds for a review while the flood holds (the API server allows 5)
_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def webhook_memory_limit() -> int:
    """Bytes: the webhook container's memory limit in deploy/kubernetes."""
    manifest = REPO / "deploy" / "kubernetes" / "base" / "webhook-deployment.yaml"
    deployment = yaml.safe_load(manifest.read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    memory = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", container["resources"]["limits"]["memory"])
    assert memory is not None
    return int(memory[1]) * _UNITS[memory[2]]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@contextlib.contextmanager
def peak_rss(pid: int) -> Iterator[list[int]]:
    """The process's RSS every 20 ms while the block runs; the list's max is the peak."""
    samples = [rss_bytes(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            with contextlib.suppress(OSError):
                samples.append(rss_bytes(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join()


@contextlib.contextmanager
def flood(port: int, head: str) -> Iterator[list[dict[str, Any]]]:
    """CONNECTIONS connections held open against `port` (each sending `head`, if any)."""
    per_process = CONNECTIONS // FLOODERS
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.connection_flood",
                str(port),
                str(i * 40),
                str(per_process),
                *([head] if head else []),
            ],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(FLOODERS)
    ]
    try:
        yield [json.loads(p.stdout.readline()) for p in processes if p.stdout is not None]
    finally:
        for p in processes:
            p.communicate(timeout=10)


async def timed_review(url: str, tls: ssl.SSLContext | None) -> tuple[float, bytes]:
    """(seconds, answer) for one AdmissionReview from 127.0.0.1, as the API server sends it."""
    body = json.dumps(review(labelled_pod())).encode()
    host, port = url.partition("://")[2].rsplit(":", 1)
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(
        host, int(port), ssl=tls, server_hostname=host if tls else None, local_addr=("127.0.0.1", 0)
    )
    writer.write(
        b"POST /mutate HTTP/1.1\r\nHost: metaproxy-webhook.metaproxy.svc\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer = await reader.read()
    seconds = time.monotonic() - started
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    return seconds, answer


def start_webhook(tmp_path: Path, *extra: str) -> Child:
    args = ["webhook", "--listen", "127.0.0.1:0", "--image", "registry.example.com/metaproxy:0.1.0"]
    args += ["--broker-url", "https://metaproxy-broker.metaproxy.svc:8443", *extra]
    return start_metaproxy(
        "webhook", args, ready_file=tmp_path / "webhook.ready", log_file=tmp_path / "webhook.log"
    )


@pytest.mark.parametrize(
    ("listener", "head"),
    [("tls", ""), ("plain", HALF_REQUEST)],
    ids=["idle-tls-connections", "half-requests"],
)
async def test_a_connection_flood_keeps_the_webhook_under_its_memory_limit_and_answering(
    tmp_path: Path, pki: Pki, listener: str, head: str
) -> None:
    """20,000 idle connections (TLS, no ClientHello) or half-requests: RSS stays under the
    deployment's limit and a review is answered within a second, while they are held."""
    limit = webhook_memory_limit()
    tls_args = ["--tls-cert", str(pki.broker_cert), "--tls-key", str(pki.broker_key)]
    child = await asyncio.to_thread(
        start_webhook, tmp_path, *(tls_args if listener == "tls" else [])
    )
    tls = ssl.create_default_context(cafile=str(pki.ca)) if listener == "tls" else None
    try:
        with (
            peak_rss(child.process.pid) as samples,
            flood(int(child.ready["url"].rsplit(":", 1)[1]), head) as flooders,
        ):
            seconds, answer = await timed_review(child.ready["url"], tls)
            held_for_review = rss_bytes(child.process.pid)
        opened = sum(f["opened"] for f in flooders)
        print(f"{listener}: opened {opened}, {flooders}, peak RSS {max(samples) / 2**20:.1f} MiB")
        print(f"review in {seconds * 1000:.0f} ms, RSS {held_for_review / 2**20:.1f} MiB")
        assert opened >= CONNECTIONS * 0.95
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["response"]["allowed"] is True
        assert seconds < PROMPTLY
        assert max(samples) < limit
    finally:
        assert child.stop()
    log = (tmp_path / "webhook.log").read_text()
    assert [
        line for line in log.splitlines() if '"level": "error"' in line or "Traceback" in line
    ] == []
