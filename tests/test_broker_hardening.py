"""The broker's answers to a hostile client before it is authenticated: encoded bodies, forged
log lines, a half-configured TLS."""

from __future__ import annotations

import gzip
import logging
import sys
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.errors import ConfigError
from metaproxy.logs import ContextFilter, TextFormatter, printable
from tests.support import Pki, audit_records, broker_config, issue


def unhandled(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("body", [b"not gzip at all", gzip.compress(b'{"role": "x"}', mtime=0)])
async def test_encoded_body_is_415_on_the_public_port(
    body: bytes,
    broker: BrokerServer,
    https: aiohttp.ClientSession,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Content-Encoding gzip, decodable or not, is 415 with the JSON error, nothing logged."""
    headers = {
        "Authorization": f"Bearer {issue(pki, 't-gzip', 'acme')}",
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }
    async with https.post(broker.url + "/v1/credentials", data=body, headers=headers) as response:
        assert response.status == 415
        answer = await response.json()
    assert answer["code"] == "UnsupportedMediaType"
    assert unhandled(caplog) == []


async def test_encoded_body_is_415_on_the_admin_port(
    broker: BrokerServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A health probe with a gzip body that does not decode is 415, not a logged traceback."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            broker.admin_url + "/healthz",
            data=b"not gzip",
            headers={"Content-Encoding": "gzip"},
        ) as response,
    ):
        assert response.status == 415
    assert unhandled(caplog) == []


def test_text_log_lines_cannot_be_forged() -> None:
    """A client's newline, ANSI escape, C1 CSI or bidi override is escaped in a text log line."""
    forged = "/v1\n2026-01-01 00:00:00 INFO metaproxy forged \x1b[2J\x9b1m\u202eevil"
    record = logging.LogRecord(
        "metaproxy.http", logging.WARNING, __file__, 1, "GET %s", (forged,), None
    )
    ContextFilter().filter(record)
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert all(char not in line for char in "\x1b\x9b\u202e")
    assert "\\n2026-01-01" in line
    assert printable("plain é ü /path") == "plain é ü /path"


def test_text_log_keeps_its_traceback_lines() -> None:
    """Escaping applies to the message; an exception's traceback stays readable."""
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("metaproxy", logging.ERROR, __file__, 1, "failed", (), exc_info)
    ContextFilter().filter(record)
    assert "Traceback" in TextFormatter().format(record).splitlines()[1]


@pytest.mark.parametrize("missing", ["tls_cert", "tls_key"])
async def test_half_configured_tls_refuses_to_start(
    missing: str, tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> None:
    """--tls-cert without --tls-key (or the reverse) is a config error, not plain HTTP."""
    config = broker_config(tmp_path, pki, sts_url, policies_dir, **{missing: None})
    with pytest.raises(ConfigError, match=f"--{missing.replace('_', '-')} is missing"):
        await BrokerServer.start(config)


async def test_issued_or_refreshed_is_decided_by_the_broker(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki, tmp_path: Path
) -> None:
    """A first grant claimed as a refresh is audited `issued`; the next is `refreshed`."""
    token = issue(pki, "t-first", "acme")
    events = []
    for refresh in (True, False, True):
        async with https.post(
            broker.url + "/v1/credentials",
            json={"refresh": refresh},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 200
            request_id = (await response.json())["request_id"]
        (record,) = [r for r in audit_records(tmp_path / "audit") if r["request_id"] == request_id]
        events.append(record["event"])
    assert events == ["issued", "refreshed", "refreshed"]


async def bad_requests(
    https: aiohttp.ClientSession, broker: BrokerServer, tokens: list[str]
) -> list[int]:
    statuses = []
    for token in tokens:
        async with https.post(
            broker.url + "/v1/credentials", json={}, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            statuses.append(response.status)
    return statuses


def denied_401(tmp_path: Path) -> list[dict[str, object]]:
    return [r for r in audit_records(tmp_path / "audit") if r["rule"] == "authentication"]


async def test_identical_failures_from_one_peer_are_one_record_with_a_count(
    broker: BrokerServer,
    https: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """50 copies of one bad token: 50 × 401, one record and one WARNING, then one summary."""
    caplog.set_level(logging.WARNING)
    statuses = await bad_requests(https, broker, ["garbage.token.here"] * 50)
    assert statuses == [401] * 50
    assert len(denied_401(tmp_path)) == 1
    warnings = [r for r in caplog.records if "Unauthenticated" in r.getMessage()]
    assert len(warnings) == 1
    assert await broker.services.issuer.failures.flush(everything=True) == 1
    summary = denied_401(tmp_path)[-1]
    assert (summary["count"], summary["status"], summary["peer"]) == (49, 401, "127.0.0.1")


async def test_a_peer_over_its_failure_budget_is_429_without_a_record_each(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki, tmp_path: Path
) -> None:
    """Distinct failures cost records up to the peer's burst; the rest are 429 and summarised,
    and a valid token from the same peer is still served."""
    from tests.test_identity_rejections_audited import claims, signed

    tokens = [signed(pki, claims(**{f"c{n}": "x" * 300})) for n in range(60)]
    statuses = await bad_requests(https, broker, tokens)
    assert statuses.count(401) <= 22  # the burst (20) and what refilled meanwhile
    assert statuses[-10:] == [429] * 10
    assert len(denied_401(tmp_path)) == statuses.count(401)
    async with https.post(
        broker.url + "/v1/credentials",
        json={},
        headers={"Authorization": f"Bearer {issue(pki, 't-good', 'acme')}"},
    ) as response:
        assert response.status == 200
    await broker.services.issuer.failures.flush(everything=True)
    summary = denied_401(tmp_path)[-1]
    assert (summary["status"], summary["count"]) == (429, statuses.count(429))


async def test_rotated_certificate_is_served_without_dropping_connections(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> None:
    """The cert/key files are replaced: new handshakes get the new certificate, an open
    keep-alive connection keeps working, and a half-written pair is not loaded."""
    import shutil
    import ssl

    from tests.support import make_pki

    cert, key = tmp_path / "broker.crt", tmp_path / "broker.key"
    shutil.copy(pki.broker_cert, cert)
    shutil.copy(pki.broker_key, key)
    broker = await BrokerServer.start(
        broker_config(tmp_path, pki, sts_url, policies_dir, tls_cert=cert, tls_key=key)
    )
    new = make_pki(tmp_path / "new-pki")
    old_ca = ssl.create_default_context(cafile=str(pki.ca))
    new_ca = ssl.create_default_context(cafile=str(new.ca))
    token = issue(pki, "t-rotate", "acme")

    async def ask(session: aiohttp.ClientSession) -> int:
        async with session.post(
            broker.url + "/v1/credentials", json={}, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            return response.status

    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=old_ca, limit=1)
        ) as kept:
            assert await ask(kept) == 200
            assert broker.certificate is not None
            shutil.copy(new.broker_cert, cert)  # the certificate first: a mismatched pair
            assert broker.certificate.check() is False
            shutil.copy(new.broker_key, key)
            assert broker.certificate.check() is True
            assert await ask(kept) == 200  # the open connection was not dropped
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=new_ca)) as fresh:
                assert await ask(fresh) == 200
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=old_ca)) as stale:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await ask(stale)
    finally:
        await broker.stop()
