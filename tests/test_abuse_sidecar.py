"""A task's client that leaks connections, floods, or trickles headers cannot take the sidecar
down, exhaust its file descriptors, or starve a well-behaved client of the same task."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import time
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.models import SidecarLimits
from metaproxy.net.connguard import fd_budget
from metaproxy.sidecar.guards import SIDECAR_FD_RESERVE
from metaproxy.sidecar.process import Sidecar
from tests.conftest import SidecarFactory
from tests.support import (
    Pki,
    container_request,
    issue,
    scrape,
    start_sidecar_process,
    value,
    wait_ready,
)

ABUSER = "127.0.0.2"  # all of 127/8 is loopback on Linux: the abuser gets its own address
VICTIM = "127.0.0.1"
CREDS = "/latest/meta-data/iam/security-credentials/acme-app"


@pytest.fixture(autouse=True)
def enough_file_descriptors() -> None:
    """Thousands of client sockets live in this process next to the sidecar."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def set_sidecar_limits(broker: BrokerServer, policies_dir: Path, **limits: float) -> None:
    """Rewrite acme's `[limits.sidecar]` and wait until the broker has reloaded it."""
    acme = policies_dir / "acme.toml"
    text = acme.read_text()
    head, _, rest = text.partition("[limits.sidecar]\n")
    _, _, tail = rest.partition("\n\n")
    block = "".join(f"{key} = {value}\n" for key, value in limits.items())
    generation = broker.policies.generation
    acme.write_text(f"{head}[limits.sidecar]\n{block}\n{tail}")
    deadline = time.monotonic() + 10
    while broker.policies.generation == generation:
        assert time.monotonic() < deadline, "policy not reloaded"
        await asyncio.sleep(0.05)


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rpartition(":")
    return host, int(port)


def server_side_fds(port: int) -> int:
    """Connection sockets this process holds whose local port is `port`: the sidecar's side of
    its connections (the client side, in the same process, has the ephemeral port)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rpartition(":")[2], 16)
        if local_port == port and fields[3] != "0A" and fields[9] in inodes:  # 0A: LISTEN
            count += 1
    return count


async def imds_credentials(session: aiohttp.ClientSession, sidecar: Sidecar) -> int:
    """A well-behaved IMDSv2 client: token, then the role's credentials."""
    async with session.put(
        sidecar.imds_url + "/latest/api/token",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    ) as response:
        if response.status != 200:
            return response.status
        token = await response.text()
    async with session.get(
        sidecar.imds_url + CREDS, headers={"X-aws-ec2-metadata-token": token}
    ) as response:
        if response.status == 200:
            assert json.loads(await response.text())["Code"] == "Success"
        return response.status


def victim_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(local_addr=(VICTIM, 0), force_close=True)
    return aiohttp.ClientSession(connector=connector)


async def read_status(reader: asyncio.StreamReader) -> int | None:
    """The status of the next response (its body skipped), or None once the server closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        (int(v) for k, _, v in (h.partition(":") for h in lines) if k.lower() == "content-length"),
        0,
    )
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        await reader.readexactly(length)
    return int(lines[0].split()[1])


# A load test (`make load-test`, alone): 2,000 clients looping on credentials take a core for a
# second, and the peak of the sidecar's descriptors is read from /proc while they do.
@pytest.mark.load
async def test_leaked_connections_stay_under_the_cap_and_are_reaped(
    start_sidecar: SidecarFactory,
) -> None:
    """2,000 never-closed connections looping on credentials: the sidecar holds at most its cap,
    reaps them within the idle timeout, and a neighbour still gets its credentials."""
    sidecar = await start_sidecar("acme", "t-leak", keepalive_timeout=1.0, header_timeout=1.0)
    guard = sidecar.guard
    host, port, request = container_request(sidecar)
    statuses: dict[int | None, int] = {}
    stop_looping = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []
    peak_fds = 0
    # A leak accumulates: connects at most 32 at a time stay inside the sidecar's accept backlog
    # (64). All 2,000 at once overflowed it, and the dropped SYNs' retransmission back-off (1 s,
    # 3 s, 7 s, ...) made this test last 3 to 56 s, waiting on the kernel rather than the sidecar.
    connecting = asyncio.Semaphore(32)

    async def leak_one() -> None:
        async with connecting:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(ABUSER, 0))
        writers.append(writer)  # kept open to the end: this client never closes anything
        while not stop_looping.is_set():
            try:
                writer.write(request)
                status = await read_status(reader)
            except ConnectionError:
                status = None
            statuses[status] = statuses.get(status, 0) + 1
            if status is None:
                return

    async def sample() -> None:
        nonlocal peak_fds
        while not stop_looping.is_set():
            peak_fds = max(peak_fds, server_side_fds(port))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    leakers = [asyncio.create_task(leak_one()) for _ in range(2000)]
    await asyncio.sleep(1.0)
    async with victim_session() as session:
        victim = [await imds_credentials(session, sidecar) for _ in range(20)]
    stop_looping.set()
    await asyncio.gather(*leakers, sampler)

    assert victim == [200] * 20
    assert len(writers) == 2000
    assert guard.peak <= guard.cap == 256
    assert statuses.get(503, 0) > 0  # refused connections and the rate limit both answer 503
    assert 500 not in statuses
    print(f"server-side connection fds peaked at {peak_fds}, cap {guard.cap}")
    assert peak_fds <= guard.fd_budget
    deadline = time.monotonic() + 1.0 + 2.0  # keepalive_timeout plus scheduling slack
    while guard.open and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert guard.open == 0, "idle connections were not reaped"
    for writer in writers:
        writer.close()


async def test_many_addresses_cannot_lock_out_a_neighbour(
    broker: BrokerServer, policies_dir: Path, start_sidecar: SidecarFactory
) -> None:
    """Leaked connections from 20 addresses fill the cap; a neighbour evicts the heaviest."""
    await set_sidecar_limits(broker, policies_dir, max_connections=40, max_connections_per_client=8)
    sidecar = await start_sidecar("acme", "t-many")
    host, port = host_port(sidecar.imds_url)
    held = [
        await asyncio.open_connection(host, port, local_addr=(f"127.0.0.{10 + i % 20}", 0))
        for i in range(20 * 8)
    ]
    await asyncio.sleep(0.1)
    assert sidecar.guard.open == 40
    async with victim_session() as session:
        assert [await imds_credentials(session, sidecar) for _ in range(5)] == [200] * 5
    assert sidecar.guard.evicted >= 1  # once room is made, closing victims free their slot
    assert sidecar.guard.peak <= 40
    for _, writer in held:
        writer.close()


async def busy_connections(
    host: str, port: int, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` connections that each owe an answer: token PUTs held in the tarpit, the pod's
    token bucket having been emptied first (see `set_sidecar_limits(token_rps=...)`)."""
    put = (
        b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
        b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(put)  # takes the bucket's only token
    await read_status(reader)
    writer.close()
    held = [await asyncio.open_connection(host, port) for _ in range(count)]
    for _, held_writer in held:
        held_writer.write(put)
    await asyncio.sleep(0.05)  # parsed, and waiting out their 0.25 s tarpit
    return held


@pytest.mark.parametrize("face", ["imds", "container"])
async def test_connection_over_the_per_client_cap_is_503(
    face: str, broker: BrokerServer, policies_dir: Path, start_sidecar: SidecarFactory
) -> None:
    """The connection past a client's cap, when none of its connections is idle, gets 503 +
    Retry-After in the endpoint's own format: the answer every SDK retries."""
    await set_sidecar_limits(
        broker, policies_dir, max_connections_per_client=4, token_rps=0.01, burst=1
    )
    sidecar = await start_sidecar("acme", "t-cap")
    held = await busy_connections(*host_port(sidecar.imds_url), 4)
    host, port = host_port(sidecar.imds_url if face == "imds" else sidecar.container_url)
    reader, writer = await asyncio.open_connection(host, port)
    answer = await asyncio.wait_for(reader.read(), 2)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nRetry-After: 1" in head
    if face == "container":
        assert json.loads(body) == {
            "code": "ThrottlingException",
            "message": "too many connections",
        }
    else:
        assert b"503 - Service Unavailable" in body
    assert sidecar.guard.rejected["per_client"] == 1
    for _, w in [*held, (reader, writer)]:
        w.close()


async def test_connection_over_the_per_client_cap_evicts_the_idlest(
    broker: BrokerServer, policies_dir: Path, start_sidecar: SidecarFactory
) -> None:
    """At a client's cap, a new connection closes that client's connection idle the longest
    (containers of a pod share the address: leaked ones must not lock the others out)."""
    await set_sidecar_limits(broker, policies_dir, max_connections_per_client=4)
    sidecar = await start_sidecar("acme", "t-evict")
    host, port = host_port(sidecar.imds_url)
    held = [await asyncio.open_connection(host, port) for _ in range(4)]
    async with victim_session() as session:
        assert await imds_credentials(session, sidecar) == 200
    assert await asyncio.wait_for(held[0][0].read(), 2) == b""  # the oldest idle one
    assert sidecar.guard.evicted >= 1
    assert sidecar.guard.rejected["per_client"] == 0
    assert sidecar.guard.peak <= 4
    for _, writer in held:
        writer.close()


async def test_slow_headers_are_cut_at_the_deadline(
    broker: BrokerServer, policies_dir: Path, start_sidecar: SidecarFactory
) -> None:
    """500 connections trickling headers are all closed by the 1 s header deadline, while
    well-behaved requests keep succeeding."""
    await set_sidecar_limits(
        broker, policies_dir, max_connections=1000, max_connections_per_client=1000
    )
    sidecar = await start_sidecar("acme", "t-slow", header_timeout=1.0, keepalive_timeout=30.0)
    host, port = host_port(sidecar.imds_url)
    trickle = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    # Connects at most 32 at a time, inside the sidecar's accept backlog (64): 500 at once
    # overflowed it, and what the kernel then did with the dropped handshakes (retransmits, a
    # connection the sidecar never saw whole) was measured instead of the deadline.
    connecting = asyncio.Semaphore(32)

    async def slow_client() -> float:
        async with connecting:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(ABUSER, 0))
        started = time.monotonic()

        async def drip() -> None:
            for byte in trickle:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.7)

        dripping = asyncio.create_task(drip())
        try:
            answer = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            # Cut as well: a drip that reached the closed socket before this read drew a reset,
            # which replaces the 408 still unread (seen on a loaded machine).
            answer = b""
        finally:
            dripping.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await dripping
            writer.close()
        assert answer in (b"", *[b"HTTP/1.1 408 Request Timeout" + answer[28:]])
        return time.monotonic() - started

    slow = [asyncio.create_task(slow_client()) for _ in range(500)]
    await asyncio.sleep(0.2)
    async with victim_session() as session:
        good = [await imds_credentials(session, sidecar) for _ in range(10)]
    durations = await asyncio.gather(*slow)
    assert good == [200] * 10
    # Each trickle would take 70 s to finish; being cut within seconds shows the deadline did it.
    # The slack is wide because the deadline runs from accept(), which a loaded 2-core machine
    # can reach late.
    assert max(durations) < 1.0 + 5.0
    # Each cut counted as a header timeout, by whichever timed it out: the connection guard
    # (the first head) or the HTTP layer's sweep, whose deadline can come up first.
    samples = await scrape(sidecar.admin_url)
    assert value(samples, "metaproxy_sidecar_rejected_total", reason="header_timeout") >= 500


async def test_open_connections_and_refusals_are_in_metrics(
    broker: BrokerServer, policies_dir: Path, start_sidecar: SidecarFactory
) -> None:
    """/metrics counts the guard's open connections, its refusals by reason, its cap and budget."""
    await set_sidecar_limits(broker, policies_dir, max_connections_per_client=2)
    sidecar = await start_sidecar("acme", "t-metrics")
    host, port = host_port(sidecar.imds_url)
    held = [await asyncio.open_connection(host, port) for _ in range(3)]
    assert await asyncio.wait_for(held[0][0].read(), 2) == b""  # evicted for the third one
    async with (
        aiohttp.ClientSession() as session,
        session.get(sidecar.admin_url + "/metrics") as response,
    ):
        text = await response.text()
    assert "metaproxy_sidecar_open_connections 3.0" in text  # two IMDS, one admin (this scrape)
    refused = re.search(r'metaproxy_sidecar_rejected_total\{reason="connection_cap"\} (\S+)', text)
    assert refused is not None
    assert float(refused[1]) >= 1
    assert f"metaproxy_sidecar_connection_cap {float(sidecar.guard.cap)}" in text
    assert f"metaproxy_sidecar_fd_budget {float(sidecar.guard.fd_budget)}" in text
    for _, writer in held:
        writer.close()


def soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no NOFILE limit")


async def test_guard_works_in_the_real_process_on_uvloop(
    broker: BrokerServer, policies_dir: Path, pki: Pki, tmp_path: Path
) -> None:
    """`metaproxy sidecar` (uvloop): connections past the per-client cap close the idlest, and
    the process holds no more descriptors than its budget while 300 connections are attempted."""
    await set_sidecar_limits(broker, policies_dir, max_connections_per_client=8)
    child = await start_sidecar_process(tmp_path, broker.url, pki, issue(pki, "t-uvloop", "acme"))
    try:
        await wait_ready(child.ready["admin_url"])
        host, port = host_port(child.ready["imds_urls"][0])
        held = []
        for _ in range(300):
            with contextlib.suppress(OSError):
                held.append(await asyncio.open_connection(host, port, local_addr=(ABUSER, 0)))
        # Each connection past the cap closes the one idle the longest: all but the last 8
        # are closed by the sidecar, which never holds more than its cap.
        answers = await asyncio.gather(
            *(asyncio.wait_for(reader.read(), 3) for reader, _ in held[:-8]),
            return_exceptions=True,
        )
        fds = len(os.listdir(f"/proc/{child.process.pid}/fd"))
        cap = SidecarLimits().max_connections
        budget = fd_budget(cap, SIDECAR_FD_RESERVE, soft_nofile(child.process.pid))
        assert all(a == b"" or isinstance(a, ConnectionResetError) for a in answers), answers[:3]
        assert fds <= budget
        for _, writer in held:
            writer.close()
    finally:
        await asyncio.to_thread(child.stop)
        log = (tmp_path / "sidecar.log").read_text()
        assert "Traceback" not in log, log[-2000:]


async def test_bodies_that_never_arrive_cannot_lock_out_the_pod(
    start_sidecar: SidecarFactory,
) -> None:
    """64 connections that announce a body and stall (the per-client cap) are cut at the
    deadline, and the same address gets its credentials right after."""
    sidecar = await start_sidecar("acme", "t-body", header_timeout=1.0, keepalive_timeout=30.0)
    host, port = host_port(sidecar.imds_url)
    stall = (
        b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
        b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 100\r\n\r\npartial"
    )
    held = [await asyncio.open_connection(host, port, local_addr=(VICTIM, 0)) for _ in range(64)]
    for _, writer in held:
        writer.write(stall)
    answers = await asyncio.gather(*(asyncio.wait_for(r.read(), 1.0 + 3.0) for r, _ in held))
    assert {answer.split(b" ", 2)[1] for answer in answers} == {b"408"}
    async with victim_session() as session:
        assert [await imds_credentials(session, sidecar) for _ in range(3)] == [200] * 3
    for _, writer in held:
        writer.close()


async def test_a_pod_has_one_bucket_whatever_address_its_clients_dialled(
    broker: BrokerServer, policies_dir: Path, start_sidecar: SidecarFactory
) -> None:
    """Through the link-local redirect a client's source address is the address it dialled,
    so a pod's clients come from several: the pod still has one rate bucket, not one each."""
    await set_sidecar_limits(broker, policies_dir, token_rps=0.01, burst=4)
    sidecar = await start_sidecar("acme", "t-one-bucket")
    host, port = host_port(sidecar.imds_url)
    put = (
        b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
        b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n"
    )
    statuses = []
    for n in range(16):  # four source addresses, four fresh connections each
        reader, writer = await asyncio.open_connection(
            host, port, local_addr=(f"127.0.0.{20 + n % 4}", 0)
        )
        writer.write(put)
        statuses.append(await read_status(reader))
        writer.close()
    assert statuses.count(200) == 4  # the one bucket's burst, not four buckets' worth
