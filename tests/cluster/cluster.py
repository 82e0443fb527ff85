"""metaproxy's `eks` overlay, as `kubectl kustomize` renders it, played on the node: the store,
the broker fleet, the webhook, and pods that the webhook mutated.

    Service metaproxy-broker.metaproxy.svc:8443   (service.py, a virtual address of the node)
        → broker pods (the rendered Deployment's template), `metaproxy-cluster` network
            → Valkey (the rendered StatefulSet's template) by the name its store URL gives
            → "AWS": moto on the host, through a second Service
    webhook pod (the rendered Deployment's template): the test posts AdmissionReviews to it as
        the API server does, verifying it with the rendered MutatingWebhookConfiguration's
        caBundle
    the node's IMDS at 169.254.169.254 (metaproxy.testing.ec2_node), for the node's facts
    app pods (the webhook's output), `metaproxy-workloads` network: metaproxy-cni chained

**The manifests are the rendered overlay, by construction.** `tests/manifests.render("eks")` does
what docs/kubernetes.md asks of an operator in a copy of deploy/kubernetes (make-secrets.sh, the
cluster's JWKS) and runs `kubectl kustomize`; every pod here is made from a template of those
objects, every Secret and ConfigMap a pod mounts or reads is the rendered one (hash-suffixed
names and all), and the cluster's token signer is the key whose JWKS the overlay ships. The
test module checks the rendering (`kubectl kustomize` again gives the same text) and that each
played spec is its template with only the substitutions below.

The substitutions a cluster that is not EKS forces, each in `SUBSTITUTIONS` and nowhere else:

- **Brokers**: 2 replicas (the HPA's floor is 3; the HPA is not the subject); STS and S3 at moto
  (`METAPROXY_STS_ENDPOINT`, `METAPROXY_S3_ENDPOINT`) with moto's fake keys in place of IRSA.
- **Valkey**: its PersistentVolumeClaim is an emptyDir (no storage class here), its image the
  workloads' image (Redis under Valkey's names, workloads.Containerfile).
- **Webhook**: one replica of two.
- **Images** named by the manifests map to the local builds; nothing is pulled.
- **DNS**: the names pods resolve (the broker Service, Valkey's pod) are `--add-host` entries.
- **The app namespace's `metaproxy-broker-ca`** holds the overlay's broker CA, as docs step 7
  creates it (the example's file is a placeholder).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import ssl
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from metaproxy.identity.keys import jwk_thumbprint, public_jwk
from metaproxy.testing.ec2_node import Instance, NodeImds
from tests.cluster.images import Images
from tests.cluster.kubelet import ApiObjects, Kubelet, PlayedPod
from tests.cluster.node import CLUSTER_NETWORK, WORKLOADS_NETWORK, Node
from tests.cluster.service import Service
from tests.manifests import KUBERNETES, Rendered
from tests.podlab import socket_in

OVERLAY = "eks"
EXAMPLE_APP = KUBERNETES / "example" / "app.yaml"
EXAMPLE_APP_IMAGE = "public.ecr.aws/aws-cli/aws-cli:2.17.0"
NAMESPACE = "metaproxy"
APP_NAMESPACE = "shop"
BROKER_PORT = 8443
AWS_PORT = 5000
BROKER_REPLICAS = 2
NODE_IMDS = "169.254.169.254"
NODE = Instance(zone="us-east-1c", zone_id="use1-az6", tags={"Name": "metaproxy-test-node"})
READY_TIMEOUT = 90.0
# Per (kind, name, container): the environment added to the rendered template's. Moto's
# documented fake keys stand in for IRSA; METAPROXY_STS_ENDPOINT and _S3_ENDPOINT are filled in
# with moto's Service address when the pod is made.
SUBSTITUTIONS: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("Deployment", "metaproxy-broker", "broker"): (
        "METAPROXY_STS_ENDPOINT",
        "METAPROXY_S3_ENDPOINT",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ),
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def pod_of(workload: dict[str, Any], name: str, **annotations: str) -> dict[str, Any]:
    """The pod a controller makes from a Deployment's or StatefulSet's template."""
    template = json.loads(json.dumps(workload["spec"]["template"]))
    spec = template["spec"]
    for claim in workload["spec"].get("volumeClaimTemplates") or []:
        spec.setdefault("volumes", []).append({"name": claim["metadata"]["name"], "emptyDir": {}})
    metadata = template.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": workload["metadata"]["namespace"],
            "labels": metadata.get("labels", {}),
            "annotations": {**metadata.get("annotations", {}), **annotations},
        },
        "spec": spec,
    }


def container_of(pod: dict[str, Any], name: str) -> dict[str, Any]:
    for key in ("initContainers", "containers"):
        for container in pod["spec"].get(key) or []:
            if container["name"] == name:
                found: dict[str, Any] = container
                return found
    raise KeyError(name)


def add_env(container: dict[str, Any], **values: str) -> None:
    container.setdefault("env", []).extend({"name": k, "value": v} for k, v in values.items())


def env_value(container: dict[str, Any], name: str) -> str:
    (value,) = [e["value"] for e in container.get("env") or [] if e["name"] == name]
    return str(value)


class ClusterApi:
    """What the API server holds for the pods: the rendered Secrets and ConfigMaps, the app
    namespace's broker CA, and the service-account token signer of the overlay's JWKS."""

    def __init__(self, rendered: Rendered, issued: set[str]) -> None:
        self.rendered = rendered
        self.issued = issued
        key = load_pem_private_key(rendered.cluster_key.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        self.cluster_key = key
        self.kid = jwk_thumbprint(public_jwk(key.public_key()))
        broker = rendered.container("Deployment", "metaproxy-broker", "broker")
        self.issuer = env_value(broker, "METAPROXY_TRUST").split(",")[0]
        self.broker_ca = rendered.secrets / "broker-tls" / "ca.pem"
        self.objects = ApiObjects(mint_token=self.mint)
        for document in rendered.all("Secret"):
            where = (document["metadata"]["namespace"], document["metadata"]["name"])
            self.objects.secrets[where] = rendered.data("Secret", where[1])
        for document in rendered.all("ConfigMap"):
            where = (document["metadata"]["namespace"], document["metadata"]["name"])
            data = rendered.data("ConfigMap", where[1])
            self.objects.config_maps[where] = {k: v.decode() for k, v in data.items()}
        # docs/kubernetes.md, step 7: the broker's CA in each application namespace.
        self.objects.config_maps[(APP_NAMESPACE, "metaproxy-broker-ca")] = {
            "ca.pem": self.broker_ca.read_text()
        }
        fleet = self.objects.secrets[(NAMESPACE, self.name_of("Secret", "metaproxy-broker-fleet"))]
        store = self.objects.secrets[(NAMESPACE, self.name_of("Secret", "metaproxy-store"))]
        issued.update((fleet["control.token"].decode().strip(), store["password"].decode().strip()))

    def name_of(self, kind: str, name: str) -> str:
        """A generated object's rendered name (with its hash suffix)."""
        rendered_name: str = self.rendered.one(kind, name)["metadata"]["name"]
        return rendered_name

    @property
    def store_host(self) -> str:
        secret = self.objects.secrets[(NAMESPACE, self.name_of("Secret", "metaproxy-store"))]
        host = urlsplit(secret["url"].decode()).hostname
        assert host is not None
        return host

    def webhook_endpoint(self) -> tuple[str, str, int, ssl.SSLContext]:
        """(the Service's DNS name, the path, the pod's port, TLS verified by caBundle), as the
        API server calls the webhook from the rendered MutatingWebhookConfiguration."""
        (hook,) = self.rendered.one("MutatingWebhookConfiguration", "metaproxy-injector")[
            "webhooks"
        ]
        ref = hook["clientConfig"]["service"]
        service = self.rendered.one("Service", ref["name"])
        (target,) = [p["targetPort"] for p in service["spec"]["ports"] if p["port"] == ref["port"]]
        webhook = self.rendered.container("Deployment", "metaproxy-webhook", "webhook")
        (port,) = [
            p["containerPort"]
            for p in webhook["ports"]
            if target in (p["name"], p["containerPort"])
        ]
        ca = base64.b64decode(hook["clientConfig"]["caBundle"]).decode()
        context = ssl.create_default_context(cadata=ca)
        return f"{ref['name']}.{ref['namespace']}.svc", ref["path"], int(port), context

    def mint(self, namespace: str, account: str, pod: str, audience: str, seconds: int) -> str:
        """A projected service-account token, as the API server's TokenRequest signs it."""
        now = int(time.time())
        claims = {
            "aud": [audience],
            "exp": now + seconds,
            "iat": now,
            "nbf": now,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": pod, "uid": str(uuid.uuid4())},
                "serviceaccount": {"name": account, "uid": str(uuid.uuid4())},
            },
            "sub": f"system:serviceaccount:{namespace}:{account}",
        }
        token = jwt.encode(claims, self.cluster_key, algorithm="RS256", headers={"kid": self.kid})
        self.issued.add(token)
        return token


@dataclass
class Fleet:
    pods: list[PlayedPod]
    revision: int = 1


class Cluster:
    """The node, its kubelet, the Services, and the pods of the rendered overlay."""

    def __init__(
        self, node: Node, images: Images, api: ClusterApi, directory: Path, moto: tuple[str, int]
    ) -> None:
        self.node = node
        self.images = images
        self.api = api
        self.rendered = api.rendered
        valkey = self.rendered.one("StatefulSet", "metaproxy-valkey")
        self.image = self.rendered.settings["image"]
        self.kubelet = Kubelet(
            node,
            api.objects,
            {
                self.image: images.metaproxy.tag,
                container_of(valkey["spec"]["template"], "valkey")["image"]: images.workloads.tag,
                EXAMPLE_APP_IMAGE: images.workloads.tag,
            },
            directory / "pods",
            run_label=node.name,
        )
        self.broker_service = Service(node.netns, node.new_service_address(), BROKER_PORT)
        self.aws = Service(node.netns, node.new_service_address(), AWS_PORT, in_node=False)
        self.aws.set_endpoints([moto])
        self.store: PlayedPod | None = None
        self.webhook: PlayedPod | None = None
        self.fleet = Fleet([])
        self.imds = NodeImds(NODE)
        self._imds_runner: web.AppRunner | None = None
        self.played: list[PlayedPod] = []  # every pod started, retired ones included
        self.sources: dict[str, tuple[str, str]] = {}  # played pod name → (kind, name) rendered

    @property
    def aws_url(self) -> str:
        return f"http://{self.aws.address}:{self.aws.port}"

    @property
    def broker_host(self) -> str:
        """The broker Service's DNS name, as the webhook's --broker-url gives it."""
        webhook = self.rendered.container("Deployment", "metaproxy-webhook", "webhook")
        (url,) = [a.partition("=")[2] for a in webhook["args"] if a.startswith("--broker-url=")]
        host = urlsplit(str(url)).hostname
        assert host is not None
        return host

    async def start(self) -> None:
        await self.broker_service.start()
        await self.aws.start()
        await self._start_node_imds()
        self.store = await self._play(
            ("StatefulSet", "metaproxy-valkey"), "metaproxy-valkey-0", CLUSTER_NETWORK
        )
        await self.kubelet.wait_ready(self.store, "valkey", READY_TIMEOUT)
        pods = await asyncio.gather(*(self.start_broker() for _ in range(BROKER_REPLICAS)))
        self.fleet.pods = list(pods)
        self.broker_service.set_endpoints([(p.ip, BROKER_PORT) for p in pods])
        self.webhook = await self._play(
            ("Deployment", "metaproxy-webhook"),
            f"metaproxy-webhook-{secrets.token_hex(3)}",
            CLUSTER_NETWORK,
        )
        await self.kubelet.wait_ready(self.webhook, "webhook", READY_TIMEOUT)

    async def _start_node_imds(self) -> None:
        """The node's IMDS on the node's lo, where a pod's sidecar reaches it through eth0."""
        self.node.add_local(NODE_IMDS)
        sock = socket_in(self.node.netns)
        sock.bind((NODE_IMDS, 80))
        self._imds_runner = web.AppRunner(self.imds.app(), access_log=None)
        await self._imds_runner.setup()
        await web.SockSite(self._imds_runner, sock).start()

    def pod(self, source: tuple[str, str], name: str, **annotations: str) -> dict[str, Any]:
        """A pod of the rendered workload `source`, with the substitutions above."""
        pod = pod_of(self.rendered.one(*source), name, **annotations)
        for (kind, workload, container), names in SUBSTITUTIONS.items():
            if (kind, workload) != source:
                continue
            values = {
                "METAPROXY_STS_ENDPOINT": self.aws_url,
                "METAPROXY_S3_ENDPOINT": self.aws_url,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
            }
            add_env(container_of(pod, container), **{n: values[n] for n in names})
        return pod

    async def _play(
        self,
        source: tuple[str, str],
        name: str,
        network: str,
        hosts: dict[str, str] | None = None,
        **annotations: str,
    ) -> PlayedPod:
        played = await self.kubelet.play(self.pod(source, name, **annotations), network, hosts)
        self.played.append(played)
        self.sources[played.name] = source
        return played

    async def start_broker(self) -> PlayedPod:
        """One replica of the current revision, ready (its readiness probe passed)."""
        assert self.store is not None
        revision = self.fleet.revision
        played = await self._play(
            ("Deployment", "metaproxy-broker"),
            f"metaproxy-broker-r{revision}-{secrets.token_hex(3)}",
            CLUSTER_NETWORK,
            {self.api.store_host: self.store.ip},
            **{"metaproxy.test/revision": str(revision)},
        )
        await self.kubelet.wait_ready(played, "broker", READY_TIMEOUT)
        return played

    async def roll_brokers(self) -> None:
        """A RollingUpdate as the rendered Deployment's strategy asks (maxSurge 1,
        maxUnavailable 0): one new replica ready and in the Service's endpoints, then one old
        one out of them and terminated, until every replica is of the new revision."""
        self.fleet.revision += 1
        for old in list(self.fleet.pods):
            new = await self.start_broker()
            self.fleet.pods.append(new)
            self.fleet.pods.remove(old)
            self.broker_service.set_endpoints([(p.ip, BROKER_PORT) for p in self.fleet.pods])
            await self.kubelet.delete(old)

    async def mutate(self, pod: dict[str, Any]) -> dict[str, Any]:
        """The webhook's AdmissionReview response for a pod CREATE, sent as the API server
        sends it: HTTPS to the Service's name and path, verified against the caBundle."""
        from tests.test_webhook import review

        assert self.webhook is not None
        host, path, port, context = self.api.webhook_endpoint()
        body = json.dumps(review(pod)).encode()
        answer = await asyncio.to_thread(
            self.node.request,
            self.webhook.ip,
            port,
            path,
            method="POST",
            body=body,
            headers={"Content-Type": "application/json"},
            tls=context,
            server_hostname=host,
        )
        assert answer.status == 200, answer.body[:500]
        response: dict[str, Any] = json.loads(answer.body)["response"]
        return response

    async def play_app(self, pod: dict[str, Any]) -> PlayedPod:
        """An injected pod on the workloads network, resolving the broker Service's name."""
        played = await self.kubelet.play(
            pod, WORKLOADS_NETWORK, {self.broker_host: self.broker_service.address}
        )
        self.played.append(played)
        return played

    async def aclose(self) -> None:
        for played in self.played:
            if not played.deleted:
                await self.kubelet.save_logs(played)
        for service in (self.broker_service, self.aws):
            await service.aclose()
        if self._imds_runner is not None:
            await self._imds_runner.cleanup()
        await asyncio.to_thread(self.kubelet.remove_everything)
