"""Fair share inside one pod: every container of a pod has the pod's source address, so one
container looping on the sidecar (and leaking connections) must not take another's share."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.models import SidecarLimits
from metaproxy.net.connguard import fd_budget
from metaproxy.sidecar.fairness import FairShare
from metaproxy.sidecar.guards import SIDECAR_FD_RESERVE
from tests.conftest import SidecarFactory
from tests.support import Pki, issue, run_command, start_sidecar_process, wait_ready
from tests.test_abuse_sidecar import host_port, imds_credentials, soft_nofile, victim_session

POD = "127.0.0.1"  # the looping container, its leaked connections and the SDK share it


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_light_connection_is_served_while_four_loop() -> None:
    """Four connections asking as fast as they can and one asking every 200 ms: the rare one is
    never refused, and the pod as a whole stays within its rate and burst."""
    clock = Clock()
    share = FairShare(clock)
    rate, burst = 20.0, 50.0
    admitted = refused_light = 0
    light = 1000
    for step in range(10_000):  # 10 s in 1 ms steps
        clock.now = step / 1000
        for looper in range(4):
            admitted += share.take(looper, rate, burst) == 0.0
        if step % 200 == 0:
            light += 1  # an SDK: a new connection per fetch
            if share.take(light, rate, burst) == 0.0:
                admitted += 1
            else:
                refused_light += 1
    assert refused_light == 0
    assert admitted <= rate * 10 + burst


def test_one_connection_alone_gets_the_whole_rate() -> None:
    """Max-min: with nobody else asking, one connection may use the pod's whole rate."""
    clock = Clock()
    share = FairShare(clock)
    admitted = 0
    for step in range(5_000):
        clock.now = step / 1000
        admitted += share.take(1, 20.0, 50.0) == 0.0
    assert admitted >= 20 * 5 * 0.9


def test_heavy_connections_leave_half_the_bucket_to_others() -> None:
    """A connection over its share stops at half the bucket and is told to come back later;
    connections under their share still get the other half."""
    clock = Clock()
    share = FairShare(clock)
    assert share.take(2, 20.0, 50.0) == 0.0
    waits = [share.take(1, 20.0, 50.0) for _ in range(60)]
    admitted = waits.count(0.0)
    assert 10 <= admitted <= 25
    assert all(wait >= 1.0 for wait in waits[admitted:])
    others = [share.take(100 + n, 20.0, 50.0) for n in range(20)]
    assert others == [0.0] * 20


def test_requests_taken_together_fare_as_taken_one_by_one() -> None:
    """Four requests of one connection taken at once all go ahead exactly when four taken one
    after another would; when not all would, none is taken, and taking them one by one then
    fares as it would have: the same answers, step for step, as a share taking them singly."""
    clock = Clock()
    singly, together = FairShare(clock), FairShare(clock)
    rate, burst = 20.0, 50.0
    for step in range(3_000):  # 3 s in 1 ms steps: a looper, and a light connection
        clock.now = step / 1000
        for conn in (1, 2) if step % 100 == 0 else (1,):
            alone = [singly.take(conn, rate, burst) for _ in range(4)]
            if together.take(conn, rate, burst, 4) == 0.0:
                assert alone == [0.0] * 4
            else:
                assert [together.take(conn, rate, burst) for _ in range(4)] == alone
    assert together.take(3, rate, burst) == singly.take(3, rate, burst)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(autouse=True)
def enough_file_descriptors() -> None:
    """2,000 leaked client sockets live in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# A load test (`make load-test`, alone): four loopers keep the sidecar's core busy while the
# SDK's p99 is measured.
@pytest.mark.load
async def test_same_pod_looper_and_leaks_do_not_starve_an_sdk(
    broker: BrokerServer, pki: Pki, tmp_path: Path, start_sidecar: SidecarFactory
) -> None:
    """From one address: 4 connections looping on the token path, 2,000 leaked idle connections,
    and an SDK fetching token + role + credentials every 200 ms. The SDK succeeds on >= 99% of
    its fetches with p99 <= 50 ms, the sidecar's descriptors stay within its budget, and another
    task's sidecar is untouched."""
    neighbour = await start_sidecar("acme", "t-neighbour")
    child = await start_sidecar_process(tmp_path, broker.url, pki, issue(pki, "t-pod", "acme"))
    pid = child.process.pid
    stop = asyncio.Event()
    loops: list[int] = []
    leaked: list[asyncio.StreamWriter] = []
    peak_fds = 0
    try:
        await wait_ready(child.ready["admin_url"])
        host, port = host_port(child.ready["imds_urls"][0])
        put = (
            b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
            b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n"
        )

        async def loop_on_tokens() -> None:
            while not stop.is_set():  # a looping client reconnects whenever it is cut off
                reader, writer = await asyncio.open_connection(host, port, local_addr=(POD, 0))
                with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                    while not stop.is_set():
                        writer.write(put)
                        head = await reader.readuntil(b"\r\n\r\n")
                        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                        await reader.readexactly(length)
                        loops.append(int(head.split(b" ", 2)[1]))
                writer.close()

        async def leak() -> None:
            for _ in range(2000):
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection(host, port, local_addr=(POD, 0))
                    leaked.append(writer)
                await asyncio.sleep(0.001)  # 2,000 over about the SDK's first half

        async def sample() -> None:
            nonlocal peak_fds
            while not stop.is_set():
                peak_fds = max(peak_fds, len(os.listdir(f"/proc/{pid}/fd")))
                await asyncio.sleep(0.05)

        cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
        flood = [asyncio.create_task(loop_on_tokens()) for _ in range(4)]
        background = [asyncio.create_task(leak()), asyncio.create_task(sample())]
        await asyncio.sleep(0.5)
        # Half its fetches while the leaks pile up, half with all 2,000 held (six seconds, not
        # the twenty this once took: with 30 fetches as with 100, its p99 is the slowest one).
        rc, out, err = await run_victim(host, port, seconds=6.0)
        async with victim_session() as session:
            neighbour_ok = [await imds_credentials(session, neighbour) for _ in range(5)]
        flood_cpu = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - wall_before)
        stop.set()
        await asyncio.gather(*flood, *background)
        assert rc == 0, err
        fetches = json.loads(out)
        successes = [elapsed for ok, elapsed in fetches if ok]
        success = len(successes) / len(fetches)
        latencies = sorted(elapsed for _, elapsed in fetches)
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(
            f"victim fetches {len(fetches)}, success {success:.3f}, p99 {p99 * 1000:.1f} ms; "
            f"looper answers {len(loops)} ({loops.count(200)} ok); leaked {len(leaked)}; "
            f"sidecar fds peak {peak_fds}; flood cpu {flood_cpu * 100:.0f}%"
        )
        budget = fd_budget(SidecarLimits().max_connections, SIDECAR_FD_RESERVE, soft_nofile(pid))
        assert success >= 0.99
        assert p99 <= 0.050
        assert peak_fds <= budget
        assert loops.count(503) > 0  # the looper was held to its share
        assert neighbour_ok == [200] * 5
    finally:
        stop.set()
        for writer in leaked:
            writer.close()
        await asyncio.to_thread(child.stop)
        log = (tmp_path / "sidecar.log").read_text()
        assert "Traceback" not in log, log[-2000:]


async def run_victim(host: str, port: int, *, seconds: float) -> tuple[int, str, str]:
    """The well-behaved SDK, in its own process as in a real pod, from the pod's address."""
    return await run_command(
        sys.executable, "-m", "metaproxy.testing.polite_sdk", host, str(port), str(seconds), POD,
        env=dict(os.environ), timeout=seconds + 30,
    )  # fmt: skip


@pytest.mark.parametrize("loopers", [1, 2, 4, 8])
@pytest.mark.parametrize(("rate", "burst"), [(2.0, 4.0), (10.0, 6.0), (50.0, 50.0)])
def test_loopers_spread_over_connections_never_starve_a_light_client(
    loopers: int, rate: float, burst: float
) -> None:
    """Loopers on several connections, each asking again as soon as its refusal's tarpit ends
    (4 times a second), at low and at default rates: an SDK asking once a second on a fresh
    connection is served every time, because a connection's share is judged on what it asks,
    not on what it got (a looper kept near its share by refusals used to slip under it and take
    the half of the bucket kept for others)."""
    clock = Clock()
    share = FairShare(clock)
    next_ask = dict.fromkeys(range(loopers), 0.0)
    light, served, asked = 10_000, 0, 0
    for step in range(60_000):  # 60 s in 1 ms steps
        clock.now = step / 1000
        for looper, when in next_ask.items():
            if clock.now >= when:
                refused = share.take(looper, rate, burst) > 0
                next_ask[looper] = clock.now + (0.25 if refused else 0.002)
        if step % 1000 == 500:
            light += 1
            asked += 1
            served += share.take(light, rate, burst) == 0.0
    assert served == asked
