"""metaproxy as a cluster runs it, in pods on one node (tests/cluster/): the `eks` overlay as
`kubectl kustomize` renders it (Valkey, two broker replicas, the webhook), and the shipped
example app pod as the webhook mutated it (a real AdmissionReview over HTTPS, the JSON Patch
applied), on a pod network that chains metaproxy-cni, so the app reaches 169.254.169.254 in its
own pod. The last test checks that those pods are the rendered overlay's, and nothing else.

The app container is `deploy/kubernetes/example/app.yaml`'s, with its command replaced: the
example calls AWS's own STS, this one calls moto's (`--endpoint-url`), then asks with boto3 and
with a raw IMDSv2 fetch. It has no AWS setting of its own: what it gets, it gets from the
webhook's `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` and the link-local addresses.

One change to the webhook's output: the sidecar asks the broker twice a second
(`METAPROXY_REVOCATION_CHECK_SECONDS=0.5`, 60 by default), so that the broker roll is crossed
by a refresh every half second, each of which must succeed. (Ten a second is more than the
broker allows one task: it answers 429, as it should.)

Marker `image`: `make image-test` (tests/cluster/conftest.py says why and what it needs).
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_asyncio

from metaproxy.webhook.settings import SIDECAR_NAME
from tests.cluster.cluster import (
    APP_NAMESPACE,
    BROKER_PORT,
    EXAMPLE_APP,
    EXAMPLE_APP_IMAGE,
    NODE,
    OVERLAY,
    SUBSTITUTIONS,
    Cluster,
    ClusterApi,
    add_env,
    container_of,
    documents,
    env_value,
)
from tests.cluster.images import Images
from tests.cluster.kubelet import PlayedPod
from tests.cluster.node import Node
from tests.cluster.podman import Podman
from tests.manifests import kustomize, render
from tests.podlab import process_status, root_mount_options
from tests.support import Samples, value
from tests.test_webhook import apply_patch, decoded_patch

pytestmark = [pytest.mark.image, pytest.mark.netns, pytest.mark.timeout(1500)]

# broker-config.yaml's shop.toml: namespace shop, service account orders.
ASSUMED_ROLE = "arn:aws:sts::111122223333:assumed-role/shop-orders/"
APP_READY_TIMEOUT = 120.0
MARKS = ("CLI ", "BOTO3 ")  # how the app's program marks its two answers
ADMIN_PORT = 9901
# The app's program, in place of the example's `aws sts get-caller-identity && sleep 3600`:
# the same call (at moto), then boto3's own chain and a raw IMDSv2 fetch of 169.254.169.254.
APP_CHECK = """
import boto3, json, sys, urllib.request
sts = sys.argv[1]
session = boto3.Session()
found = session.get_credentials()
identity = session.client("sts", endpoint_url=sts, region_name="us-east-1").get_caller_identity()
def get(path, method="GET", **headers):
    url = "http://169.254.169.254" + path
    request = urllib.request.Request(url, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as answer:
        return answer.read().decode()
token = get("/latest/api/token", "PUT", **{"X-aws-ec2-metadata-token-ttl-seconds": "60"})
base = "/latest/meta-data/iam/security-credentials/"
role = get(base, **{"X-aws-ec2-metadata-token": token})
imds = json.loads(get(base + role, **{"X-aws-ec2-metadata-token": token}))
zone = get("/latest/meta-data/placement/availability-zone", **{"X-aws-ec2-metadata-token": token})
print("BOTO3 " + json.dumps({
    "method": found.method, "key": found.access_key, "arn": identity["Arn"],
    "imds_role": role, "imds_key": imds["AccessKeyId"], "zone": zone,
}))
"""

SECRETS = "import boto3; c = boto3.Session().get_credentials(); print(c.secret_key, c.token)"


def app_command(sts_url: str) -> list[str]:
    script = (
        f"aws sts get-caller-identity --endpoint-url {sts_url} --region us-east-1 --output json"
        " | tr -d '\\n' | sed 's/^/CLI /'; echo"
        f" && /usr/bin/python3 -c '{APP_CHECK}' {sts_url}"
        " && exec sleep 3600"
    )
    return ["sh", "-c", script]


@dataclass
class App:
    review: dict[str, Any]  # the webhook's AdmissionResponse
    pod: dict[str, Any]  # the patched pod, as played
    played: PlayedPod
    cli: dict[str, Any]
    boto3: dict[str, Any]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    podman: Podman,
    images: Images,
    kustomize_ready: None,
    lab: Path,
    sts_url: str,
    issued_secrets: set[str],
) -> AsyncIterator[Cluster]:
    """The rendered overlay's Valkey, two brokers and the webhook, ready; torn down with the
    node."""
    import boto3

    rendered = render(OVERLAY, lab / "manifests")
    api = ClusterApi(rendered, issued_secrets)
    broker = rendered.container("Deployment", "metaproxy-broker", "broker")
    bucket = urlsplit(env_value(broker, "METAPROXY_AUDIT_S3_URL")).hostname
    assert bucket is not None
    s3 = boto3.client("s3", endpoint_url=sts_url, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    moto = urlsplit(sts_url)
    assert moto.hostname is not None and moto.port is not None
    install_cni = rendered.one("DaemonSet", "metaproxy-cni")["spec"]["template"]["spec"]
    node = Node(podman, lab / "node")
    cluster: Cluster | None = None
    try:
        node.start(container_of({"spec": install_cni}, "install-cni")["args"])
        cluster = Cluster(node, images, api, lab, (moto.hostname, moto.port))
        started = time.monotonic()
        await cluster.start()
        print(
            f"store, {len(cluster.fleet.pods)} brokers and the webhook ready in "
            f"{time.monotonic() - started:.1f} s"
        )
        yield cluster
    finally:
        if cluster is not None:
            await cluster.aclose()
        node.close()


def example_pod(cluster: Cluster) -> dict[str, Any]:
    """The shipped example's Pod, its command aimed at moto."""
    [pod] = [d for d in documents(EXAMPLE_APP) if d["kind"] == "Pod"]
    app = container_of(pod, "app")
    assert app["image"] == EXAMPLE_APP_IMAGE
    app["command"] = app_command(cluster.aws_url)
    return pod


async def app_output(cluster: Cluster, played: PlayedPod) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + APP_READY_TIMEOUT
    while True:
        logs = await cluster.kubelet.logs(played, "app")
        lines = dict(
            line.partition(" ")[::2] for line in logs.splitlines() if line.startswith(MARKS)
        )
        if "CLI" in lines and "BOTO3" in lines:
            return {key: json.loads(text) for key, text in lines.items()}
        state = await asyncio.to_thread(
            cluster.node.podman.inspect, "container", played.containers["app"]
        )
        if not state["State"]["Running"] or time.monotonic() > deadline:
            raise AssertionError(f"the app did not get its credentials:\n{logs}")
        await asyncio.sleep(0.5)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app(cluster: Cluster, issued_secrets: set[str]) -> App:
    """The example pod, mutated by the webhook, played, and its app's first answers. The
    secret key and session token it got are the scan's to look for in every log, audit
    segment and append-only file of the pods (read by `exec`, never printed to a log)."""
    pod = example_pod(cluster)
    response = await cluster.mutate(pod)
    patched = apply_patch(pod, decoded_patch(response))
    add_env(container_of(patched, SIDECAR_NAME), METAPROXY_REVOCATION_CHECK_SECONDS="0.5")
    played = await cluster.play_app(patched)
    output = await app_output(cluster, played)
    code, out, err = await cluster.kubelet.exec(played, "app", "/usr/bin/python3", "-c", SECRETS)
    assert code == 0, err
    issued_secrets.update(out.split())
    return App(response, patched, played, output["CLI"], output["BOTO3"])


async def sidecar_metrics(cluster: Cluster, played: PlayedPod) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    answer = await asyncio.to_thread(cluster.node.request, played.ip, ADMIN_PORT, "/metrics")
    assert answer.status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.body.decode())
        for sample in family.samples
    }


def as_rendered(cluster: Cluster, played: PlayedPod) -> dict[str, Any]:
    """A played pod's spec without the substitutions (tests/cluster/cluster.py lists them)."""
    kind, name = cluster.sources[played.name]
    spec = copy.deepcopy(played.spec)
    for (sub_kind, workload, container), names in SUBSTITUTIONS.items():
        if (sub_kind, workload) == (kind, name):
            target = container_of({"spec": spec}, container)
            target["env"] = [e for e in target["env"] if e["name"] not in names]
    claims = cluster.rendered.one(kind, name)["spec"].get("volumeClaimTemplates") or []
    claimed = {c["metadata"]["name"] for c in claims}
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] not in claimed]
    if (
        not spec["volumes"]
        and "volumes" not in cluster.rendered.one(kind, name)["spec"]["template"]["spec"]
    ):
        del spec["volumes"]
    return spec


@pytest.mark.asyncio(loop_scope="module")
async def test_the_webhook_pod_mutates_a_plain_pod_for_the_cni_plugin(
    cluster: Cluster, app: App
) -> None:
    """A real AdmissionReview of the example pod gets a JSON Patch: a native sidecar of the
    webhook's image, the pod marked for metaproxy-cni, and for the app only the relative URI
    and the overlay's region: no key, no endpoint, no token of its own."""
    assert app.review["allowed"] is True
    [sidecar] = app.pod["spec"]["initContainers"]
    assert sidecar["name"] == SIDECAR_NAME
    assert sidecar["image"] == cluster.image
    assert sidecar["restartPolicy"] == "Always"
    assert app.pod["metadata"]["annotations"]["metaproxy.io/link-local"] == "cni"
    app_env = {e["name"]: e.get("value") for e in container_of(app.pod, "app")["env"]}
    region = cluster.rendered.settings["region"]
    assert {n: v for n, v in app_env.items() if n.startswith("AWS_")} == {
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": app_env["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"],
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
    }


@pytest.mark.asyncio(loop_scope="module")
async def test_the_app_container_gets_its_tasks_role_with_no_configuration_of_its_own(
    app: App,
) -> None:
    """The AWS CLI and boto3 in the app container, with nothing but what the webhook injected,
    get the shop-orders role for this pod, through the pod's own sidecar."""
    assert app.cli["Arn"].startswith(ASSUMED_ROLE)
    assert app.boto3["arn"] == app.cli["Arn"]
    assert app.boto3["method"] == "container-role"


@pytest.mark.asyncio(loop_scope="module")
async def test_the_app_reaches_169_254_169_254_in_its_own_pod(cluster: Cluster, app: App) -> None:
    """metaproxy-cni, chained into the node's pod network, gives the pod the IMDS address on its
    own lo: a raw IMDSv2 fetch gets the role and the same keys the container endpoint serves,
    and the node's own zone, which the sidecar reads from the node's IMDS through eth0."""
    assert app.boto3["imds_role"] == "shop-orders"
    assert app.boto3["imds_key"] == app.boto3["key"]
    assert app.boto3["zone"] == NODE.zone
    assert "/latest/meta-data/iam/security-credentials/" not in cluster.imds.asked
    assert cluster.node.plugin_entry["type"] == "metaproxy"
    code, out, _ = await cluster.kubelet.exec(app.played, "app", "cat", "/proc/net/fib_trie")
    assert code == 0
    assert "169.254.169.254" in out


@pytest.mark.asyncio(loop_scope="module")
async def test_the_images_default_command_is_ready_on_its_admin_port(cluster: Cluster) -> None:
    """The image's own command and user (no args, no runAsUser), given an identity token and a
    broker, is ready on 9901, on a read-only root with no capability."""
    pod = {
        "metadata": {"name": "default-command", "namespace": APP_NAMESPACE},
        "spec": {
            "serviceAccountName": "orders",
            "securityContext": {"runAsNonRoot": True, "fsGroup": 10001},
            "containers": [
                {
                    "name": "sidecar",
                    "image": cluster.image,
                    "env": [
                        {
                            "name": "METAPROXY_BROKER_URL",
                            "value": f"https://{cluster.broker_host}:{BROKER_PORT}",
                        },
                        {"name": "METAPROXY_BROKER_CA_FILE", "value": "/etc/metaproxy/ca/ca.pem"},
                    ],
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": ADMIN_PORT}},
                    "securityContext": {
                        "readOnlyRootFilesystem": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [
                        {"name": "identity", "mountPath": "/var/run/metaproxy"},
                        {"name": "ca", "mountPath": "/etc/metaproxy/ca"},
                    ],
                }
            ],
            "volumes": [
                {
                    "name": "identity",
                    "projected": {
                        "sources": [
                            {
                                "serviceAccountToken": {
                                    "audience": "metaproxy-broker",
                                    "path": "identity.jwt",
                                }
                            }
                        ]
                    },
                },
                {"name": "ca", "configMap": {"name": "metaproxy-broker-ca"}},
            ],
        },
    }
    played = await cluster.play_app(pod)
    await cluster.kubelet.wait_ready(played, "sidecar", 60)
    status = process_status(await cluster.kubelet.pid(played, "sidecar"))
    assert status["Uid"].split()[0] == "10001"
    assert int(status["CapEff"], 16) == 0
    await cluster.kubelet.delete(played)


@pytest.mark.asyncio(loop_scope="module")
async def test_no_container_runs_as_root_or_with_a_writable_root_filesystem(
    cluster: Cluster, app: App
) -> None:
    """Every container of every pod (Valkey, brokers, webhook, sidecar, app): a non-zero uid,
    no capability, no_new_privs, and a root that is mounted read-only and refuses a write."""
    running = [cluster.store, *cluster.fleet.pods, cluster.webhook, app.played]
    checked = []
    for played in running:
        assert played is not None
        for name in played.containers:
            pid = await cluster.kubelet.pid(played, name)
            status = process_status(pid)
            where = f"{played.name}/{name}"
            assert "0" not in status["Uid"].split(), f"{where} runs as root: {status['Uid']}"
            assert int(status["CapEff"], 16) == 0, where
            assert status["NoNewPrivs"] == "1", where
            assert "ro" in root_mount_options(pid), f"{where} has a writable root"
            code, _, err = await cluster.kubelet.exec(played, name, "touch", "/written")
            assert code != 0 and "Read-only file system" in err, where
            checked.append(where)
    assert len(checked) == 1 + len(cluster.fleet.pods) + 1 + 2


@pytest.mark.asyncio(loop_scope="module")
async def test_rolling_the_broker_fleet_one_replica_at_a_time_drops_no_refresh(
    cluster: Cluster, app: App
) -> None:
    """Both brokers replaced, one at a time (a new one ready before an old one goes), while the
    sidecar refreshes twice a second through the Service: every refresh succeeds, the new
    replicas serve it, and the app still gets its role afterwards."""
    before = await sidecar_metrics(cluster, app.played)
    old = {p.ip for p in cluster.fleet.pods}
    started = time.monotonic()
    await cluster.roll_brokers()
    seconds = time.monotonic() - started
    after = await sidecar_metrics(cluster, app.played)
    refreshes = "metaproxy_sidecar_refreshes_total"
    ok = value(after, refreshes, result="ok") - value(before, refreshes, result="ok")
    failed = value(after, refreshes, result="error")
    print(f"roll: {seconds:.1f} s, {ok:.0f} refreshes, {failed:.0f} failed")
    assert failed == 0, await cluster.kubelet.logs(app.played, SIDECAR_NAME)
    assert ok >= seconds / 2, f"{ok} refreshes in {seconds:.0f} s: the roll was not exercised"
    new = {p.ip for p in cluster.fleet.pods}
    assert not new & old
    # The sidecar keeps one connection alive: when its replica went, it reconnected to a new one.
    assert any(cluster.broker_service.connections[(ip, BROKER_PORT)] for ip in new)
    code, out, err = await cluster.kubelet.exec(
        app.played, "app", "/usr/bin/python3", "-c", APP_CHECK, cluster.aws_url
    )
    assert code == 0, err
    assert json.loads(out.removeprefix("BOTO3 "))["arn"] == app.cli["Arn"]


@pytest.mark.asyncio(loop_scope="module")
async def test_the_pods_played_are_the_rendered_overlay_and_it_validates(
    cluster: Cluster,
) -> None:
    """`kubectl kustomize` of the overlay, run again, gives the text the pods were made from;
    that text validates against Kubernetes 1.30; and every pod of the overlay (Valkey, each
    broker of each revision, the webhook) is its workload's template as rendered, but for the
    listed substitutions. Last, so the rolled brokers are among them."""
    import kubernetes_validate

    rendered = cluster.rendered
    assert await asyncio.to_thread(kustomize, rendered.directory) == rendered.text
    for document in rendered.objects:
        assert kubernetes_validate.validate(document, "1.30", strict=True)
    played = [p for p in cluster.played if p.name in cluster.sources]
    assert {cluster.sources[p.name] for p in played} == {
        ("StatefulSet", "metaproxy-valkey"),
        ("Deployment", "metaproxy-broker"),
        ("Deployment", "metaproxy-webhook"),
    }
    for pod in played:
        template = rendered.one(*cluster.sources[pod.name])["spec"]["template"]["spec"]
        assert as_rendered(cluster, pod) == template, pod.name
