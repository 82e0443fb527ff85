"""Every SDK generation and real client gets its pod's credentials with exactly the environment
the webhook injects, and nothing else (docs/compatibility.md is the table this run checks).

The webhook (its real app, fed a real AdmissionReview) patches a pod once with `link_local="cni"`
and once with `"off"`; the pod lab (tests/podlab.py) makes each pod on this host: its network
namespace prepared by the CNI plugins as a runtime runs them, its sidecar with the env of the
sidecar container. Each client then runs in its own process inside a pod, with the app
container's env and only PATH, HOME and LANG besides; the STS or S3 endpoint is an argument.
Which credentials it used is read from what it printed (the ARN moto answers for the signing
key), from the recorder in front of moto (the SigV4 key of every request: moto checks no
signature), and which way it reached the sidecar from the sidecar's own /metrics.

Slow and dependent on `make clients`: marked `clients`, run by `make e2e`, skipped otherwise.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from metaproxy.broker.server import BrokerServer
from metaproxy.podnet import CONTAINER_PORT
from metaproxy.testing.faultproxy import FaultProxy
from metaproxy.webhook.app import build_app
from metaproxy.webhook.settings import AUTH_VOLUME, InjectionSettings, LinkLocal
from tests.conftest import record_broker_secrets
from tests.podlab import (
    IN_POD_UPSTREAM,
    Pod,
    PodLab,
    lab_directory,
    process_status,
    requests_by_path_class,
    root_mount_options,
)
from tests.support import REPO, Pki, broker_config, cannot_run, issue
from tests.test_cni import PLUGIN, PLUGINS, SIDECAR_UID, unprivileged_python
from tests.test_netns import require_netns
from tests.test_webhook import apply_patch, decoded_patch, labelled_pod, post_review, review

Mode = Literal["cni", "off"]
Answers = dict[tuple[str, str], float]
MODES: tuple[Mode, ...] = ("cni", "off")
DOC = REPO / "docs" / "compatibility.md"
CLIENTS_DIR = REPO / "tests" / "clients"
INSTALLED = REPO / ".clients"
REGION = "us-east-1"
TENANT_ARN = "arn:aws:sts::111111111111:assumed-role/acme-app/acme.{task}"
TENANT_ROLE = "arn:aws:iam::111111111111:role/acme-app"
CLIENT_TIMEOUT = 120.0
# The pod's app containers: the matrix runs its clients in `app` (the image's user, root); `worker`
# runs as a user of its own, as the restricted Pod Security profile has it, and so reads the off
# mode's token file as neither root nor the sidecar's user.
WORKER_UID = 1000
APP_CONTAINERS: list[dict[str, Any]] = [
    {"name": "app", "image": "app:1"},
    {
        "name": "worker",
        "image": "app:1",
        "securityContext": {
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "runAsNonRoot": True,
        },
    },
]
# The sidecar's path classes (metaproxy_sidecar_requests_total) that are IMDS.
IMDS_CLASSES = frozenset({"token", "credentials", "metadata"})
# What each mode's app env can lead a client to, by the path class the sidecar counted.
PATH_NAMES: dict[tuple[Mode, str], str] = {
    ("cni", "container"): "RELATIVE_URI at 169.254.170.2",
    ("cni", "imds"): "IMDS at 169.254.169.254",
    ("off", "container"): "FULL_URI on loopback",
    ("off", "imds"): "IMDS at the endpoint variable",
}
MODE_NAMES: dict[str, Mode] = {"link-local (cni)": "cni", "off": "off"}
Result = Literal["works", "unsupported"]
RESULTS: dict[str, Result] = {"works": "works", "unsupported": "unsupported"}
APP_VARIABLES: dict[Mode, set[str]] = {
    "cni": {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_REGION", "AWS_DEFAULT_REGION"},
    "off": {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    },
}

pytestmark = [pytest.mark.clients, pytest.mark.netns]


# --- the clients ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """One client as the doc names it, and its program: `{endpoint}`/`{bucket}` filled in."""

    name: str
    kind: Literal["sts", "s3", "imds"]
    argv: tuple[str, ...]

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    def command(self, bucket: str) -> list[str]:
        return [a.format(endpoint=IN_POD_UPSTREAM, bucket=bucket) for a in self.argv]

    def missing(self) -> list[str]:
        """Files of the program that are not there (absolute paths and interpreters)."""
        return [a for a in self.argv if a.startswith("/") and not Path(a).exists()]


def _py(venv: Path, program: str, *args: str) -> tuple[str, ...]:
    return (str(venv / "bin" / "python"), str(CLIENTS_DIR / program), *args)


STS = "{endpoint}"
S3 = ("{endpoint}", "{bucket}")
BOOKWORM_VENV = INSTALLED / "botocore-1.29"
NODE = shutil.which("node") or "/usr/bin/node"
CLIENTS = (
    Client("botocore (bookworm)", "sts", _py(BOOKWORM_VENV, "botocore_client.py", STS)),
    Client("botocore", "sts", _py(REPO / ".venv", "botocore_client.py", STS)),
    Client("boto3", "sts", _py(REPO / ".venv", "boto3_client.py", STS)),
    Client("aiobotocore", "sts", _py(INSTALLED / "aiobotocore", "aiobotocore_client.py", STS)),
    Client(
        "AWS CLI v1",
        "sts",
        ("/bin/sh", str(CLIENTS_DIR / "aws_cli.sh"), str(REPO / ".venv/bin/aws"), STS),
    ),
    Client(
        "AWS CLI v2 (Debian)",
        "sts",
        ("/bin/sh", str(CLIENTS_DIR / "aws_cli.sh"), "/usr/bin/aws", STS),
    ),
    Client("AWS SDK for JavaScript v2", "sts", (NODE, str(CLIENTS_DIR / "js" / "sdk_v2.mjs"), STS)),
    Client("AWS SDK for JavaScript v3", "sts", (NODE, str(CLIENTS_DIR / "js" / "sdk_v3.mjs"), STS)),
    Client("aws-sdk-go", "sts", (str(INSTALLED / "bin" / "aws-sdk-go"), STS)),
    Client("aws-sdk-go-v2", "sts", (str(INSTALLED / "bin" / "aws-sdk-go-v2"), STS)),
    Client("aws-sdk-core (Ruby)", "sts", ("/usr/bin/ruby", str(CLIENTS_DIR / "ruby_sdk.rb"), STS)),
    Client("ec2-metadata", "imds", _py(INSTALLED / "s3", "ec2_metadata_client.py")),
    Client("obstore", "s3", _py(INSTALLED / "s3", "obstore_client.py", *S3)),
    Client("pyarrow", "s3", _py(INSTALLED / "s3", "pyarrow_client.py", *S3)),
    Client("minio", "s3", _py(INSTALLED / "s3", "minio_client.py", *S3)),
    Client("s3cmd", "s3", ("/bin/sh", str(CLIENTS_DIR / "s3cmd.sh"), *S3)),
)
CELLS = [(client, mode) for mode in MODES for client in CLIENTS]


# --- the doc ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row of the doc's table: what a client does in a mode."""

    client: str
    version: str  # "1.29.27", or "≥ 1.34" for what .venv installs unpinned
    mode: Mode
    path: str  # PATH_NAMES joined by " + ", or "none"
    result: Result

    def admits(self, version: str) -> bool:
        if self.version.startswith("≥"):
            return _numbers(version) >= _numbers(self.version.removeprefix("≥").strip())
        return version == self.version


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def doc_rows(text: str) -> dict[tuple[str, Mode], Row]:
    """The table under "## The matrix": | Client | Version | Mode | Path taken | Result |."""
    section = text.split("## The matrix", 1)[1].split("\n## ", 1)[0]
    rows: dict[tuple[str, Mode], Row] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("Client", "") or set(cells[0]) <= {"-", ":"}:
            continue
        client, version, mode, path, result = (c.replace("`", "") for c in cells)
        outcome = RESULTS.get(result.split(":", 1)[0].strip())
        assert outcome is not None, f"the result must start with works or unsupported: {line}"
        assert mode in MODE_NAMES, f"the mode must be one of {', '.join(MODE_NAMES)}: {line}"
        key = (client, MODE_NAMES[mode])
        assert key not in rows, f"two rows for {key}"
        rows[key] = Row(client, version, MODE_NAMES[mode], path, outcome)
    return rows


@dataclass
class Observed:
    """What one client did in one pod, as this run saw it."""

    client: Client
    mode: Mode
    version: str
    path: str
    result: Result
    seconds: float
    printed: dict[str, Any]  # the client's JSON line
    answers: Answers  # what the sidecar answered it: (path class, status) → count

    @property
    def detail(self) -> str:
        said = {k: v for k, v in self.printed.items() if k in ("provider", "error", "instance_id")}
        answered = ", ".join(f"{c} {s} ×{n:g}" for (c, s), n in self.answers.items())
        return f"{said} sidecar: {answered or 'nothing'}"

    def as_row(self) -> str:
        mode = next(name for name, m in MODE_NAMES.items() if m == self.mode)
        return f"| {self.client.name} | {self.version} | {mode} | {self.path} | {self.result} |"


OBSERVED: dict[tuple[str, Mode], Observed] = {}


# --- the lab ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def only_with_the_clients_marker(request: pytest.FixtureRequest) -> None:
    """`make test` runs everything not deselected; this suite is `make e2e`'s alone."""
    if "clients" not in (request.config.option.markexpr or ""):
        pytest.skip("the client matrix runs with `make e2e` (pytest -m clients)")


def require_lab() -> None:
    """Root, namespaces and the CNI plugins: a skip outside CI, a failure in CI."""
    require_netns()
    missing = [str(p) for p in (PLUGINS / "loopback", PLUGIN) if not p.exists()]
    if missing:
        cannot_run(f"{', '.join(missing)} missing (make clients; pip install -e .)")


@dataclass
class Matrix:
    """Both pods, the recorder in front of moto, and how to reach moto from the host."""

    pods: dict[Mode, Pod]
    secrets: dict[Mode, str]  # each pod's credentials path (the webhook's secret)
    recorder: FaultProxy
    moto_url: str
    lab: PodLab
    homes: Path
    buckets: set[str] = field(default_factory=set)

    async def served_key(self, mode: Mode) -> str:
        """The access key id the pod's sidecar serves right now."""
        status, body = await self.pods[mode].get(CONTAINER_PORT, self.secrets[mode])
        assert status == 200, body[:200]
        key: str = json.loads(body)["AccessKeyId"]
        return key

    async def bucket(self, name: str) -> str:
        import boto3  # the test's own credentials (conftest: moto's fake ones), on the host

        if name not in self.buckets:
            s3 = boto3.client("s3", endpoint_url=self.moto_url, region_name=REGION)
            await asyncio.to_thread(s3.create_bucket, Bucket=name)
            self.buckets.add(name)
        return name

    def home(self, mode: Mode, name: str, container: str = "app") -> Path:
        return self.pods[mode].home(self.homes / f"{mode}-{name}", container)


async def webhook_pod(link_local: LinkLocal) -> dict[str, Any]:
    """A labelled pod as the real webhook app patches it (AdmissionReview in, JSON Patch out)."""
    settings = InjectionSettings(
        image="registry.example.com/metaproxy:test",
        broker_url="https://metaproxy-broker.metaproxy.svc:8443",
        link_local=link_local,
        region=REGION,
    )
    pod = labelled_pod(containers=APP_CONTAINERS)
    async with TestClient(TestServer(build_app(settings))) as client:
        status, body = await post_review(client, review(pod))
    assert status == 200, body
    assert body["response"]["allowed"] is True
    return apply_patch(pod, decoded_patch(body["response"]))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def matrix(
    pki: Pki, sts_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Matrix]:
    """Both pods ready, each with its own sidecar; the broker on a Unix socket, in-process."""
    require_lab()
    tmp = tmp_path_factory.mktemp("matrix")
    policies = tmp / "policies"
    shutil.copytree(REPO / "policies", policies)
    work = lab_directory()
    broker_socket = work / "broker.sock"
    async with AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        recorder = await stack.enter_async_context(FaultProxy(sts_url))
        config = broker_config(
            tmp, pki, sts_url, policies, socket=broker_socket, socket_group=str(SIDECAR_UID)
        )
        broker = await BrokerServer.start(replace(config, tls_cert=None, tls_key=None))
        stack.push_async_callback(broker.aclose)
        stack.callback(record_broker_secrets, broker)
        port = int(recorder.url.rsplit(":", 1)[1])
        lab = PodLab(work, tmp, broker_socket, ("127.0.0.1", port))
        stack.push_async_callback(lab.aclose)
        pods: dict[Mode, Pod] = {}
        secrets: dict[Mode, str] = {}
        for mode in MODES:
            spec = await webhook_pod(mode)
            pods[mode] = await lab.add(f"matrix-{mode}", spec, issue(pki, f"matrix-{mode}", "acme"))
            env = pods[mode].env()
            full = urlsplit(env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI", "")).path
            secrets[mode] = env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or full
        homes = tmp / "homes"
        homes.mkdir()
        yield Matrix(pods, secrets, recorder, sts_url, lab, homes)
        _write_report(tmp_path_factory.getbasetemp())


def _write_report(directory: Path) -> None:
    """The observed table (paste-ready for the doc) and timings, for whoever reads the run."""
    lines = [o.as_row() + f" <!-- {o.seconds:.2f} s: {o.detail} -->" for o in OBSERVED.values()]
    (directory / "client-matrix.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines), file=sys.stderr)


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", [c["name"] for c in APP_CONTAINERS])
async def test_apps_get_exactly_the_webhooks_environment(
    matrix: Matrix, mode: Mode, name: str
) -> None:
    """A process of each app container sees the webhook's variables, PATH, HOME and LANG, and
    nothing else, as the user its securityContext names."""
    pod = matrix.pods[mode]
    home = matrix.home(mode, f"env-{name}", name)
    rc, out, err, _ = await pod.run(["/usr/bin/env", "-0"], home, name=name)
    assert rc == 0, err
    seen = dict(entry.split("=", 1) for entry in out.split("\0") if entry)
    assert seen == pod.process_env(home, name)
    assert set(pod.env(name)) == APP_VARIABLES[mode]
    assert pod.env(name)["AWS_REGION"] == pod.env(name)["AWS_DEFAULT_REGION"] == REGION
    rc, out, err, _ = await pod.run(["/usr/bin/id", "-u"], home, name=name)
    assert (rc, int(out)) == (0, pod.user(name)[0]), err


@pytest.mark.asyncio(loop_scope="module")
async def test_a_non_root_app_reads_the_off_modes_token_file(matrix: Matrix) -> None:
    """obstore, which reads FULL_URI only together with the token file and sends the file's
    token, gets the pod's credentials as a user that is neither root nor the sidecar's."""
    client = next(c for c in CLIENTS if c.name == "obstore")
    bucket = await matrix.bucket("matrix-obstore-off-worker")
    started = time.monotonic()
    home = matrix.home("off", "obstore-worker", "worker")
    rc, out, err, _ = await matrix.pods["off"].run(client.command(bucket), home, name="worker")
    assert rc == 0, out + err
    signers = {r.access_key_id for r in matrix.recorder.recorded_requests() if r.at >= started}
    assert signers == {await matrix.served_key("off")}
    assert matrix.pods["off"].user("worker") == (WORKER_UID, WORKER_UID)
    token = matrix.pods["off"].volume(AUTH_VOLUME) / "token"
    assert (token.stat().st_mode & 0o777, token.stat().st_uid) == (0o644, SIDECAR_UID)
    assert not token.read_bytes().endswith(b"\n")  # SDKs send the file's bytes as the header


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("mode", MODES)
async def test_each_sidecar_runs_as_its_container_spec_says(matrix: Matrix, mode: Mode) -> None:
    """uid 10001 (where an interpreter allows it, else root as in test_cni), no new privileges,
    no capability, and a read-only root filesystem."""
    pid = matrix.lab.sidecar_pid(matrix.pods[mode])
    assert pid is not None
    status = process_status(pid)
    if unprivileged_python()[0][0] == "setpriv":
        uids = status["Uid"].split()
        assert (uids, status["NoNewPrivs"], int(status["CapBnd"], 16)) == (
            [str(SIDECAR_UID)] * 4,
            "1",
            0,
        )
    assert "ro" in root_mount_options(pid)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("mode", MODES)
async def test_no_credentials_without_this_pods_secret(matrix: Matrix, mode: Mode) -> None:
    """At every address the mode gives the pod, the secret path gets the pod's credentials and
    nothing else does: not /v1/credentials without its token, not another secret."""
    pod, secret = matrix.pods[mode], matrix.secrets[mode]
    addresses = [("127.0.0.1", CONTAINER_PORT)]
    if mode == "cni":
        addresses += [("169.254.170.2", 80), ("169.254.170.23", 80)]
    guesses = ("/v1/credentials", "/v2/credentials/" + "A" * 32, secret[:-1], secret + "/", "/")
    for host, port in addresses:
        status, body = await pod.get(port, secret, host)
        assert (status, json.loads(body)["RoleArn"]) == (200, TENANT_ROLE)
        assert [(await pod.get(port, path, host))[0] for path in guesses] == [
            401,
            404,
            404,
            404,
            404,
        ]


def test_the_doc_has_one_row_per_client_and_mode() -> None:
    """docs/compatibility.md lists every client of this matrix in both modes, and no other."""
    assert set(doc_rows(DOC.read_text())) == {(c.name, m) for c, m in CELLS}


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("client", "mode"), CELLS, ids=[f"{mode}-{client.slug}" for client, mode in CELLS]
)
async def test_client_gets_this_pods_credentials_or_none(
    matrix: Matrix, client: Client, mode: Mode
) -> None:
    """The client gets this pod's role (or fails cleanly where the doc says it is unsupported),
    by the path the doc names."""
    if missing := client.missing():
        pytest.fail(f"{client.name} is not installed ({', '.join(missing)}): run `make clients`")
    row = doc_rows(DOC.read_text()).get((client.name, mode))
    pod = matrix.pods[mode]
    bucket = await matrix.bucket(f"matrix-{client.slug}-{mode}"[:63])
    keys = {await matrix.served_key(mode)}
    before = requests_by_path_class(await pod.metrics())
    started = time.monotonic()  # the recorder's clock
    rc, out, err, seconds = await pod.run(
        client.command(bucket), matrix.home(mode, client.slug), CLIENT_TIMEOUT
    )
    after = requests_by_path_class(await pod.metrics())
    keys.add(await matrix.served_key(mode))  # a refresh during the run changes the key
    signers = {r.access_key_id for r in matrix.recorder.recorded_requests() if r.at >= started}
    lines = out.strip().splitlines()
    assert lines, f"{client.name} printed nothing (exit {rc}): {err[-2000:]}"
    got: dict[str, Any] = json.loads(lines[-1])

    answers = _answers(before, after)
    observed = Observed(
        client, mode, str(got.get("version")), _path(mode, answers),
        "works" if rc == 0 else "unsupported", seconds, got, answers,
    )  # fmt: skip
    OBSERVED[(client.name, mode)] = observed

    if rc == 0:
        # This pod's credentials and no one else's, whichever way the client proves it.
        if client.kind == "sts":
            assert got["arn"] == TENANT_ARN.format(task=f"matrix-{mode}")
            if "access_key" in got:
                assert got["access_key"] in keys
        if client.kind == "imds":
            assert got["access_key"] in keys
        if client.kind == "s3":
            assert f"matrix/{client.slug}" in got["listed"], got
        if client.kind in ("sts", "s3"):
            assert signers and signers <= keys, f"signed by {signers}, the pod serves {keys}"
    else:
        # Failing cleanly: it said why, and nothing it sent was signed with anyone's keys.
        assert rc == 1 and got.get("error"), (rc, out, err[-2000:])
        assert "arn" not in got and "access_key" not in got
        assert signers <= {""}, f"{client.name} signed requests with {signers}"
    if mode == "cni":
        assert observed.result == "works", f"link-local must serve every client: {got}"
    assert row is not None, (
        f"docs/compatibility.md has no row for this; observed:\n{observed.as_row()}"
    )
    assert (observed.path, observed.result) == (row.path, row.result), (
        f"docs/compatibility.md says\n{row}\nthis run observed\n{observed.as_row()}\n"
        f"({observed.detail})"
    )
    assert row.admits(observed.version), f"doc version {row.version}, ran {observed.version}"


def _answers(before: Answers, after: Answers) -> Answers:
    """What the sidecar answered during the run: (path class, status) → count; admin aside."""
    return {
        key: count - before.get(key, 0.0)
        for key, count in sorted(after.items())
        if count > before.get(key, 0.0) and key[0] != "admin"
    }


def _path(mode: Mode, answers: Answers) -> str:
    """Which of the sidecar's APIs the run used, named as in the doc."""
    kinds = sorted({"imds" if name in IMDS_CLASSES else name for name, _ in answers})
    return " + ".join(PATH_NAMES.get((mode, kind), kind) for kind in kinds) or "none"


def test_doc_rows_parse_versions_and_bounds() -> None:
    """An exact version must match; "≥ X" admits X and later only."""
    exact = Row("x", "1.29.27", "cni", "none", "works")
    bound = Row("x", "≥ 1.34", "cni", "none", "works")
    assert (exact.admits("1.29.27"), exact.admits("1.29.28")) == (True, False)
    assert (bound.admits("1.34.0"), bound.admits("1.44.18"), bound.admits("1.33.9")) == (
        True,
        True,
        False,
    )
