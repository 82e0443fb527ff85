"""Golden exchanges: what real EC2 and ECS answered, replayed against the sidecar byte by byte.

The expectations below are our own, written from public recordings of real instances: smithy-rs's
`aws/rust-runtime/aws-config/test-data/default-credential-provider-chain/imds_*/http-traffic.json`
(EC2, 2021, which stored header names lower-cased and unordered), `curl -v` captures of real
instances from 2020 to 2025 (header case and order), and smithy-rs's `ecs_credentials` recording
of ECS's agent. Each exchange states the status, the header names exactly as EC2 writes them and
the shape of each value; dates, tokens and credentials are values, not shapes, and are only
checked for their form.

One deliberate difference, asserted here too: EC2 answers `Connection: close` every time; the
sidecar keeps connections alive (its fair share tells a pod's clients apart by connection), and
closes them when the client asks.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from metaproxy.sidecar.process import Sidecar
from tests.conftest import SidecarFactory

DATE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT"
)
NUMBER = re.compile(r"\d+")
TOKEN = re.compile(r"AQ[A-Za-z0-9_-]{52}==")  # 56 characters of base64url, EC2's length and form
ROLE = "acme-app"
SECRET = "/v2/credentials/" + "c0ffee" * 4


@dataclass(frozen=True)
class Wire:
    """One answer as read off the socket: status line, headers in order, body."""

    status_line: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])

    def header(self, name: str) -> str:
        return next(v for k, v in self.headers if k.lower() == name.lower())


@dataclass(frozen=True)
class Golden:
    """What EC2 answers: its status line, its header names in its order, each value's shape."""

    status_line: str
    headers: dict[str, re.Pattern[str] | str]  # name as EC2 spells it → exact value or shape
    body: Callable[[bytes], bool]
    why: str = ""
    absent: tuple[str, ...] = field(default=())

    def check(self, wire: Wire) -> None:
        assert wire.status_line == self.status_line
        names = [name for name, _ in wire.headers]
        # Same names, same spelling, same order (EC2's), apart from Connection (see above).
        assert [n for n in names if n != "Connection"] == list(self.headers)
        for name, shape in self.headers.items():
            value = wire.header(name)
            if isinstance(shape, str):
                assert value == shape, name
            else:
                assert shape.fullmatch(value), (name, value)
        assert int(wire.header("Content-Length")) == len(wire.body)
        for name in self.absent:
            assert name.lower() not in [n.lower() for n in names], name
        assert self.body(wire.body), wire.body[:200]


# EC2's XHTML 404 is exactly 339 bytes: two tabs and a space open the DOCTYPE's second line.
NOT_FOUND_PAGE = (
    b'<?xml version="1.0" encoding="iso-8859-1"?>\n'
    b'<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
    b'\t\t "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
    b'<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
    b" <head>\n  <title>404 - Not Found</title>\n </head>\n"
    b" <body>\n  <h1>404 - Not Found</h1>\n </body>\n</html>\n"
)
METADATA_HEADERS: dict[str, re.Pattern[str] | str] = {
    "X-Aws-Ec2-Metadata-Token-Ttl-Seconds": NUMBER,
    "Content-Type": "text/plain",
    "Accept-Ranges": "none",
    "Last-Modified": DATE,
    "Content-Length": NUMBER,
    "Date": DATE,
    "Server": "EC2ws",
}
CREDENTIALS_BODY = re.compile(
    rb'\{\n  "Code" : "Success",\n  "LastUpdated" : "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",\n'
    rb'  "Type" : "AWS-HMAC",\n  "AccessKeyId" : "ASIA[A-Z0-9]+",\n'
    rb'  "SecretAccessKey" : "[^"]+",\n  "Token" : "[^"]+",\n'
    rb'  "Expiration" : "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"\n\}'
)

GOLDEN_GETS = {
    # imds_default_chain_success: the role listing, the bare name with no newline.
    "/latest/meta-data/iam/security-credentials/": Golden(
        "HTTP/1.1 200 OK", METADATA_HEADERS, lambda body: body == ROLE.encode()
    ),
    # ... then the credential document: EC2's key order and layout, no final newline.
    f"/latest/meta-data/iam/security-credentials/{ROLE}": Golden(
        "HTTP/1.1 200 OK", METADATA_HEADERS, lambda body: bool(CREDENTIALS_BODY.fullmatch(body))
    ),
    # curl captures of placement/region: nine bytes, no newline.
    "/latest/meta-data/placement/region": Golden(
        "HTTP/1.1 200 OK", METADATA_HEADERS, lambda body: body == b"us-east-1"
    ),
    # imds_no_iam_role: a 404 keeps the TTL header, is text/html, has no Accept-Ranges and no
    # Last-Modified, and its page is byte for byte EC2's.
    "/latest/meta-data/no-such-path": Golden(
        "HTTP/1.1 404 Not Found",
        {
            "X-Aws-Ec2-Metadata-Token-Ttl-Seconds": NUMBER,
            "Content-Type": "text/html",
            "Content-Length": "339",
            "Date": DATE,
            "Server": "EC2ws",
        },
        lambda body: body == NOT_FOUND_PAGE,
        absent=("Accept-Ranges", "Last-Modified"),
    ),
}


async def exchange(url: str, request: str) -> Wire:
    """Send `request` (with Host added) on a new connection; read the whole answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = request.split("\n")
    raw = "\r\n".join([lines[0], f"Host: {host}", *lines[1:], "Connection: close", "", ""])
    writer.write(raw.encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in header_lines)]
    return Wire(status_line, headers, body)


async def token(sidecar: Sidecar, ttl: int = 21600) -> str:
    wire = await exchange(
        sidecar.imds_url,
        f"PUT /latest/api/token HTTP/1.1\nX-aws-ec2-metadata-token-ttl-seconds: {ttl}",
    )
    return wire.body.decode()


@pytest.fixture
async def sidecar(start_sidecar: SidecarFactory) -> Sidecar:
    return await start_sidecar("acme", "wire-1", container_credentials_path=SECRET)


async def test_token_put_is_ec2s(sidecar: Sidecar) -> None:
    """The token PUT: EC2's headers (the TTL echoed, text/plain, no Accept-Ranges or
    Last-Modified) and a 56-character token with no newline."""
    wire = await exchange(
        sidecar.imds_url,
        "PUT /latest/api/token HTTP/1.1\nX-aws-ec2-metadata-token-ttl-seconds: 21600",
    )
    assert wire.status_line == "HTTP/1.1 200 OK"
    assert {name for name, _ in wire.headers} == {
        "X-Aws-Ec2-Metadata-Token-Ttl-Seconds",
        "Content-Length",
        "Date",
        "Server",
        "Connection",
        "Content-Type",
    }
    assert wire.header("X-Aws-Ec2-Metadata-Token-Ttl-Seconds") == "21600"
    assert wire.header("Content-Type") == "text/plain"
    assert wire.header("Server") == "EC2ws"
    assert wire.header("Content-Length") == "56"
    assert TOKEN.fullmatch(wire.body.decode())


@pytest.mark.parametrize("path", GOLDEN_GETS)
async def test_get_with_a_token_is_ec2s(sidecar: Sidecar, path: str) -> None:
    """Every GET with a token: EC2's status, header names, order and value shapes, and body."""
    session = await token(sidecar)
    wire = await exchange(
        sidecar.imds_url, f"GET {path} HTTP/1.1\nX-aws-ec2-metadata-token: {session}"
    )
    GOLDEN_GETS[path].check(wire)


async def test_the_ttl_header_counts_down_on_every_answer(sidecar: Sidecar) -> None:
    """The TTL on a GET is what the token has left, as aws-node-termination-handler reads it."""
    session = await token(sidecar, ttl=30)
    path = "GET /latest/meta-data/placement/region HTTP/1.1\nX-aws-ec2-metadata-token: "
    first = int(
        (await exchange(sidecar.imds_url, path + session)).header(
            "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"
        )
    )
    await asyncio.sleep(1.1)
    second = int(
        (await exchange(sidecar.imds_url, path + session)).header(
            "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"
        )
    )
    assert 28 <= first <= 30
    assert second < first


async def test_a_kept_alive_connection_gets_the_ttl_too(sidecar: Sidecar) -> None:
    """Kept answers (one write of prepared bytes) still carry the asking token's own TTL."""
    long, short = await token(sidecar, ttl=21600), await token(sidecar, ttl=60)
    host, port = sidecar.imds_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    ttls = []
    for session in (long, short, long):
        writer.write(
            f"GET /latest/meta-data/placement/region HTTP/1.1\r\nHost: {host}\r\n"
            f"X-aws-ec2-metadata-token: {session}\r\n\r\n".encode()
        )
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = int(re.search(r"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        assert await reader.readexactly(length) == b"us-east-1"
        ttls.append(int(re.search(r"Token-Ttl-Seconds: (\d+)", head).group(1)))  # type: ignore[union-attr]
    writer.close()
    assert ttls[0] > 21000 and ttls[2] > 21000 and ttls[1] <= 60


async def test_a_get_of_the_token_path_is_ec2s_405(sidecar: Sidecar) -> None:
    """GET on the token path: EC2's nginx 405 ("Not Allowed", Allow: OPTIONS, PUT, no body)."""
    wire = await exchange(sidecar.imds_url, "GET /latest/api/token HTTP/1.1")
    assert wire.status_line == "HTTP/1.1 405 Not Allowed"
    assert wire.header("Allow") == "OPTIONS, PUT"
    assert wire.header("Content-Type") == "text/plain"
    assert wire.body == b""


@pytest.mark.parametrize("header", ["", "\nX-aws-ec2-metadata-token: forged"])
async def test_missing_or_forged_token_is_ec2s_401(sidecar: Sidecar, header: str) -> None:
    """No token (IMDSv1 refused) or a forged one: EC2's XHTML 401 and no TTL header."""
    wire = await exchange(sidecar.imds_url, f"GET /latest/meta-data/ HTTP/1.1{header}")
    assert wire.status_line == "HTTP/1.1 401 Unauthorized"
    assert wire.header("Content-Type") == "text/html"
    assert wire.body == NOT_FOUND_PAGE.replace(b"404 - Not Found", b"401 - Unauthorized")
    assert "x-aws-ec2-metadata-token-ttl-seconds" not in [n.lower() for n, _ in wire.headers]


async def test_the_relative_uri_is_ecss(sidecar: Sidecar) -> None:
    """ECS's agent's answer (ecs_credentials recording): compact JSON in its key order,
    `application/json`, no Server header."""
    wire = await exchange(sidecar.container_url, f"GET {SECRET} HTTP/1.1\nAccept: application/json")
    assert wire.status_line == "HTTP/1.1 200 OK"
    assert [name for name, _ in wire.headers if name != "Connection"] == [
        "Content-Type",
        "Content-Length",
        "Date",
    ]
    assert wire.header("Content-Type") == "application/json"
    document = json.loads(wire.body)
    assert list(document) == [
        "RoleArn", "AccessKeyId", "SecretAccessKey", "Token", "AccountId", "Expiration",
    ]  # fmt: skip
    assert b" " not in wire.body
