"""Malformed HTTP — a corpus of known-bad requests and hypothesis-generated ones, sent as raw
bytes — never gets a 5xx, crashes nothing and logs no unhandled error, on every port the sidecar,
the broker and the webhook serve (the broker's control API, the sidecar's preStop hook and its
passthrough to the node's IMDS included); all keep serving afterwards (the
`{"env": {"PATH": null}}` lesson)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaproxy.broker.server import BrokerServer
from metaproxy.sidecar.process import Sidecar
from metaproxy.testing.ec2_node import SECRET_MARK, Instance, NodeImds
from metaproxy.webhook.config import WebhookConfig
from metaproxy.webhook.process import Webhook
from metaproxy.webhook.settings import DEFAULT_NODE_METADATA
from tests.support import CONTROL_TOKEN, Pki, broker_config, issue, sidecar_config, wait_ready
from tests.test_webhook import labelled_pod, review

CORPUS = sorted((Path(__file__).parent / "fuzz_corpus").glob("*.http"))
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
# A throttle is a 503 with Retry-After (what SDKs retry on); it is an answer, not a fault.
ANSWER = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n((?:[^\r\n]+\r\n)*)\r\n")
# Loggers an unhandled exception would show up in: ours, aiohttp's server side, the event loop.
WATCHED = ("metaproxy", "aiohttp.server", "aiohttp.web", "aiohttp.access", "asyncio")
HEADER_DEADLINE = 1.0
# 15,000 nested arrays: json.loads raises RecursionError, which must be a 400 too.
DEEP_JSON = "49-body-json-deeply-nested.http"
# What the webhook refuses since it has the broker's guard: (corpus case, its one answer).
WEBHOOK_REFUSALS = {
    "94-mutate-review-body-never-finishes.http": 408,
    "95-mutate-chunked-review-stalls.http": 408,
    "96-mutate-review-content-encoding-gzip.http": 415,
    "97-mutate-head-never-finishes.http": 408,
}
# What the broker's control API answers each malformed revocation (and none revokes anything).
CONTROL_ANSWERS = {
    "100-control-revoke-body-not-object.http": 400,
    "101-control-revoke-unknown-field.http": 400,
    "102-control-revoke-task-not-a-string.http": 400,
    "103-control-revoke-tenant-huge.http": 413,  # its body cap is 4 KiB
    "104-control-revoke-control-characters.http": 400,
    "105-control-revoke-empty-task.http": 400,
    "106-control-lift-unknown-tenant.http": 404,
    "107-control-revoke-json-deeply-nested.http": 400,
    "108-control-revoke-text-plain.http": 400,
    "109-control-list-with-a-body.http": 200,
    "110-control-revoke-lone-surrogate.http": 400,
    "111-control-revoke-chunked-json-number.http": 400,
    "112-control-revoke-bearer-twice.http": 401,
    "113-control-revoke-invalid-utf8.http": 400,
}
# What the sidecar answers tricks on its node passthrough and its preStop hook.
SIDECAR_ANSWERS = {
    ("imds", "117-node-metadata-traversal-to-the-nodes-role.http"): 404,
    ("imds", "118-node-metadata-encoded-traversal.http"): 404,
    ("imds", "119-node-metadata-query-and-fragment.http"): 200,
    ("imds", "120-node-metadata-huge-path-under-events.http"): 414,
    ("admin", "114-lifecycle-terminate-wrong-token.http"): 403,
    ("admin", "115-lifecycle-terminate-token-not-latin1.http"): 403,
    ("admin", "116-lifecycle-terminate-post-with-body.http"): 405,
}
NODE = Instance(
    instance_id="i-0f0f0f0f0f0f0f0f0",
    instance_type="m6i.large",
    zone="us-east-1a",
    zone_id="use1-az6",
    local_ipv4="10.0.1.17",
    mac="0e:aa:00:00:00:01",
    spot_action={"action": "terminate", "time": "2026-12-05T22:00:00Z"},
)
LIFECYCLE_TOKEN = "fuzz-lifecycle-token-0123456789abcdef"


@dataclass
class Target:
    name: str
    host: str
    port: int
    tls: ssl.SSLContext | None
    auth: bytes  # replaces @AUTH@ in a request: what a legitimate caller would send


@dataclass
class Servers:
    broker: BrokerServer
    sidecar: Sidecar
    webhook: Webhook
    node: NodeImds  # the sidecar's node, for the metadata it passes through
    pki: Pki
    imds_token: str  # an IMDSv2 session token, so requests reach the metadata tree

    def target(self, name: str) -> Target:
        urls = {
            "imds": self.sidecar.imds_url,
            "container": self.sidecar.container_url,
            "admin": self.sidecar.admin_url,
            "broker": self.broker.url,
            "control": self.broker.control_url,
            "webhook": self.webhook.url,
        }
        scheme, _, rest = urls[name].partition("://")
        host, _, port = rest.rpartition(":")
        tls = ssl.create_default_context(cafile=str(self.pki.ca)) if scheme == "https" else None
        if name == "broker":
            auth = f"Bearer {issue(self.pki, 't-fuzz', 'acme')}".encode()
        elif name == "control":
            auth = f"Bearer {CONTROL_TOKEN}".encode()
        elif name == "webhook":
            auth = b""  # the API server sends none
        elif name == "imds":
            auth = self.imds_token.encode()
        else:  # the container endpoint's token; on the admin port, never the preStop hook's
            auth = self.sidecar.state.authorization_token.encode()
        return Target(name, host, int(port), tls, auth)


@pytest.fixture
async def servers(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path, aiohttp_server: Any
) -> AsyncIterator[Servers]:
    """A broker, a sidecar on a node and a webhook (on TLS, as deployed) with a 1 s header
    deadline, so unfinished requests end quickly."""
    node = NodeImds(NODE)
    node_server = await aiohttp_server(node.app())
    broker = await BrokerServer.start(
        broker_config(tmp_path, pki, sts_url, policies_dir, header_timeout=HEADER_DEADLINE)
    )
    token_file = tmp_path / "fuzz.jwt"
    token_file.write_text(issue(pki, "t-fuzz", "acme"))
    sidecar = Sidecar(
        sidecar_config(
            tmp_path,
            pki,
            broker.url,
            token_file,
            header_timeout=HEADER_DEADLINE,
            keepalive_timeout=2.0,
            host_metadata_url=str(node_server.make_url("/")).rstrip("/"),
            host_metadata_allow=DEFAULT_NODE_METADATA,
            lifecycle_token=LIFECYCLE_TOKEN,
        )
    )
    await sidecar.start()
    webhook = Webhook(
        WebhookConfig(
            listen="127.0.0.1:0",
            tls_cert=pki.broker_cert,
            tls_key=pki.broker_key,
            image="registry.example.com/metaproxy:0.1.0",
            broker_url="https://metaproxy-broker.metaproxy.svc:8443",
            header_timeout=HEADER_DEADLINE,
        )
    )
    await webhook.start()
    try:
        await wait_ready(sidecar.admin_url)
        async with (
            aiohttp.ClientSession() as session,
            session.put(
                sidecar.imds_url + "/latest/api/token",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
            ) as answer,
        ):
            imds_token = await answer.text()
        yield Servers(broker, sidecar, webhook, node, pki, imds_token)
    finally:
        await webhook.aclose()
        await sidecar.aclose()
        await broker.aclose()


def unhandled_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(WATCHED)
    ]


async def still_serving(servers: Servers) -> None:
    """A real client still gets credentials from the sidecar and from the broker, and a review
    from the webhook."""
    context = ssl.create_default_context(cafile=str(servers.pki.ca))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        async with session.get(
            servers.sidecar.container_url + "/v1/credentials",
            headers={"Authorization": servers.sidecar.state.authorization_token},
        ) as response:
            assert response.status == 200
            assert "AccessKeyId" in await response.json()
        async with session.post(
            servers.broker.url + "/v1/credentials",
            json={},
            headers={"Authorization": f"Bearer {issue(servers.pki, 't-after', 'acme')}"},
        ) as response:
            assert response.status == 200
        async with session.post(
            servers.webhook.url + "/mutate", json=review(labelled_pod())
        ) as response:
            assert response.status == 200
            assert (await response.json())["response"]["allowed"] is True


async def exchange(target: Target, data: bytes, source: str) -> bytes:
    """Send raw bytes, collect what comes back until the server closes, goes quiet after
    answering, or a window slightly longer than the header deadline passes."""
    reader, writer = await asyncio.open_connection(
        target.host, target.port, ssl=target.tls, local_addr=(source, 0)
    )
    received = b""
    deadline = time.monotonic() + HEADER_DEADLINE + 1.5
    try:
        writer.write(data.replace(b"@AUTH@", target.auth))
        while (left := deadline - time.monotonic()) > 0:
            quiet = 0.3 if STATUS.search(received) else left
            try:
                chunk = await asyncio.wait_for(reader.read(65536), min(left, quiet))
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
    except (ConnectionError, ssl.SSLError):
        pass  # the server may reset a connection it refused mid-write: that is an answer too
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    return received


@pytest.mark.parametrize("name", ["imds", "container", "admin", "broker", "control", "webhook"])
async def test_corpus_of_malformed_requests_never_gets_a_5xx(
    name: str, servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    """Every corpus request gets a 4xx/2xx answer or a closed connection, nothing logged."""
    assert len(CORPUS) >= 30
    target = servers.target(name)
    gate = asyncio.Semaphore(12)  # the control port allows 16 connections; stay under

    async def one(index: int, case: Path) -> tuple[str, list[int]]:
        async with gate:
            answer = await exchange(target, case.read_bytes(), f"127.0.1.{index % 250 + 1}")
        return case.name, statuses_apart_from_throttles(answer)

    results = await asyncio.gather(*(one(i, case) for i, case in enumerate(CORPUS)))
    server_errors = {case: s for case, s in results if any(status >= 500 for status in s)}
    assert server_errors == {}
    assert sum(bool(s) for _, s in results) >= len(CORPUS) // 2  # most got a real answer
    assert unhandled_errors(caplog) == []
    await still_serving(servers)


def statuses_apart_from_throttles(answer: bytes) -> list[int]:
    """Every status in a stream of responses, a throttle (503 + Retry-After) read as 429."""
    statuses = []
    for status, headers in ANSWER.findall(answer):
        throttled = status == b"503" and b"\r\nretry-after:" in b"\r\n" + headers.lower()
        statuses.append(429 if throttled else int(status))
    return statuses


async def test_deeply_nested_json_body_is_400_at_the_broker(servers: Servers) -> None:
    """15,000 nested arrays in the body are a 400 like any other bad JSON."""
    target = servers.target("broker")
    answer = await exchange(target, (CORPUS[0].parent / DEEP_JSON).read_bytes(), "127.0.0.1")
    assert [int(s) for s in STATUS.findall(answer)] == [400]


@pytest.mark.parametrize("case", sorted(WEBHOOK_REFUSALS))
async def test_the_webhook_refuses_a_review_it_cannot_finish_or_decode(
    case: str, servers: Servers
) -> None:
    """A review whose head or body stops coming is 408 within the header deadline; an encoded
    one is 415, never decoded."""
    target = servers.target("webhook")
    answer = await exchange(target, (CORPUS[0].parent / case).read_bytes(), "127.0.0.1")
    assert [int(s) for s in STATUS.findall(answer)] == [WEBHOOK_REFUSALS[case]]


@pytest.mark.parametrize("case", sorted(CONTROL_ANSWERS))
async def test_the_control_api_refuses_a_malformed_revocation(case: str, servers: Servers) -> None:
    """Each malformed control request gets its one 4xx (a listing, 200), and none of them
    revokes anything."""
    target = servers.target("control")
    answer = await exchange(target, (CORPUS[0].parent / case).read_bytes(), "127.0.0.1")
    assert [int(s) for s in STATUS.findall(answer)] == [CONTROL_ANSWERS[case]]
    assert servers.broker.revocations.entries() == []


@pytest.mark.parametrize(("name", "case"), sorted(SIDECAR_ANSWERS))
async def test_the_sidecar_keeps_the_nodes_secrets_and_its_hook_from_tricks(
    name: str, case: str, servers: Servers
) -> None:
    """Traversals through the node passthrough are 404 (the node is never asked for what it
    keeps to itself), and the preStop hook refuses a wrong token or method."""
    target = servers.target(name)
    answer = await exchange(target, (CORPUS[0].parent / case).read_bytes(), "127.0.0.1")
    assert [int(s) for s in STATUS.findall(answer)] == [SIDECAR_ANSWERS[(name, case)]]
    assert SECRET_MARK.encode() not in answer
    assert [path for path in servers.node.asked if ".." in path or "iam" in path] == []
    assert servers.sidecar.state.notice.termination is None  # the hook did not start it


def _no_newlines(value: bytes) -> bytes:
    return value.replace(b"\r", b"").replace(b"\n", b"")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
METHODS = st.sampled_from([b"GET", b"PUT", b"POST", b"HEAD", b"DELETE", b"OPTIONS"]) | st.binary(
    min_size=1, max_size=10
).map(_no_newlines)
PATHS = (
    st.sampled_from(
        [
            b"/",
            b"/latest/api/token",
            b"/latest/meta-data/",
            b"/latest/meta-data/iam/security-credentials/acme-app",
            b"/v1/credentials",
            b"/mutate",
            b"/healthz",
            b"/metrics",
            b"/v1/revocations",
            b"/v1/revocations/lift",
            b"/lifecycle/terminate",
            b"/latest/meta-data/placement/availability-zone",
            b"/latest/meta-data/spot/instance-action",
            b"/latest/meta-data/events/maintenance/scheduled",
        ]
    )
    | st.lists(
        st.sampled_from([b"latest", b"meta-data", b"iam", b"..", b"%2e%2e", b"", b"\xff", b"%00"]),
        max_size=6,
    ).map(lambda parts: b"/" + b"/".join(parts))
    | st.binary(max_size=40).map(lambda raw: b"/" + _no_newlines(raw).replace(b" ", b""))
)
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1x"])
HEADER_NAMES = st.sampled_from(
    [
        b"Authorization",
        b"X-aws-ec2-metadata-token",
        b"X-aws-ec2-metadata-token-ttl-seconds",
        b"Content-Type",
        b"Transfer-Encoding",
        b"Connection",
        b"X-Forwarded-For",
        b"Expect",
        b"Host",
        b"X-Metaproxy-Lifecycle-Token",
    ]
) | st.binary(min_size=1, max_size=16).map(_no_newlines)
HEADER_VALUES = st.sampled_from(
    [b"@AUTH@", b"application/json", b"chunked", b"21600", b"-1", b"close", b"100-continue", b""]
) | st.binary(max_size=48).map(_no_newlines)
BODIES = (
    st.just(b"")
    | st.just(b'{"env": {"PATH": null}}')
    | st.binary(max_size=200)
    | JSON_VALUES.map(lambda v: json.dumps(v).encode())
)


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    line = b" ".join([draw(METHODS), draw(PATHS), draw(VERSIONS)])
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=8))
    body = draw(BODIES)
    framing = draw(st.sampled_from(["length", "chunked", "short-length", "none"]))
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "short-length":  # the rest of the body reads as a pipelined request
        headers.append((b"Content-Length", str(len(body) // 2).encode()))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return line + b"\r\nHost: 169.254.169.254\r\n" + head + b"\r\n" + body


def blocking_exchange(target: Target, data: bytes) -> list[int]:
    """Like `exchange`, with a blocking socket: hypothesis runs in a thread beside the loop."""
    raw = socket.create_connection((target.host, target.port), timeout=HEADER_DEADLINE + 1.5)
    conn = target.tls.wrap_socket(raw, server_hostname=target.host) if target.tls else raw
    received = b""
    with conn:
        try:
            conn.sendall(data.replace(b"@AUTH@", target.auth))
            while not STATUS.search(received):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (OSError, ssl.SSLError):
            pass  # reset or timed out: the connection was refused or cut, not answered 5xx
    return [int(s) for s in STATUS.findall(received)]


@pytest.mark.parametrize(
    ("name", "examples"),
    [
        ("imds", 200),
        ("container", 100),
        ("admin", 60),
        ("broker", 100),
        ("control", 100),
        ("webhook", 100),
    ],
)
async def test_generated_requests_never_get_a_5xx(
    name: str, examples: int, servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    """Hypothesis-generated request lines, headers, bodies, paths and methods: never a 5xx."""
    target = servers.target(name)
    answered: list[list[int]] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(raw_requests())
    def never_5xx(data: bytes) -> None:
        statuses = blocking_exchange(target, data)
        answered.append(statuses)
        assert all(status < 500 for status in statuses), (data[:200], statuses)

    await asyncio.to_thread(never_5xx)
    assert len(answered) >= examples
    assert sum(bool(statuses) for statuses in answered) >= examples // 2  # real answers, mostly
    assert unhandled_errors(caplog) == []
    await still_serving(servers)
