"""A pod whose 169.254.169.254 is not its own sidecar never becomes ready.

In link-local mode the apps rely on the pod's namespace sending the metadata address to the
sidecar; on a node without metaproxy's CNI plugin it would be the node's IMDS. The sidecar only
turns ready once a token fetched from that address is one it signed itself.
"""

from __future__ import annotations

import asyncio

import aiohttp

from metaproxy.sidecar.link_local import LinkLocalCheck
from tests.conftest import SidecarFactory


async def test_the_address_answering_with_our_tokens_passes(start_sidecar: SidecarFactory) -> None:
    """Pointed at this sidecar's own IMDS listener, the check finds nothing wrong."""
    sidecar = await start_sidecar("acme", "ll-ours")
    check = LinkLocalCheck(sidecar.state.tokens, sidecar.imds_url.removeprefix("http://"))
    try:
        assert await check.check() == ""
    finally:
        await check.aclose()


async def test_another_sidecar_at_the_address_fails(start_sidecar: SidecarFactory) -> None:
    """Another IMDS at the address (another pod's, the node's) answers with tokens this sidecar
    did not sign: not ready, and the line says so."""
    ours = await start_sidecar("acme", "ll-a")
    theirs = await start_sidecar("acme", "ll-b")
    check = LinkLocalCheck(ours.state.tokens, theirs.imds_url.removeprefix("http://"))
    try:
        assert "not with this sidecar's tokens" in await check.check()
    finally:
        await check.aclose()


async def test_a_sidecar_whose_namespace_was_not_prepared_is_not_ready(
    start_sidecar: SidecarFactory,
) -> None:
    """With --link-local-check where 169.254.169.254 is not this sidecar (this test host has
    no redirect), /readyz stays 503 with the reason, though credentials are in hand."""
    sidecar = await start_sidecar("acme", "ll-none", ready=False, link_local_check=True)
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(sidecar.admin_url + "/readyz") as answer:
                body = await answer.text()
            if sidecar.state.keeper.current() is not None and "169.254.169.254" in body:
                break
            await asyncio.sleep(0.05)
    assert answer.status == 503
    assert "169.254.169.254" in body and "docs/link-local.md" in body
