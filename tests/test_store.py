"""The store seam's parts on their own: sealing, store URLs, the in-memory store's durable
revocations, and the Valkey/Redis store against a real server (budget, limits, fallback), on a
single server, over TLS, behind Sentinel, and on a Cluster."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from metaproxy.broker.credentials.caller import StsCaller
from metaproxy.broker.credentials.circuit import CircuitBreaker
from metaproxy.broker.credentials.fixed_pool import FixedPoolScheduler
from metaproxy.broker.credentials.fleet import FleetCache
from metaproxy.broker.credentials.source import Fetch
from metaproxy.broker.credentials.sts import AsyncSts
from metaproxy.broker.store import open_store
from metaproxy.broker.store.base import (
    CacheClaim,
    CacheLook,
    Lift,
    Revocation,
    StoreUnavailable,
)
from metaproxy.broker.store.memory import MemoryStore
from metaproxy.broker.store.redis_admissions import RELEASE_AFTER_SECONDS
from metaproxy.broker.store.redis_conn import parse_store_url
from metaproxy.broker.store.redis_keys import tenant_key
from metaproxy.broker.store.redis_store import RedisStore
from metaproxy.broker.store.sealing import SealedValueInvalid, Sealer, generate_key_line
from metaproxy.clock import SystemClock
from metaproxy.commands.certs import init_certs
from metaproxy.errors import ConfigError
from metaproxy.models import AssumeRoleSpec, BrokerLimits
from metaproxy.testing.redis_server import RedisServer, free_port
from tests.conftest import require_redis_server

FLEET_KEY = Sealer([b"fleet-key-for-the-store-tests-32"])  # seals and signs, as --store-key-file


def key_file(tmp: Path, *lines: str) -> Path:
    path = tmp / "store.key"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sealed_values_open_after_a_key_rotation(tmp_path: Path) -> None:
    """The first key seals, every key opens: values sealed before a rotation still open."""
    old, new = generate_key_line(), generate_key_line()
    before = Sealer.from_file(key_file(tmp_path, old))
    sealed = before.seal(b"secret set", bound_to="k1")
    after = Sealer.from_file(key_file(tmp_path, "# rotated", new, old))
    assert after.open(sealed, bound_to="k1") == b"secret set"
    assert b"secret set" not in sealed
    resealed = after.seal(b"secret set", bound_to="k1")
    with pytest.raises(SealedValueInvalid):
        before.open(resealed, bound_to="k1")  # a replica without the new key cannot open it


def test_a_sealed_value_is_bound_to_its_key_and_to_its_bytes(tmp_path: Path) -> None:
    """Moved to another store key, or with one byte changed, a value does not open."""
    sealer = Sealer.from_file(key_file(tmp_path, generate_key_line()))
    sealed = sealer.seal(b"value", bound_to="k1")
    with pytest.raises(SealedValueInvalid):
        sealer.open(sealed, bound_to="k2")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealedValueInvalid):
        sealer.open(tampered, bound_to="k1")
    with pytest.raises(SealedValueInvalid):
        sealer.open(b"\x01short", bound_to="k1")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ((), "holds no key"),
        (("not base64 !",), "store.key:1: store key is not base64"),
        (("# c", base64.b64encode(b"short").decode()), "store.key:2: store key is 5 bytes"),
    ],
)
def test_a_bad_key_file_is_refused_naming_the_file_and_line(
    tmp_path: Path, lines: tuple[str, ...], message: str
) -> None:
    """Every problem with --store-key-file is one ConfigError naming file and line."""
    with pytest.raises(ConfigError, match=message):
        Sealer.from_file(key_file(tmp_path, *lines))
    with pytest.raises(ConfigError, match="cannot read"):
        Sealer.from_file(tmp_path / "missing.key")


@pytest.mark.parametrize(
    ("url", "topology", "tls", "hosts", "service", "db"),
    [
        ("redis://127.0.0.1:6379/2", "single", False, [("127.0.0.1", 6379)], "", 2),
        ("rediss://user:pw@cache.example:6380", "single", True, [("cache.example", 6380)], "", 0),
        (
            "redis+sentinel://:pw@s1:26379,s2:26380/mymaster/1",
            "sentinel",
            False,
            [("s1", 26379), ("s2", 26380)],
            "mymaster",
            1,
        ),
        ("redis+cluster://n1:7000,n2:7001", "cluster", False, [("n1", 7000), ("n2", 7001)], "", 0),
    ],
)
def test_store_urls_name_their_topology(
    url: str, topology: str, tls: bool, hosts: list[tuple[str, int]], service: str, db: int
) -> None:
    """Single server, Sentinel and Cluster URLs, with TLS and credentials."""
    parsed = parse_store_url(url)
    assert (parsed.topology, parsed.tls, list(parsed.hosts), parsed.service, parsed.db) == (
        topology,
        tls,
        hosts,
        service,
        db,
    )
    assert "pw" not in parsed.redacted()


@pytest.mark.parametrize(
    "url",
    [
        "memcached://user:secret@x:1",
        "redis://",
        "redis://host:99999",
        "redis://a:1,b:2",
        "redis+sentinel://s1:26379",
        "redis://host:1/notadb",
    ],
)
def test_bad_store_urls_are_one_config_error(url: str) -> None:
    """A store URL that cannot work is refused at start, naming the flag, never its password."""
    with pytest.raises(ConfigError, match=r"^store: ") as raised:
        open_store(url, state_dir=None, timeout=0.5, budget_per_second=50.0, sealer=FLEET_KEY)
    assert "secret" not in str(raised.value)


async def test_memory_revocations_persist_across_a_restart(tmp_path: Path) -> None:
    """In memory mode revocations are written (fsync, rename) under --state-dir and read back."""
    store = MemoryStore(tmp_path / "state")
    await store.start()
    await store.revocations.add(Revocation("acme", "t1", "2026-01-01T00:00:00Z", "op"))
    await store.revocations.add(Revocation("globex", "", "2026-01-01T00:00:01Z", "op"))
    assert await store.revocations.remove(Lift("globex", "", "2026-01-01T00:00:02Z")) is not None
    again = MemoryStore(tmp_path / "state")
    await again.start()
    assert (await again.revocations.snapshot()).revocations == [
        Revocation("acme", "t1", "2026-01-01T00:00:00Z", "op")
    ]
    assert not list((tmp_path / "state").glob("*.tmp"))

    (tmp_path / "state" / "revocations.json").write_text("{damaged")
    with pytest.raises(ConfigError, match=r"revocations\.json is unreadable"):
        await MemoryStore(tmp_path / "state").start()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


async def started(url: str, budget: float = 50.0, *, answering: bool = True) -> RedisStore:
    """A started store that has answered (unless not `answering` is expected). On a loaded
    machine the first ping can miss its 0.5 s timeout; the store then rightly starts down and
    admits locally, which is not what these tests are about (test_fleet shows it), so the ping
    is tried again, for up to 10 s."""
    store = open_store(url, state_dir=None, timeout=0.5, budget_per_second=budget, sealer=FLEET_KEY)
    assert isinstance(store, RedisStore)
    await store.start()
    deadline = time.monotonic() + 10.0
    while answering and not store.up and time.monotonic() < deadline:
        with contextlib.suppress(StoreUnavailable):
            await store._conn.run(store._conn.client.ping, probe=True)
    assert store.up or not answering, f"the store at {url} never answered"
    return store


@contextlib.asynccontextmanager
async def running(
    url: str, budget: float = 50.0, *, answering: bool = True
) -> AsyncIterator[RedisStore]:
    """A started store, closed when the block ends."""
    store = await started(url, budget, answering=answering)
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two replicas' stores on one server, closed after the test."""
    one, two = await started(redis_server.url), await started(redis_server.url)
    yield one, two
    await one.aclose()
    await two.aclose()


@pytest.mark.serial  # asserts when each slot comes, to within 0.2 s
async def test_the_budget_is_one_timeline_for_every_replica(
    replicas: tuple[RedisStore, RedisStore],
) -> None:
    """Two replicas taking budget at once get slots spaced for one 50/s budget."""
    one, two = replicas
    budgets = [one.budget, two.budget]
    loop = asyncio.get_running_loop()
    begin = loop.time()
    times: list[float] = []

    async def take(index: int) -> None:
        await budgets[index % 2].acquire()
        times.append(loop.time() - begin)

    await asyncio.gather(*(take(i) for i in range(40)))
    # 40 calls at 47/s (50 less the margin), one burst of 1 allowed: about 0.85 s.
    assert 0.7 <= max(times) <= 1.2
    window = [t for t in times if t < 0.5]
    assert len(window) <= 0.5 * 50 + 2


async def test_without_the_store_a_replica_takes_its_share_of_the_budget(
    redis_server: RedisServer, replicas: tuple[RedisStore, RedisStore]
) -> None:
    """The store gone, the budget falls back to budget ÷ the live replicas last seen."""
    one, _ = replicas
    two = await started(redis_server.url, budget=40.0)
    await one.replicas.heartbeat("r1", 10)
    assert await two.replicas.heartbeat("r2", 10) == ["r1", "r2"]
    budget = two.budget
    redis_server.stop()
    loop = asyncio.get_running_loop()
    begin = loop.time()
    for _ in range(12):
        await budget.acquire()
    elapsed = loop.time() - begin
    # 20/s (40 ÷ 2) less the margin: 12 calls take about half a second; at 40/s, a quarter.
    assert elapsed >= 0.45
    assert budget.stats().fallback
    assert budget.stats().share_per_second == 20.0
    await two.aclose()


async def test_tenant_rate_and_in_flight_cap_hold_across_replicas(
    replicas: tuple[RedisStore, RedisStore],
) -> None:
    """A tenant's burst and in-flight cap are the fleet's, whichever replica is asked."""
    one, two = replicas
    limits = BrokerLimits(
        requests_per_second=1,
        burst=4,
        per_identity_rps=100,
        per_identity_burst=100,
        max_in_flight=3,
    )
    admitted = []
    for i in range(8):
        store = (one, two)[i % 2]
        admitted.append(await store.admissions.enter("acme", f"id-{i}", limits))
    # Burst 4, but only 3 may be in flight at once: the 4th is refused for the cap.
    assert [a.admitted for a in admitted[:3]] == [True, True, True]
    assert admitted[3].reason == "in-flight"
    await one.admissions.leave("acme", admitted[0].ticket)
    await one.admissions.aclose()  # the slot goes back in the background: wait for it
    fourth = await two.admissions.enter("acme", "id-x", limits)
    assert fourth.admitted
    refused = await one.admissions.enter("acme", "id-y", limits)
    assert (refused.admitted, refused.reason) == (False, "tenant-rate")
    assert refused.retry_after >= 1
    other = await one.admissions.enter("globex", "id-1", limits)
    assert other.admitted  # another tenant has its own buckets


async def test_an_admitted_cold_request_gets_the_cache_answer_in_the_same_round_trip(
    redis_server: RedisServer, replicas: tuple[RedisStore, RedisStore]
) -> None:
    """On one server a claim rides with the admission: one script, the lease taken only for an
    admitted request, and a refused request leaves the cache untouched."""
    one, two = replicas
    slow = BrokerLimits(requests_per_second=1, burst=1, per_identity_rps=1, per_identity_burst=1)
    # The first use of a script loads it (NOSCRIPT, SCRIPT LOAD, EVALSHA); count after.
    await one.admissions.enter("initech", "id-0", slow, CacheClaim("warm-up", "r1", 5))
    calls_before = command_calls(redis_server, "evalsha")
    first = await one.admissions.enter("acme", "id-1", slow, CacheClaim("cold", "r1", 5))
    assert command_calls(redis_server, "evalsha") - calls_before == 1
    assert (first.admitted, first.ticket.look) == (True, CacheLook(None, True))
    other = await two.admissions.enter("globex", "id-2", slow, CacheClaim("cold", "r2", 5))
    assert (other.admitted, other.ticket.look) == (True, CacheLook(None, False))

    refused = await two.admissions.enter("acme", "id-3", slow, CacheClaim("untouched", "r2", 5))
    assert (refused.admitted, refused.reason, refused.ticket.look) == (False, "tenant-rate", None)
    assert await one.cache.get_or_claim("untouched", "r1", 5) == CacheLook(None, True)


# Serial: a given slot is spent only within LATE_SLOT_SECONDS (30 ms) of its admission, which a
# loaded machine can miss between two awaits (then the caller rightly asks the store).
@pytest.mark.serial
async def test_a_cold_admission_takes_a_free_budget_slot_along_and_never_one_ahead(
    redis_server: RedisServer,
) -> None:
    """A claim that leads to an STS call takes the budget's slot in the same script when one
    is free now, and its ticket carries it to the STS caller, which then sends without asking
    the store. Once the budget's timeline is ahead (a burst), no slot is taken: the scheduler
    asks for one in its fair order."""
    # 4/s: a slot every ~0.27 s (after the margin) and a burst of one, so the three admissions
    # below fall inside one slot's time however slow the machine.
    async with running(redis_server.url, budget=4.0) as store:
        # Built first: a slot not spent within LATE_SLOT_SECONDS of its admission goes unused.
        caller = StsCaller(
            AsyncSts(endpoint="http://127.0.0.1:9"),  # never called here
            budget_per_second=4.0,
            breaker=lambda: CircuitBreaker(SystemClock()),
            clock=SystemClock(),
            budget=store.budget,
        )
        limits = BrokerLimits()
        await store.admissions.enter("initech", "id-0", limits)  # loads the scripts
        tickets = []
        for n in range(3):
            admission = await store.admissions.enter(
                "acme", f"id-{n}", limits, CacheClaim(f"cold-{n}", "r1", 5)
            )
            assert admission.ticket.look == CacheLook(None, True)
            tickets.append(admission.ticket)
        assert [t.budget_due is not None for t in tickets] == [True, True, False]
        for ticket in tickets:
            if ticket.budget_due is not None:
                caller.give_slot(ticket.budget_due)
        calls_before = command_calls(redis_server, "evalsha")
        await caller.take_budget()
        await caller.take_budget()
        assert command_calls(redis_server, "evalsha") == calls_before  # the two given slots
        assert caller.stats().given_slots == 2
        await caller.take_budget()  # no slot came with the third: it asks the store
        assert command_calls(redis_server, "evalsha") > calls_before
        assert caller.stats().given_slots == 2


async def test_ended_requests_give_their_slots_back_with_the_next_admission(
    redis_server: RedisServer, replicas: tuple[RedisStore, RedisStore]
) -> None:
    """A slot given back rides with the tenant's next admission (no command of its own); with
    no next admission it goes back on its own within RELEASE_AFTER_SECONDS."""
    one, two = replicas
    capped = BrokerLimits(max_in_flight=1)
    first = await one.admissions.enter("acme", "id", capped)
    assert not (await two.admissions.enter("acme", "id", capped)).admitted  # the cap is 1
    await one.admissions.leave("acme", first.ticket)
    assert in_flight(redis_server, "acme") == 1  # not given back on its own (yet)
    second = await one.admissions.enter("acme", "id", capped)
    assert second.admitted  # the slot went back inside this admission's script
    assert in_flight(redis_server, "acme") == 1

    await one.admissions.leave("acme", second.ticket)
    await asyncio.sleep(RELEASE_AFTER_SECONDS + 0.2)
    assert in_flight(redis_server, "acme") == 0
    assert (await two.admissions.enter("acme", "id", capped)).admitted


def in_flight(server: RedisServer, tenant: str) -> int:
    """The tenant's in-flight slots in the store, read without yielding to the event loop."""
    import redis

    with redis.Redis.from_url(server.url) as client:
        return int(client.zcard(tenant_key(tenant, "in-flight")))


async def test_a_lease_an_admission_took_and_the_request_will_not_use_goes_back_at_once(
    replicas: tuple[RedisStore, RedisStore], tmp_path: Path
) -> None:
    """A request refused after its admission took the lease (a revocation that arrived
    meanwhile) lets it go: another replica takes it without waiting out LEASE_SECONDS."""
    one, two = replicas
    sealer = Sealer.from_file(key_file(tmp_path, generate_key_line()))
    sts = FixedPoolScheduler(AsyncSts(endpoint="http://127.0.0.1:9"))  # not called
    fleet = FleetCache(sts, one.cache, sealer, SystemClock(), holder="r1", refresh_fraction=0.5)
    spec = AssumeRoleSpec("arn:aws:iam::111111111111:role/app", "acme.t1", "acme", 3600)
    fetch = Fetch(spec, "acme", "t1")
    claim = fleet.claim(fetch)
    admission = await one.admissions.enter("acme", "id", BrokerLimits(), claim)
    assert admission.ticket.look == CacheLook(None, True)
    assert not (await two.cache.get_or_claim(claim.key, "r2", 5)).holding
    fleet.release(replace(fetch, ticket=admission.ticket))
    await fleet.aclose()  # the release has reached the store
    assert (await two.cache.get_or_claim(claim.key, "r2", 5)).holding


async def test_a_lease_release_is_published_only_when_a_replica_waits(
    redis_server: RedisServer, replicas: tuple[RedisStore, RedisStore]
) -> None:
    """A fill nobody waits for wakes no replica; a waiter is woken by the holder's fill."""
    one, two = replicas
    publishes = command_calls(redis_server, "publish")
    assert (await one.cache.get_or_claim("alone", "r1", 5)).holding
    await one.cache.fill("alone", "r1", b"sealed", 60, ["acme\x00"])
    assert command_calls(redis_server, "publish") == publishes

    assert (await one.cache.get_or_claim("shared", "r1", 5)).holding
    assert not (await two.cache.get_or_claim("shared", "r2", 5)).holding
    waiter = asyncio.create_task(two.cache.wait("shared", seconds=5, after=two.cache.releases.seen))
    await asyncio.sleep(0.05)
    begin = time.monotonic()
    await one.cache.fill("shared", "r1", b"sealed", 60, ["acme\x00"])
    await waiter
    assert time.monotonic() - begin < 1  # woken by the push, not by its 5 s timeout
    assert command_calls(redis_server, "publish") == publishes + 1
    look = await two.cache.get_or_claim("shared", "r2", 5)
    assert (look.value, look.holding) == (b"sealed", False)


async def test_a_release_pushed_before_the_wait_began_is_not_waited_out(
    replicas: tuple[RedisStore, RedisStore],
) -> None:
    """The push of a release can be read before the reply to the look that saw the lease held
    (two connections), or come while an admission's look waits in the queue: the wait after
    that look returns at once instead of sitting out the lease."""
    one, two = replicas
    assert (await one.cache.get_or_claim("raced", "r1", 5)).holding
    look = await two.cache.get_or_claim("raced", "r2", 5)
    assert not look.holding
    await one.cache.fill("raced", "r1", b"sealed", 60, ["acme\x00"])
    deadline = time.monotonic() + 5
    while not two.cache.releases.since("raced", look.releases_seen):  # the push arrives
        assert time.monotonic() < deadline, "the release was never pushed"
        await asyncio.sleep(0.01)
    begin = time.monotonic()
    await two.cache.wait("raced", seconds=5, after=look.releases_seen)
    assert time.monotonic() - begin < 1  # not the 5 s lease
    later = await two.cache.get_or_claim("raced", "r2", 5)
    waiter = asyncio.create_task(two.cache.wait("raced", seconds=0.3, after=later.releases_seen))
    await asyncio.sleep(0.1)
    assert not waiter.done()  # a release before the look does not end a later wait
    await waiter


def command_calls(server: RedisServer, command: str) -> int:
    """How many times the server has run `command` (its command statistics)."""
    import redis

    with redis.Redis.from_url(server.url) as client:
        stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_store_that_is_down_fails_fast(redis_server: RedisServer) -> None:
    """Once a command failed, the next ones fail at once instead of each waiting to connect."""
    async with running(redis_server.url) as store:
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await store.cache.get_or_claim("k", "me", 5)
        begin = time.monotonic()
        for _ in range(100):
            with pytest.raises(StoreUnavailable):
                await store.cache.get_or_claim("k", "me", 5)
        assert time.monotonic() - begin < 0.5


async def exercise(store: RedisStore) -> None:
    """Every part once: a revocation pushed and read back, a limit, a lease, a cached value."""
    heard: list[str] = []
    store.revocations.subscribe(lambda event: heard.append(event.action))
    entry = Revocation("acme", "t1", "2026-01-01T00:00:00Z", "test")
    await store.revocations.add(entry)
    assert entry in (await store.revocations.snapshot()).revocations
    admission = await store.admissions.enter("acme", "id", BrokerLimits())
    assert admission.admitted
    await store.admissions.leave("acme", admission.ticket)
    assert await store.cache.get_or_claim("k1", "me", 5) == CacheLook(None, True)
    assert await store.cache.get_or_claim("k1", "you", 5) == CacheLook(None, False)
    await store.cache.fill("k1", "me", b"sealed", 60, ["acme\x00", "acme\x00t1"])
    assert await store.cache.get_or_claim("k1", "you", 5) == CacheLook(b"sealed", False)
    assert await store.cache.get_or_claim("k1", "you", 5, claim_if_present=True) == CacheLook(
        b"sealed", True
    )
    await store.cache.fill("k1", "you", None, 0, [])
    assert await store.cache.drop_owner("acme\x00t1") == 1
    assert await store.cache.get_or_claim("k1", "me", 5) == CacheLook(None, True)
    # A claim sent with an admission is answered (in one script, or one after the other on a
    # Cluster) exactly as get_or_claim would answer it.
    with_claim = await store.admissions.enter(
        "acme", "id", BrokerLimits(), CacheClaim("k1", "you", 5)
    )
    assert with_claim.admitted
    assert with_claim.ticket.look in (None, CacheLook(None, False))
    await store.admissions.leave("acme", with_claim.ticket)
    for _ in range(50):
        if heard:
            break
        await asyncio.sleep(0.05)
    assert heard == ["revoke"]


@pytest.fixture
def tls_store_url(tmp_path: Path) -> Iterator[str]:
    """A Valkey/Redis that answers TLS on a second port (certificate from our CA), with a
    password: `rediss://` naming the CA bundle in `ssl_ca_certs`, as a managed store is reached."""
    paths = init_certs(tmp_path / "tls")
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "redis-tls",
        binary=require_redis_server(),
        password="tls-test-password",
        extra_config=(
            f"tls-port {tls_port}",
            f"tls-cert-file {paths['broker.pem']}",
            f"tls-key-file {paths['broker.key']}",
            "tls-auth-clients no",
        ),
    )
    server.start()
    yield f"rediss://:tls-test-password@127.0.0.1:{tls_port}/0?ssl_ca_certs={paths['ca.pem']}"
    server.stop()


async def test_the_store_works_over_tls(tls_store_url: str) -> None:
    """rediss:// with the CA in the URL: every part works over TLS, pushes included; without
    our CA the server's certificate is refused (StoreUnavailable), never read in the clear."""
    async with running(tls_store_url) as store:
        await exercise(store)
    async with running(
        tls_store_url.partition("?")[0], answering=False
    ) as untrusting:  # the system's CAs
        with pytest.raises(StoreUnavailable):
            await untrusting.cache.get_or_claim("k", "me", 5)


@pytest.fixture
def sentinel_url(tmp_path: Path, redis_server: RedisServer) -> Iterator[str]:
    """A Sentinel watching the redis_server as primary `mp`."""
    sentinel = RedisServer(
        tmp_path / "sentinel",
        binary=require_redis_server(),
        sentinel=True,
        extra_config=(
            f"sentinel monitor mp 127.0.0.1 {redis_server.port} 1",
            "sentinel down-after-milliseconds mp 1000",
        ),
    )
    sentinel.start()
    yield f"redis+sentinel://127.0.0.1:{sentinel.port}/mp"
    sentinel.stop()


async def test_the_store_works_through_sentinel(sentinel_url: str) -> None:
    """redis+sentinel:// finds the primary through Sentinel and every part works on it."""
    async with running(sentinel_url) as store:
        await exercise(store)


@pytest.fixture
def cluster_url(tmp_path: Path) -> Iterator[str]:
    """Three primaries in Cluster mode, slots assigned by redis-cli."""
    binary = require_redis_server()
    nodes = [
        RedisServer(
            tmp_path / f"node-{i}",
            binary=binary,
            port=free_port(),
            extra_config=(
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                # The bus port defaults to port + 10000, past 65535 for a high free port.
                f"cluster-port {free_port()}",
            ),
        )
        for i in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        created = subprocess.run(
            [
                str(Path(binary).with_name("redis-cli")),
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in nodes),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        time.sleep(1.0)  # the nodes agree on the slot map
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes)
    finally:
        for node in nodes:
            node.stop()


async def test_the_store_works_on_a_cluster(cluster_url: str) -> None:
    """redis+cluster://: scripts stay in one slot, pushes reach every node's subscribers."""
    async with running(cluster_url, budget=100.0) as store:
        await exercise(store)
        budget = store.budget
        await budget.acquire()
        assert not budget.stats().fallback
