"""Only an authenticated, audited lift takes a revocation away — never the store.

Against a real Valkey/Redis and real broker replicas: a store that loses its data (`FLUSHALL`)
lifts nothing; a forged `lift` on the store's channel lifts nothing; malformed or unsigned
values are skipped and reported; a lift a replica missed is still honoured, because it left a
signed tombstone; a failing re-read or listener never stops the rest.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.revocation import RevocationView
from metaproxy.broker.server import BrokerServer
from metaproxy.broker.store import open_store
from metaproxy.broker.store.base import (
    Lift,
    Revocation,
    RevocationEvent,
    RevocationSnapshot,
    RevocationStore,
)
from metaproxy.broker.store.redis_keys import (
    LIFTS_KEY,
    REVOCATION_CHANNEL,
    REVOCATIONS_KEY,
    revocation_field,
)
from metaproxy.broker.store.redis_store import RedisStore
from metaproxy.broker.store.sealing import Sealer
from metaproxy.clock import SystemClock
from metaproxy.testing.redis_server import RedisServer
from tests.conftest import record_broker_secrets
from tests.fleet_support import Fleet, ask, control, store_key_file
from tests.support import (
    ALERT_RULES,
    Pki,
    assert_promtool_passes,
    audit_records,
    expected_annotations,
    issue,
    require_promtool,
    scrape,
    value,
)

INTEGRITY = "metaproxy_broker_revocation_integrity_events_total"


@pytest.fixture
async def fleet(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path, redis_server: RedisServer
) -> AsyncIterator[Fleet]:
    fleet = Fleet(
        tmp_path, pki, sts_url, policies_dir, redis_server.url, on_stop=record_broker_secrets
    )
    yield fleet
    await fleet.stop_all()


async def redis_client(redis_server: RedisServer) -> RedisStore:
    store = open_store(
        redis_server.url,
        state_dir=None,
        timeout=1.0,
        budget_per_second=50.0,
        sealer=Sealer([b"x" * 32]),
    )
    assert isinstance(store, RedisStore)
    return store


async def raw(redis_server: RedisServer, *command: str) -> object:
    """One command on the store, as any of its clients (an operator, an attacker) sends it."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        # Any raw command is the point here; redis-py leaves execute_command unannotated.
        return await client.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def refuses(https: aiohttp.ClientSession, replica: BrokerServer, token: str) -> bool:
    return (await ask(https, replica, token))[0] == 403


async def test_a_store_that_loses_everything_lifts_nothing(
    fleet: Fleet, redis_server: RedisServer, https: aiohttp.ClientSession, pki: Pki, tmp_path: Path
) -> None:
    """After FLUSHALL every revocation stays in force on every replica, is written back to the
    store, and is reported: an audit record, the metric, and the alert (promtool on the real
    exposition)."""
    one, two = await fleet.start_replica(), await fleet.start_replica()
    replicas = (one, two)
    tokens = [issue(pki, task, "acme") for task in ("lost-1", "lost-2")]
    before = [await scrape(replica.admin_url) for replica in replicas]
    for task in ("lost-1", "lost-2"):
        status, _ = await control(https, one, "/v1/revocations", {"tenant": "acme", "task": task})
        assert status == 200
    assert await raw(redis_server, "FLUSHALL") in (b"OK", True, "OK")

    def restored_tasks() -> set[str]:
        records = [audit_records(r.config.audit_dir) for r in replicas]
        return {r["task"] for each in records for r in each if r["event"] == "restored"}

    # Replicas re-read the store every 0.5 s (later on a loaded machine): whichever does first
    # finds the loss, writes it back and reports it; the other then finds the set complete.
    deadline = time.monotonic() + 10
    while restored_tasks() != {"lost-1", "lost-2"} or (
        await raw(redis_server, "HLEN", REVOCATIONS_KEY) != 2  # written back
    ):
        assert time.monotonic() < deadline, "the lost revocations were not restored"
        await asyncio.sleep(0.05)
    for replica in replicas:
        for token in tokens:
            assert await refuses(https, replica, token)
    after = [await scrape(replica.admin_url) for replica in replicas]
    counts = [value(samples, INTEGRITY, event="restored") for samples in after]
    grew = sum(counts) - sum(value(samples, INTEGRITY, event="restored") for samples in before)
    assert grew >= 2
    assert_alert_fires(tmp_path, "restored", max(counts))


def assert_alert_fires(tmp_path: Path, event: str, scraped: float) -> None:
    """promtool, fed the counter as the broker exposed it, fires MetaproxyRevocationIntegrity."""
    promtool, rules = require_promtool(), ALERT_RULES
    labels = {"pod": "broker-0", "event": event}
    annotations = expected_annotations("MetaproxyRevocationIntegrity", labels)
    series = f'{INTEGRITY}{{pod="broker-0",event="{event}"}}'
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": series, "values": f"0 0 {scraped:g} {scraped:g}"}],
                "alert_rule_test": [
                    {
                        "eval_time": "3m",
                        "alertname": "MetaproxyRevocationIntegrity",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "page",
                                    "pod": "broker-0",
                                    "event": event,
                                },
                                "exp_annotations": annotations,
                            }
                        ],
                    }
                ],
            }
        ],
    }
    assert_promtool_passes(promtool, tmp_path / "integrity_test.yaml", test)


@pytest.mark.parametrize(
    "message",
    [
        {"action": "lift", "revocation": {"tenant": "acme", "task": "forged", "at": "x"}},
        {"action": "lift", "record": {"tenant": "acme", "task": "forged", "at": "9", "by": ""}},
        {
            "action": "lift",
            "record": {"tenant": "acme", "task": "forged", "at": "9", "by": ""},
            "sig": "0" * 64,
        },
        "not json at all",
    ],
    ids=["old-format", "unsigned", "bad-signature", "garbage"],
)
async def test_a_forged_lift_on_the_channel_lifts_nothing(
    fleet: Fleet,
    redis_server: RedisServer,
    https: aiohttp.ClientSession,
    pki: Pki,
    message: object,
) -> None:
    """Any client of the store can PUBLISH: a lift the fleet did not sign is refused, counted,
    and the revocation stays in force on every replica."""
    one, two = await fleet.start_replica(), await fleet.start_replica()
    token = issue(pki, "forged", "acme")
    status, _ = await control(https, one, "/v1/revocations", {"tenant": "acme", "task": "forged"})
    assert status == 200
    rejected_before = two.revocations.rejected
    text = message if isinstance(message, str) else json.dumps(message)
    await raw(redis_server, "PUBLISH", REVOCATION_CHANNEL, text)
    await asyncio.sleep(0.3)
    for replica in (one, two):
        assert await refuses(https, replica, token)
    assert two.revocations.rejected > rejected_before
    # The push channel still works: a real lift reaches the other replica.
    status, _ = await control(
        https, one, "/v1/revocations/lift", {"tenant": "acme", "task": "forged"}
    )
    assert status == 200
    await asyncio.sleep(0.3)
    assert (await ask(https, two, token))[0] == 200


async def test_planted_and_malformed_values_are_skipped_and_reported(
    redis_server: RedisServer,
) -> None:
    """Values in the store that are malformed or unsigned are skipped, counted and reported;
    the signed ones are read, and the view stays fresh."""
    writer = await redis_client(redis_server)
    await writer.revocations.add(Revocation("acme", "real", "2026-12-05T00:00:00Z", "op"))
    planted = json.dumps({"tenant": "acme", "task": "planted", "at": "1", "by": "x", "sig": "00"})
    await raw(redis_server, "HSET", REVOCATIONS_KEY, revocation_field("acme", "planted"), planted)
    await raw(redis_server, "HSET", REVOCATIONS_KEY, revocation_field("acme", "broken"), "{bad")
    await raw(redis_server, "HSET", LIFTS_KEY, revocation_field("acme", "real"), '{"tenant": "a"}')
    snapshot = await writer.revocations.snapshot()
    assert [(e.tenant, e.task) for e in snapshot.revocations] == [("acme", "real")]
    assert snapshot.rejected == 3
    view = RevocationView(
        writer.revocations,
        SystemClock(),
        max_staleness=10,
        resync_seconds=10,
    )
    await view.resync()
    assert view.check("acme", "real") and not view.check("acme", "planted")
    assert view.problem() == ""
    await writer.aclose()


async def test_a_lift_a_replica_missed_is_honoured_and_a_lost_one_written_back(
    redis_server: RedisServer,
) -> None:
    """A replica that missed a lift's push drops the revocation at its next re-read (the lift's
    signed tombstone covers it); one that went missing without a lift is kept and written back."""
    operator = await redis_client(redis_server)
    deaf = await redis_client(redis_server)  # never started: it hears no push at all
    written_back: list[Revocation] = []

    async def restore(lost: list[Revocation]) -> None:
        written_back.extend(lost)
        for entry in lost:
            await deaf.revocations.add(entry)

    view = RevocationView(
        deaf.revocations,
        SystemClock(),
        max_staleness=10,
        resync_seconds=10,
    )
    view.when_lost(restore)
    lifted = Revocation("acme", "lifted", "2026-12-05T10:00:00Z", "op")
    lost = Revocation("acme", "lost", "2026-12-05T10:00:00Z", "op")
    for entry in (lifted, lost):
        await operator.revocations.add(entry)
    await view.resync()
    assert view.check("acme", "lifted") and view.check("acme", "lost")
    assert await operator.revocations.remove(Lift("acme", "lifted", "2026-12-05T10:05:00Z", "op"))
    await raw(redis_server, "HDEL", REVOCATIONS_KEY, revocation_field("acme", "lost"))  # no lift
    await view.resync()
    assert not view.check("acme", "lifted")
    assert view.check("acme", "lost")
    assert written_back == [lost] and view.restored == 1
    assert [e.task for e in (await operator.revocations.snapshot()).revocations] == ["lost"]
    await operator.aclose()
    await deaf.aclose()


async def test_a_lift_never_takes_away_a_later_revocation(redis_server: RedisServer) -> None:
    """A lift's push that arrives after the task was revoked again leaves the new revocation."""
    store = await redis_client(redis_server)
    view = RevocationView(
        store.revocations,
        SystemClock(),
        max_staleness=10,
        resync_seconds=10,
    )
    again = Revocation("acme", "twice", "2026-12-05T11:00:00Z", "op")
    view.apply(RevocationEvent("revoke", again))
    stale_lift = Lift("acme", "twice", "2026-12-05T10:30:00Z", "op")
    view.apply(RevocationEvent("lift", Revocation("acme", "twice", stale_lift.at), stale_lift))
    assert view.check("acme", "twice")
    await store.aclose()


class _BrokenStore:
    """A revocation store whose re-read fails with an unexpected error (a bug's stand-in)."""

    rejected = 0

    def __init__(self) -> None:
        self.fail = False

    async def add(self, revocation: Revocation) -> None:
        raise AssertionError("not used")

    async def remove(self, lift: Lift) -> Revocation | None:
        raise AssertionError("not used")

    async def snapshot(self) -> RevocationSnapshot:
        if self.fail:
            raise RuntimeError("a value this code could not handle")
        return RevocationSnapshot([Revocation("acme", "t", "2026-12-05T00:00:00Z")], {})

    def subscribe(self, listener: object) -> None:
        return None


async def test_an_unexpected_error_is_counted_shown_and_survived() -> None:
    """A re-read that raises anything is caught and counted; the loop goes on, the revocations
    it held stay, and once the view is too old `problem()` (what /readyz shows) says why."""
    store = _BrokenStore()
    typed: RevocationStore = store
    view = RevocationView(
        typed,
        SystemClock(),
        max_staleness=0.3,
        resync_seconds=0.05,
    )
    await view.start()
    assert view.check("acme", "t")
    store.fail = True
    await asyncio.sleep(0.5)
    assert view.errors >= 2
    assert view.check("acme", "t")  # still refused
    assert "RuntimeError" in view.problem()
    store.fail = False
    await asyncio.sleep(0.2)
    assert view.problem() == ""
    await view.aclose()


async def test_a_failing_listener_does_not_silence_the_push(
    redis_server: RedisServer,
) -> None:
    """One listener that raises is counted and logged; the others still get every change."""
    store = await redis_client(redis_server)
    await store.start()
    seen: list[str] = []

    def broken(_event: RevocationEvent) -> None:
        raise RuntimeError("listener bug")

    store.revocations.subscribe(broken)
    store.revocations.subscribe(lambda event: seen.append(event.revocation.task))
    for task in ("p1", "p2"):
        await store.revocations.add(Revocation("acme", task, "2026-12-05T00:00:00Z", "op"))
    for _ in range(50):
        if seen == ["p1", "p2"]:
            break
        await asyncio.sleep(0.02)
    assert seen == ["p1", "p2"]
    assert store.revocations.listener_errors == 2
    await store.aclose()


def test_the_store_key_file_signs_what_the_fleet_shares(tmp_path: Path) -> None:
    """Two replicas reading one key file sign alike; a replica with another key refuses them."""
    key = store_key_file(tmp_path)
    ours = Sealer.from_file(key).derive("revocations")
    assert ours == Sealer.from_file(key).derive("revocations")
    assert ours != Sealer([b"y" * 32]).derive("revocations")
    assert ours[0] not in key.read_bytes()
