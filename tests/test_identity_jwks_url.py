"""Issuers given by URL: keys fetched over HTTPS (discovery or JWKS), rotated without a failed
verification, kept while the issuer is away, and fetched at most once per interval for unknown
kids."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import jwt
import pytest

from metaproxy.broker.config import BrokerConfig
from metaproxy.broker.server import BrokerServer
from metaproxy.config import TrustedIssuer, parse_trust
from metaproxy.errors import ConfigError, Unauthenticated
from metaproxy.identity.issue import issue_token
from metaproxy.identity.keys import load_private_key
from metaproxy.identity.remote_keys import Fetching
from metaproxy.identity.verify import IdentityVerifier
from tests.oidc_issuer import LocalIssuer
from tests.secret_scan import ISSUED
from tests.support import (
    ALERT_RULES,
    Pki,
    assert_promtool_passes,
    audit_records,
    broker_config,
    expected_annotations,
    issue,
    require_promtool,
    scrape,
    value,
)

AUDIENCE = "metaproxy-broker"
AGE = "metaproxy_broker_jwks_age_seconds"
FAILURES = "metaproxy_broker_jwks_fetch_failures_total"


@pytest.fixture
async def issuer(tmp_path: Path) -> AsyncIterator[LocalIssuer]:
    local = LocalIssuer(tmp_path / "issuer")
    await local.start()
    yield local
    await local.aclose()


def token(issuer: LocalIssuer, key: Path, task: str = "t-1") -> str:
    made = issue_token(
        key, issuer=issuer.url, audience=AUDIENCE, task=task, tenant="acme", app="web", ttl=600
    )
    ISSUED.add(made)  # the secret scan looks for it in every log and record
    return made


def verifier_for(issuer: LocalIssuer, keys_url: str, **fetching: float) -> IdentityVerifier:
    trust = TrustedIssuer(issuer.url, AUDIENCE, None, jwks_url=keys_url)
    return IdentityVerifier([trust], fetching=Fetching(**fetching), jwks_ca_file=issuer.ca_file)


def test_trust_spec_takes_a_file_a_url_or_discover() -> None:
    """`--trust` keys: a file path, an https:// URL, or `discover` (the issuer's own discovery
    document); plain http:// is refused."""
    assert parse_trust("iss,aud,/etc/jwks.json").jwks_file == Path("/etc/jwks.json")
    by_url = parse_trust("iss,aud,https://k8s.example/openid/v1/jwks,kubernetes")
    assert (by_url.jwks_file, by_url.jwks_url, by_url.kind) == (
        None,
        "https://k8s.example/openid/v1/jwks",
        "kubernetes",
    )
    discovered = parse_trust("https://oidc.example/id/ABC,aud,discover")
    assert discovered.jwks_url == "https://oidc.example/id/ABC/.well-known/openid-configuration"
    with pytest.raises(ConfigError, match="https:// only"):
        parse_trust("iss,aud,http://k8s.example/openid/v1/jwks")


@pytest.mark.parametrize("by", ["discovery", "jwks"])
async def test_keys_come_from_the_issuer_over_tls(issuer: LocalIssuer, by: str) -> None:
    """Through discovery or straight from the JWKS URL, a token the issuer signed verifies."""
    key = issuer.new_key("first")
    issuer.publish(key)
    url = issuer.discovery_url if by == "discovery" else issuer.jwks_url
    verifier = verifier_for(issuer, url)
    await verifier.start()
    try:
        identity = await verifier.verify_fetching(token(issuer, key))
        assert (identity.issuer, identity.tenant, identity.task) == (issuer.url, "acme", "t-1")
        assert issuer.discovery_fetches == (1 if by == "discovery" else 0)
    finally:
        await verifier.aclose()


async def test_an_untrusted_certificate_fetches_nothing(issuer: LocalIssuer) -> None:
    """Without the issuer's CA in the bundle, TLS fails: no keys, the token is refused."""
    key = issuer.new_key("first")
    issuer.publish(key)
    trust = TrustedIssuer(issuer.url, AUDIENCE, None, jwks_url=issuer.jwks_url)
    verifier = IdentityVerifier([trust])  # the system's CAs only
    await verifier.start()
    try:
        with pytest.raises(Unauthenticated, match="unknown kid"):
            await verifier.verify_fetching(token(issuer, key))
        (stats,) = verifier.key_sets()
        assert (stats.keys, stats.failures >= 1, stats.age) == (0, True, float("inf"))
        assert issuer.jwks_fetches == 0
    finally:
        await verifier.aclose()


async def test_a_discovery_document_naming_another_issuer_is_refused(issuer: LocalIssuer) -> None:
    """Discovery must name the issuer it was fetched for (OIDC Discovery 4.3)."""
    key = issuer.new_key("first")
    issuer.publish(key)
    issuer.issuer_override = "https://someone-else.example"
    verifier = verifier_for(issuer, issuer.discovery_url)
    await verifier.start()
    try:
        with pytest.raises(Unauthenticated):
            await verifier.verify_fetching(token(issuer, key))
        assert issuer.jwks_fetches == 0
    finally:
        await verifier.aclose()


async def test_a_key_rotation_fails_no_verification(issuer: LocalIssuer) -> None:
    """New key published, tokens signed with it at once, old key withdrawn: under steady
    traffic, not one verification fails; the withdrawn key stops verifying."""
    old, new = issuer.new_key("old"), issuer.new_key("new")
    issuer.publish(old)
    verifier = verifier_for(
        issuer, issuer.discovery_url, refresh_seconds=0.5, unknown_kid_interval=0.2
    )
    await verifier.start()
    signing = {"key": old}
    results: list[bool] = []
    stop = asyncio.Event()

    async def traffic(worker: int) -> None:
        while not stop.is_set():
            try:
                await verifier.verify_fetching(token(issuer, signing["key"], f"t-{worker}"))
                results.append(True)
            except Unauthenticated:
                results.append(False)
            await asyncio.sleep(0.005)

    workers = [asyncio.create_task(traffic(n)) for n in range(8)]
    try:
        await asyncio.sleep(0.4)
        issuer.publish(new)  # the issuer publishes the new key and signs with it at once
        signing["key"] = new
        await asyncio.sleep(0.4)
        issuer.withdraw(old)
        await asyncio.sleep(1.2)  # past a scheduled refresh: the old key is gone
        stop.set()
        await asyncio.gather(*workers)
        assert results.count(False) == 0
        assert len(results) > 100
        with pytest.raises(Unauthenticated, match="unknown kid"):
            await verifier.verify_fetching(token(issuer, old))
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
        await verifier.aclose()


async def test_an_unknown_kid_flood_fetches_once_per_interval(issuer: LocalIssuer) -> None:
    """Thousands of tokens naming made-up kids: all refused, and the issuer sees at most one
    fetch per interval (concurrent ones join the fetch in flight)."""
    key = issuer.new_key("real")
    issuer.publish(key)
    interval = 0.5
    verifier = verifier_for(
        issuer, issuer.jwks_url, refresh_seconds=3600, unknown_kid_interval=interval
    )
    await verifier.start()
    private, _kid, alg = load_private_key(key)
    claims = jwt.decode(token(issuer, key), options={"verify_signature": False})

    async def forged() -> bool:
        made_up = jwt.encode(claims, private, algorithm=alg, headers={"kid": secrets.token_hex(8)})
        try:
            await verifier.verify_fetching(made_up)
        except Unauthenticated:
            return False
        return True

    try:
        before = issuer.jwks_fetches
        began = time.monotonic()
        accepted: list[bool] = []
        while time.monotonic() - began < 2.2:
            accepted += await asyncio.gather(*(forged() for _ in range(100)))
        elapsed = time.monotonic() - began
        fetches = issuer.jwks_fetches - before
        assert not any(accepted) and len(accepted) >= 1000
        assert 1 <= fetches <= int(elapsed / interval) + 1
    finally:
        await verifier.aclose()


def url_policy(policies_dir: Path, issuer_url: str) -> None:
    """acme's tenant also claims platform tokens of the URL issuer."""
    path = policies_dir / "acme.toml"
    text = path.read_text()
    rule = f'\n[[identities]]\nkind = "platform"\nissuer = "{issuer_url}"\ntenant = "acme"\n'
    path.write_text(text.replace("\n[[identities]]", rule + "\n[[identities]]", 1))


def with_url_issuer(
    config: BrokerConfig, policies_dir: Path, issuer: LocalIssuer, keys_url: str
) -> BrokerConfig:
    """`config` trusting `issuer` by URL (refreshed every 0.2 s), beside the platform issuer,
    with a tenant policy that claims its tokens."""
    url_policy(policies_dir, issuer.url)
    return replace(
        config,
        trusted_issuers=(
            *config.trusted_issuers,
            TrustedIssuer(issuer.url, AUDIENCE, None, jwks_url=keys_url),
        ),
        jwks_ca_file=issuer.ca_file,
        jwks_refresh_seconds=0.2,
    )


async def test_an_issuer_gone_away_keeps_its_keys_and_raises_the_alert(
    issuer: LocalIssuer,
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    https: aiohttp.ClientSession,
) -> None:
    """The issuer goes away: the broker still issues on the last good keys, its key-set age and
    fetch failures rise on /metrics, and the alert fires on that exposition (promtool)."""
    key = issuer.new_key("first")
    issuer.publish(key)
    config = with_url_issuer(
        broker_config(tmp_path, pki, sts_url, policies_dir),
        policies_dir,
        issuer,
        issuer.discovery_url,
    )
    broker = await BrokerServer.start(config)
    try:

        async def ask(task: str) -> int:
            headers = {"Authorization": f"Bearer {token(issuer, key, task)}"}
            async with https.post(broker.url + "/v1/credentials", json={}, headers=headers) as r:
                return r.status

        assert await ask("before") == 200
        fresh = await scrape(broker.admin_url)
        assert value(fresh, AGE, issuer=issuer.url) < 1.0
        await issuer.aclose()
        await asyncio.sleep(1.5)
        assert await ask("while-away") == 200
        away = await scrape(broker.admin_url)
        assert value(away, AGE, issuer=issuer.url) >= 1.0
        assert value(away, FAILURES, issuer=issuer.url) >= 1
        await asyncio.sleep(0.5)
        later = await scrape(broker.admin_url)
        assert value(later, AGE, issuer=issuer.url) > value(away, AGE, issuer=issuer.url)
        issued = [r for r in audit_records(config.audit_dir) if r.get("task") == "while-away"]
        assert issued and issued[-1]["event"] == "issued"
        assert_stale_keys_alert_fires(tmp_path, issuer.url, value(later, AGE, issuer=issuer.url))
    finally:
        await broker.aclose()


def assert_stale_keys_alert_fires(tmp_path: Path, issuer_url: str, scraped_age: float) -> None:
    """promtool, fed the age as the broker exposed it and growing one second a second while
    the issuer stays away, fires MetaproxyIssuerKeysStale for that issuer."""
    promtool, rules = require_promtool(), ALERT_RULES
    labels = {"pod": "broker-0", "issuer": issuer_url}
    annotations = expected_annotations("MetaproxyIssuerKeysStale", labels)
    series = f'{AGE}{{pod="broker-0",issuer="{issuer_url}"}}'
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": series, "values": f"{scraped_age:g}+60x40"}],
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "MetaproxyIssuerKeysStale", "exp_alerts": []},
                    {
                        "eval_time": "30m",
                        "alertname": "MetaproxyIssuerKeysStale",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "ticket",
                                    "pod": "broker-0",
                                    "issuer": issuer_url,
                                },
                                "exp_annotations": annotations,
                            }
                        ],
                    },
                ],
            }
        ],
    }
    assert_promtool_passes(promtool, tmp_path / "jwks_alert_test.yaml", test)


async def test_a_refused_document_keeps_the_last_good_keys(issuer: LocalIssuer) -> None:
    """A JWKS over 256 KiB (read in chunks, never whole) is refused: the keys fetched before
    keep verifying, the new key stays unknown, the failure is counted."""
    old, new = issuer.new_key("old"), issuer.new_key("new")
    issuer.publish(old)
    verifier = verifier_for(issuer, issuer.jwks_url, unknown_kid_interval=0.01)
    await verifier.start()
    try:
        issuer.publish(new)
        issuer.padding = 2 * 1024 * 1024
        await asyncio.sleep(0.02)
        with pytest.raises(Unauthenticated, match="unknown kid"):
            await verifier.verify_fetching(token(issuer, new))
        assert (await verifier.verify_fetching(token(issuer, old))).task == "t-1"
        (stats,) = verifier.key_sets()
        assert (stats.keys, stats.fetches, stats.failures) == (1, 1, 1)
    finally:
        await verifier.aclose()


async def test_a_broker_starts_while_an_issuer_is_unreachable(
    issuer: LocalIssuer,
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    https: aiohttp.ClientSession,
) -> None:
    """An issuer down at start does not stop the broker: other issuers' tasks are served, its
    own are refused (401) until a fetch succeeds, and its key set shows as never fetched."""
    key = issuer.new_key("first")
    issuer.publish(key)
    await issuer.aclose()
    config = with_url_issuer(
        broker_config(tmp_path, pki, sts_url, policies_dir), policies_dir, issuer, issuer.jwks_url
    )
    broker = await BrokerServer.start(config)
    try:

        async def ask(bearer: str) -> int:
            headers = {"Authorization": f"Bearer {bearer}"}
            async with https.post(broker.url + "/v1/credentials", json={}, headers=headers) as r:
                return r.status

        assert await ask(issue(pki, "platform-task", "acme")) == 200
        assert await ask(token(issuer, key, "url-task")) == 401
        samples = await scrape(broker.admin_url)
        assert value(samples, AGE, issuer=issuer.url) == 1e9
        await issuer.start()  # back on its port: the next scheduled fetch finds it
        deadline = time.monotonic() + 10
        while await ask(token(issuer, key, "url-task")) != 200:
            assert time.monotonic() < deadline, "the issuer's keys were never fetched"
            await asyncio.sleep(0.1)
    finally:
        await broker.aclose()
