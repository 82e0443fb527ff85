"""Two end-to-end proofs in pods the webhook patched (link-local, `cni`) and the pod lab made:

1. **Throttled, every SDK retries.** A looping program of the pod holds the pod's rate bucket
   (four kept-alive connections on the container endpoint's secret path) while each SDK runs
   several times at once in the same pod: every run gets the pod's credentials, and the looper
   was really throttled (its own count of 503s and the sidecar's `throttled` count).
2. **The node's facts.** Two pods on two nodes in two zones (tests/podlab.py's nodes: each a
   namespace with its own 169.254.169.254 serving `metaproxy.testing.ec2_node`, the pod linked
   to it by a veth and prepared by the CNI plugin with `nodeMetadata`): `ec2-metadata` and the
   OpenTelemetry EC2 detector, which hard-code 169.254.169.254, report their own node's
   instance, zone and region, while each pod keeps its own task's credentials, and the node is
   never asked for its secrets.

Every client runs in its own process in the pod with exactly the app container's env (plus PATH,
HOME and LANG). Slow and dependent on `make clients`: marked `clients`, run by `make e2e`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from metaproxy.broker.server import BrokerServer
from metaproxy.identity.document import verify_document
from metaproxy.podnet import CONTAINER_PORT
from metaproxy.testing.ec2_node import SECRET_MARK, Instance
from metaproxy.testing.faultproxy import FaultProxy
from metaproxy.webhook.settings import DEFAULT_NODE_METADATA, SIDECAR_NAME
from tests.conftest import record_broker_secrets
from tests.podlab import (
    Node,
    Pod,
    PodLab,
    container,
    env_of,
    lab_directory,
    requests_by_path_class,
)
from tests.support import REPO, Pki, broker_config, issue
from tests.test_abuse_sidecar import set_sidecar_limits
from tests.test_client_matrix import (
    CLIENT_TIMEOUT,
    CLIENTS,
    INSTALLED,
    REGION,
    TENANT_ARN,
    Client,
    only_with_the_clients_marker,  # noqa: F401 - autouse: skips this module too but for `make e2e`
    require_lab,
    webhook_pod,
)
from tests.test_cni import SIDECAR_UID
from tests.test_netns import host_network_state

pytestmark = [pytest.mark.clients, pytest.mark.netns]

T = TypeVar("T")
Answers = dict[tuple[str, str], float]
Tally = dict[str, int]
Run = tuple[int, str, str, float]  # a process's exit status, stdout, stderr and seconds
S3_PYTHON = str(INSTALLED / "s3" / "bin" / "python")
LOOPER_PYTHON = "/usr/bin/python3"  # the looper needs the standard library only
# The sidecar's path classes that are IMDS (the rest: `container`, `throttled`).
IMDS_CLASSES = frozenset({"token", "credentials", "metadata"})


# --- the lab, a broker and moto --------------------------------------------------------------


@dataclass
class E2E:
    """A pod lab with its broker (Unix socket) and the recorder in front of moto."""

    lab: PodLab
    broker: BrokerServer
    recorder: FaultProxy
    moto_url: str
    policies: Path
    pki: Pki
    homes: Path
    temp: pytest.TempPathFactory
    buckets: set[str] = field(default_factory=set)

    async def pod(self, name: str, node: Node | None = None) -> Pod:
        """A link-local pod of acme as the webhook patches it; the task is named after it."""
        spec = await webhook_pod("cni")
        return await self.lab.add(name, spec, issue(self.pki, name, "acme"), node=node)

    def home(self, pod: Pod, name: str) -> Path:
        return pod.home(self.homes / f"{pod.name}-{name}")

    async def bucket(self, name: str) -> str:
        import boto3  # the test's own credentials (conftest: moto's fake ones), on the host

        if name not in self.buckets:
            s3 = boto3.client("s3", endpoint_url=self.moto_url, region_name=REGION)
            await asyncio.to_thread(s3.create_bucket, Bucket=name)
            self.buckets.add(name)
        return name

    def signers(self, since: float) -> set[str]:
        """The access key ids of every request sent to moto since `since` (monotonic)."""
        return {r.access_key_id for r in self.recorder.recorded_requests() if r.at >= since}

    def report(self, name: str, lines: list[str]) -> None:
        """The run's figures, for whoever reads it (and docs/compatibility.md), paste-ready."""
        text = "\n".join(lines) + "\n"
        (self.temp.getbasetemp() / name).write_text(text)
        print("\n" + text, file=sys.stderr)


@pytest_asyncio.fixture
async def e2e(
    pki: Pki, sts_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[E2E]:
    """Everything made for the test, and undone after it: the host's links, addresses, routes,
    namespaces and nat tables are as they were."""
    require_lab()
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    work = lab_directory()
    broker_socket = work / "broker.sock"
    homes = tmp_path / "homes"
    homes.mkdir()
    tag = secrets.token_hex(3)  # the lab's: what it makes on the host would carry it
    before = host_network_state(tag)
    async with AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        recorder = await stack.enter_async_context(FaultProxy(sts_url))
        config = broker_config(
            tmp_path, pki, sts_url, policies, socket=broker_socket, socket_group=str(SIDECAR_UID)
        )
        broker = await BrokerServer.start(replace(config, tls_cert=None, tls_key=None))
        stack.push_async_callback(broker.aclose)
        stack.callback(record_broker_secrets, broker)
        port = int(recorder.url.rsplit(":", 1)[1])
        lab = PodLab(work, tmp_path, broker_socket, ("127.0.0.1", port), tag=tag)
        stack.push_async_callback(lab.aclose)
        yield E2E(lab, broker, recorder, sts_url, policies, pki, homes, tmp_path_factory)
    assert host_network_state(tag) == before


async def served_key(pod: Pod) -> str:
    """The access key id the pod's sidecar serves now, asked at 127.0.0.1:8181 (a source
    address of its own: this takes nothing from the bucket the pod's clients share)."""
    status, body = await pod.get(
        CONTAINER_PORT, pod.env()["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]
    )
    assert status == 200, body[:200]
    key: str = json.loads(body)["AccessKeyId"]
    return key


def last_json(out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    assert lines, "the client printed nothing"
    printed: dict[str, Any] = json.loads(lines[-1])
    return printed


def output_of(out: str, err: str) -> dict[str, Any]:
    """The client's JSON line, or what it wrote instead (a crash's traceback)."""
    try:
        return last_json(out)
    except (AssertionError, ValueError):
        return {"error": f"no JSON line: {out[-500:]} {err[-1500:]}"}


def delta(before: Answers, after: Answers) -> Answers:
    """What the sidecar answered in between: (path class, status) → count; admin aside."""
    return {
        key: count - before.get(key, 0.0)
        for key, count in sorted(after.items())
        if count > before.get(key, 0.0) and key[0] != "admin"
    }


# --- 1. throttled, every SDK retries ---------------------------------------------------------

THROTTLED_CLIENTS = (
    "aws-sdk-go-v2",
    "aws-sdk-core (Ruby)",
    "AWS SDK for JavaScript v3",
    "botocore",
    "botocore (bookworm)",
    "obstore",
)
RUNS = 5  # of each client, at once: their first requests arrive together, as a pod's do at start
# The tenant's `[limits.sidecar]` for this test (the defaults, 50 a second, refuse the looper only
# one request in four). A bucket of 6 at 10 a second: the looper, over its fair share, may take
# only the top half, so it is refused two requests in three, and five runs of each client that
# ask at once share the other half (3) and the refill, so some are answered 503 and retry.
# Thirty fetches at once cannot all fit a pod allowed 2 a second within the SDKs' retries; the
# fair share's behaviour at such rates is tests/test_fair_share.py's.
LIMITS = {"credentials_rps": 10, "burst": 6}

LOOPER = r'''
"""Four kept-alive connections looping GETs on the pod's secret path at 169.254.170.2. Each line
on stdin is answered with the counts so far, one JSON line: `pause` first lets every connection
finish its request and park; `resume` sets them going again; end of input stops them."""
import http.client, json, os, sys, threading

WORKERS = 4
path = os.environ["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]
counts = {"ok": 0, "throttled": 0, "other": 0, "errors": 0}
state = threading.Condition()
running, stopping, parked = True, False, 0

def ask(connection):
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        answer.read()
    except (OSError, http.client.HTTPException):
        connection.close()  # reopened by the next request
        return "errors"
    return {200: "ok", 503: "throttled"}.get(answer.status, "other")

def work():
    global parked
    connection = http.client.HTTPConnection("169.254.170.2", 80, timeout=10)
    while True:
        with state:
            while not running and not stopping:
                parked += 1
                state.notify_all()
                state.wait()
                parked -= 1
            if stopping:
                break
        outcome = ask(connection)
        with state:
            counts[outcome] += 1
    connection.close()

workers = [threading.Thread(target=work) for _ in range(WORKERS)]
for worker in workers:
    worker.start()
for line in sys.stdin:
    with state:
        if line.strip() == "pause":
            running = False
            state.wait_for(lambda: parked == WORKERS)
        elif line.strip() == "resume":
            running = True
            state.notify_all()
        print(json.dumps(counts), flush=True)
with state:
    stopping = True
    state.notify_all()
for worker in workers:
    worker.join()
print(json.dumps(counts), flush=True)
'''


class Looper:
    """The looping program in its pod, paused and resumed at will (its counts exact then)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def _say(self, command: str) -> Tally:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        assert line, f"the looper exited: {await self._stderr()}"
        tally: Tally = json.loads(line)
        return tally

    async def _stderr(self) -> str:
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode()[-2000:]

    async def pause(self) -> Tally:
        """Every connection parked, its last answer read: (counts so far)."""
        return await self._say("pause")

    async def resume(self) -> None:
        await self._say("resume")

    async def stop(self) -> Tally:
        assert self.process.stdin is not None
        self.process.stdin.close()
        out, err = await asyncio.wait_for(self.process.communicate(), 30)
        assert self.process.returncode == 0, err.decode()[-2000:]
        return last_json(out.decode())

    async def aclose(self) -> None:
        """Gone, whatever state it is in."""
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


@dataclass
class Window:
    """One client's runs, all at once, and what the sidecar answered meanwhile."""

    client: Client
    runs: list[tuple[int, dict[str, Any], float]]  # (exit status, what it printed, seconds)
    signers: set[str]  # access key ids of its requests to moto
    answers: Answers  # the sidecar's answers in the window, the looper's included
    looper: Tally  # the looper's answers in the window

    @property
    def served(self) -> int:
        """The clients' credential answers (200) at the container endpoint."""
        return round(self.answers.get(("container", "200"), 0.0)) - self.looper["ok"]

    @property
    def throttled(self) -> int:
        """The clients' 503s at the container endpoint (each retried, if every run worked)."""
        return round(self.answers.get(("throttled", "503"), 0.0)) - self.looper["throttled"]

    @property
    def imds(self) -> int:
        return round(sum(n for (cls, _), n in self.answers.items() if cls in IMDS_CLASSES))

    @property
    def seconds(self) -> float:
        return max(seconds for _, _, seconds in self.runs)

    def row(self) -> str:
        versions = sorted({str(printed.get("version")) for _, printed, _ in self.runs})
        worked = sum(rc == 0 for rc, _, _ in self.runs)
        asked = self.served + self.throttled
        errors = sorted({str(p["error"])[:300] for _, p, _ in self.runs if "error" in p})
        return (
            f"| {self.client.name} | {', '.join(versions)} | {worked}/{len(self.runs)} | "
            f"{asked} | {self.throttled} | {self.seconds:.1f} s | <!-- looper meanwhile: "
            f"{self.looper['ok']} answered, {self.looper['throttled']} throttled; "
            f"sidecar: {self.answers} {errors or ''} -->"
        )


def minus(after: Tally, before: Tally) -> Tally:
    return {key: after[key] - before.get(key, 0) for key in after}


async def window(
    pod: Pod, looper: Looper, work: Coroutine[Any, Any, T]
) -> tuple[T, Answers, Tally]:
    """`work` with the looper running; the sidecar's answers and the looper's meanwhile, both
    read with the looper parked, so the difference is exactly the clients'."""
    looper_before = await looper.pause()
    before = requests_by_path_class(await pod.metrics())
    await looper.resume()
    result = await work
    looper_after = await looper.pause()
    after = requests_by_path_class(await pod.metrics())
    await looper.resume()
    return result, delta(before, after), minus(looper_after, looper_before)


async def runs(e2e: E2E, pod: Pod, client: Client, bucket: str) -> list[Run]:
    """The client RUNS times at once in the pod, each in its own process and home."""
    homes = [e2e.home(pod, f"{client.slug}-{n}") for n in range(RUNS)]
    return await asyncio.gather(
        *(pod.run(client.command(bucket), home, CLIENT_TIMEOUT) for home in homes)
    )


@pytest.mark.asyncio
@pytest.mark.timeout(900)
async def test_every_sdk_gets_credentials_from_a_pod_whose_bucket_a_looper_holds(
    e2e: E2E,
) -> None:
    """While a looper of the pod is throttled hard, each SDK run RUNS times at once gets the
    pod's credentials every time, retrying the sidecar's 503s where it met them."""
    clients = [next(c for c in CLIENTS if c.name == name) for name in THROTTLED_CLIENTS]
    if missing := [m for c in clients for m in c.missing()]:
        pytest.fail(f"not installed ({', '.join(missing)}): run `make clients`")
    await set_sidecar_limits(e2e.broker, e2e.policies, **LIMITS)
    pod = await e2e.pod("throttled")
    keys = {await served_key(pod)}
    process = await pod.spawn(
        [LOOPER_PYTHON, "-c", LOOPER], e2e.home(pod, "looper"), stdin=asyncio.subprocess.PIPE
    )
    looper = Looper(process)
    windows: list[Window] = []
    try:
        await asyncio.sleep(1.0)  # the looper empties the top of the bucket, and stays there
        for client in clients:
            bucket = await e2e.bucket(f"e2e-{client.slug}") if client.kind == "s3" else ""
            started = time.monotonic()
            done, answers, looped = await window(pod, looper, runs(e2e, pod, client, bucket))
            results = [(rc, output_of(out, err), seconds) for rc, out, err, seconds in done]
            windows.append(Window(client, results, e2e.signers(started), answers, looped))
        total = await looper.stop()
    finally:
        await looper.aclose()
    keys.add(await served_key(pod))
    report = [
        "| Client | Version | Runs with the pod's credentials | Credential requests | "
        "of them 503 (then retried) | Slowest run |",
        "|---|---|---|---|---|---|",
        *(w.row() for w in windows),
        f"looper: {total['ok']} answered, {total['throttled']} throttled (503), "
        f"{total['other']} other, {total['errors']} errors",
    ]
    e2e.report("pods-e2e-throttling.md", report)

    # The looper really was throttled, by its own count and by the sidecar's.
    assert total["throttled"] > 0 and total["errors"] == 0, total
    throttled_by_sidecar = sum(w.answers.get(("throttled", "503"), 0.0) for w in windows)
    assert throttled_by_sidecar >= sum(w.looper["throttled"] for w in windows) > 0
    for w in windows:
        for rc, printed, _ in w.runs:
            assert rc == 0, f"{w.client.name} failed: {printed}"
            if w.client.kind == "sts":
                assert printed["arn"] == TENANT_ARN.format(task="throttled"), printed
                assert printed["access_key"] in keys, printed
            else:
                assert f"matrix/{w.client.slug}" in printed["listed"], printed
        assert w.signers and w.signers <= keys, f"{w.client.name} signed with {w.signers}"
        # By the container endpoint only (no fallback to IMDS), one success per run.
        assert (w.imds, w.served) == (0, RUNS), (w.client.name, w.answers, w.looper)
    # Five runs at once, three tokens for them: the SDKs met 503s, and retried past them.
    assert sum(w.throttled for w in windows) > 0, [w.row() for w in windows]


# --- 2. the node's facts ----------------------------------------------------------------------

NODES = {
    "node-a": Instance(
        instance_id="i-0e2e00000000000a1",
        instance_type="m6i.large",
        zone="us-east-1a",
        zone_id="use1-az6",
        local_ipv4="198.19.1.17",
    ),
    "node-b": Instance(
        instance_id="i-0e2e00000000000b2",
        instance_type="c7g.xlarge",
        zone="us-east-1b",
        zone_id="use1-az1",
        local_ipv4="198.19.2.42",
    ),
}
# What the node keeps to itself: no path asked of its IMDS may hold one of these.
NODE_SECRET_PATHS = ("iam", "identity-credentials", "public-keys", "user-data", "dynamic")
NODE_ACCESS_KEY = "ASIANODE"  # the emulator's node role's key id

EC2_METADATA = r'''
"""PyPI's ec2-metadata (169.254.169.254, IMDSv2): the node's facts as it reports them, the
role's access key id; then the signed identity document, read as an instance reads it."""
import json, urllib.request
from importlib.metadata import version
from ec2_metadata import ec2_metadata as imds

def raw(path, token):
    request = urllib.request.Request(
        "http://169.254.169.254/latest/" + path, headers={"X-aws-ec2-metadata-token": token}
    )
    return urllib.request.urlopen(request, timeout=5).read().decode()

credentials = imds.iam_security_credentials
put = urllib.request.Request(
    "http://169.254.169.254/latest/api/token",
    method="PUT",
    headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
)
token = urllib.request.urlopen(put, timeout=5).read().decode()
print(json.dumps({
    "version": version("ec2-metadata"),
    "instance_id": imds.instance_id,
    "instance_type": imds.instance_type,
    "availability_zone": imds.availability_zone,
    "availability_zone_id": imds.availability_zone_id,
    "region": imds.region,
    "private_ipv4": imds.private_ipv4,
    "private_hostname": imds.private_hostname,
    "account_id": imds.account_id,
    "access_key": credentials["AccessKeyId"] if credentials else None,
    "document": raw("dynamic/instance-identity/document", token),
    "signature": raw("dynamic/instance-identity/signature", token),
}))
'''
OTEL_EC2 = r'''
"""The OpenTelemetry EC2 resource detector (169.254.169.254, IMDSv2): the resource it makes."""
import json
from importlib.metadata import version
from opentelemetry.sdk.extension.aws.resource.ec2 import AwsEc2ResourceDetector

resource = AwsEc2ResourceDetector(raise_on_error=True).detect()
attributes = {key: str(value) for key, value in resource.attributes.items()}
print(json.dumps({"version": version("opentelemetry-sdk-extension-aws"), **attributes}))
'''


@dataclass
class Seen:
    """What each client of a pod printed."""

    pod: Pod
    ec2_metadata: dict[str, Any]
    otel: dict[str, Any]
    botocore: dict[str, Any]
    key: str  # the access key id its sidecar serves
    outputs: str  # everything the clients wrote, stdout and stderr


async def clients_in(e2e: E2E, pod: Pod) -> Seen:
    botocore = next(c for c in CLIENTS if c.name == "botocore")
    programs = {
        "ec2-metadata": [S3_PYTHON, "-c", EC2_METADATA],
        "otel": [S3_PYTHON, "-c", OTEL_EC2],
        "botocore": botocore.command(""),
    }
    printed: dict[str, dict[str, Any]] = {}
    outputs = []
    for name, argv in programs.items():
        rc, out, err, _ = await pod.run(argv, e2e.home(pod, name), CLIENT_TIMEOUT)
        assert rc == 0, f"{name} in {pod.name}: {out} {err[-2000:]}"
        printed[name] = last_json(out)
        outputs += [out, err]
    return Seen(
        pod,
        printed["ec2-metadata"],
        printed["otel"],
        printed["botocore"],
        await served_key(pod),
        "\n".join(outputs),
    )


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_pods_on_two_nodes_report_their_own_node_and_keep_their_own_credentials(
    e2e: E2E,
) -> None:
    """ec2-metadata and OpenTelemetry's EC2 detector report each pod's own node (instance,
    zone, zone id, region, address, type); each pod's credentials are its own task's, never the
    node's; the nodes are never asked for their role, keys, user-data or documents."""
    seen: list[Seen] = []
    for name, instance in NODES.items():
        node = await e2e.lab.add_node(name, instance)
        pod = await e2e.pod(f"on-{name}", node=node)
        sidecar_env = env_of(container(pod.spec, SIDECAR_NAME))
        assert sidecar_env["METAPROXY_HOST_METADATA_ALLOW"] == ",".join(DEFAULT_NODE_METADATA)
        assert "METAPROXY_HOST_METADATA_INTERFACE" not in sidecar_env  # its default: auto
        seen.append(await clients_in(e2e, pod))
    nodes = [s.pod.node for s in seen]
    asked = {node.name: node.asked() for node in nodes if node is not None}
    logs = {s.pod.name: s.pod.sidecar_log.read_text(errors="replace") for s in seen}
    e2e.report(
        "pods-e2e-node-facts.md",
        [
            f"{s.pod.name}: ec2-metadata {json.dumps(without_document(s.ec2_metadata))}\n"
            f"  otel {json.dumps(s.otel)}\n  botocore {json.dumps(s.botocore)}"
            for s in seen
        ]
        + [f"{name} asked: {sorted(set(paths))}" for name, paths in asked.items()],
    )

    for s, instance in zip(seen, NODES.values(), strict=True):
        hostname = f"ip-{instance.local_ipv4.replace('.', '-')}.ec2.internal"
        assert without_document(s.ec2_metadata) == {
            "version": "3.0.0",
            "instance_id": instance.instance_id,
            "instance_type": instance.instance_type,
            "availability_zone": instance.zone,
            "availability_zone_id": instance.zone_id,
            "region": instance.region,
            "private_ipv4": instance.local_ipv4,
            "private_hostname": hostname,
            "account_id": "111111111111",  # the task's account, never the node's
            "access_key": s.key,
        }
        assert {k: v for k, v in s.otel.items() if k != "version"} == {
            "cloud.provider": "aws",
            "cloud.platform": "aws_ec2",
            "cloud.account.id": "111111111111",
            "cloud.region": instance.region,
            "cloud.availability_zone": instance.zone,
            "host.id": instance.instance_id,
            "host.type": instance.instance_type,
            "host.name": hostname,
        }
        # The document the detector read is the broker's, signed, naming the node and the task.
        document = s.ec2_metadata["document"]
        assert verify_document(e2e.pki.document_jwks, document, s.ec2_metadata["signature"])
        facts = json.loads(document)
        assert (facts["instanceId"], facts["availabilityZone"], facts["tenant"]) == (
            instance.instance_id,
            instance.zone,
            "acme",
        )
        assert s.botocore["arn"] == TENANT_ARN.format(task=s.pod.name)
        assert s.botocore["access_key"] == s.key
    assert seen[0].key != seen[1].key

    # Nothing the nodes keep to themselves: not asked of them, not in any output or log.
    for name, paths in asked.items():
        assert "/latest/meta-data/placement/availability-zone" in paths, (name, paths)
        assert [p for p in paths if any(word in p for word in NODE_SECRET_PATHS)] == [], name
    for text in [s.outputs for s in seen] + list(logs.values()):
        assert SECRET_MARK not in text
        assert NODE_ACCESS_KEY not in text


def without_document(printed: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in printed.items() if k not in ("document", "signature")}
