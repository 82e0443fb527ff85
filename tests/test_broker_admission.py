"""Fair turns before token verification: a tenant's request starts within a few event-loop
turns however many another tenant has waiting; the unverified claim only picks the lane."""

from __future__ import annotations

import asyncio
import base64
import json

from metaproxy.broker.admission import UNKNOWN_LANE, FairAdmission, lane_for
from tests.support import Pki, issue


def unsigned(claims: object) -> str:
    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'EdDSA'})}.{part(claims)}.c2ln"


def test_lane_is_the_claimed_tenant_or_namespace(pki: Pki) -> None:
    assert lane_for(issue(pki, "task-1", "acme")) == "acme"
    assert lane_for(unsigned({"kubernetes.io": {"namespace": "payments"}})) == "payments"
    for garbage in (
        None,
        "",
        "a.b",
        "a.b.c",
        unsigned([1, 2]),
        unsigned({"tenant": 7}),
        "x" * 9000,
    ):
        assert lane_for(garbage) == UNKNOWN_LANE
    assert len(lane_for(unsigned({"tenant": "t" * 500}))) == 64


async def test_a_small_tenant_starts_ahead_of_a_big_tenants_backlog() -> None:
    admission = FairAdmission(per_turn=4)
    started: list[str] = []

    async def request(lane: str) -> None:
        await admission.wait_turn(lane)
        started.append(lane)

    # 200 of the big tenant's requests arrive in one loop turn, then one of a small tenant's.
    tasks = [asyncio.ensure_future(request("big")) for _ in range(200)]
    tasks.append(asyncio.ensure_future(request("small")))
    await asyncio.gather(*tasks)
    assert len(started) == 201
    # 4 go straight through; after that, turns alternate between the two lanes.
    assert started.index("small") <= 4 + 1
    assert admission.waited == 201 - 4


async def test_requests_that_went_away_while_waiting_do_not_use_a_turn() -> None:
    admission = FairAdmission(per_turn=1)
    await admission.wait_turn("a")  # takes this loop turn's only turn
    gone = asyncio.ensure_future(admission.wait_turn("a"))
    kept = asyncio.ensure_future(admission.wait_turn("b"))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.wait_for(kept, timeout=1.0)
    assert admission.stats().waiting == 0
