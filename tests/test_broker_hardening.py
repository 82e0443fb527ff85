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


@pytest.mark.parametrize("body", [b"not gzip at all", gzip.compress(b'{"role": "x"}')])
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
    with pytest.raises(ConfigError, match=missing):
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
