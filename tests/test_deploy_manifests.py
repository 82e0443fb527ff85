"""Kubernetes manifests: every overlay, rendered by `kubectl kustomize`, validates against the
API schemas and agrees with the code (flags, ports, env names, the files the keygen commands
write); the Dockerfile has the agreed shape."""

from __future__ import annotations

import atexit
import base64
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from tests import manifests

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"
# The example AWS account's AssumeRole budget (calls per second) the broker manifests assume.
ACCOUNT_STS_BUDGET = 600.0
PROBLEM = manifests.kustomize_problem()
needs_kustomize = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")


def render_overlays() -> dict[str, manifests.Rendered]:
    """Every overlay, prepared as docs/kubernetes.md says and rendered once for the module."""
    if PROBLEM is not None:
        return {}
    workdir = Path(tempfile.mkdtemp(prefix="metaproxy-manifests-"))
    atexit.register(shutil.rmtree, workdir, True)
    return manifests.rendered_overlays(workdir)


RENDERED = render_overlays()
EXAMPLE = [
    document
    for document in yaml.safe_load_all((KUBERNETES / "example" / "app.yaml").read_text())
    if document is not None
]
DOCUMENTS = [
    (f"{overlay}:{d['kind']}/{rendered.base_name(d)}", d)
    for overlay, rendered in RENDERED.items()
    for d in rendered.objects
] + [(f"example/app.yaml#{index}", d) for index, d in enumerate(EXAMPLE)]


def one(kind: str, name: str) -> dict[str, Any]:
    """The object in the production overlay (eks) or the example app."""
    examples = [d for d in EXAMPLE if d["kind"] == kind and d["metadata"]["name"] == name]
    if examples:
        (example,) = examples
        return dict(example)
    return RENDERED["eks"].one(kind, name)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def test_schemas_for_the_target_version_are_installed() -> None:
    """kubernetes-validate ships the 1.30 schemas these manifests are checked against."""
    assert f"{KUBERNETES_VERSION}.0" in all_versions()


@pytest.mark.parametrize(("where", "document"), DOCUMENTS, ids=[w for w, _ in DOCUMENTS])
def test_manifest_validates_strictly(where: str, document: dict[str, Any]) -> None:
    """Every object of every overlay is a valid Kubernetes 1.30 object with no unknown fields."""
    assert kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    if document["kind"] not in ("Namespace", "MutatingWebhookConfiguration"):
        assert document["metadata"].get("namespace"), f"{where} names no namespace"


@needs_kustomize
def test_all_agreed_resources_are_present() -> None:
    """The deployment has every piece the design names."""
    expected = {
        ("Namespace", "metaproxy"),
        ("ServiceAccount", "metaproxy-broker"),
        ("ServiceAccount", "metaproxy-webhook"),
        ("ConfigMap", "metaproxy-policies"),
        ("ConfigMap", "metaproxy-cluster-jwks"),
        ("Deployment", "metaproxy-broker"),
        ("Service", "metaproxy-broker"),
        ("HorizontalPodAutoscaler", "metaproxy-broker"),
        ("PodDisruptionBudget", "metaproxy-broker"),
        ("NetworkPolicy", "metaproxy-broker"),
        ("Deployment", "metaproxy-webhook"),
        ("Service", "metaproxy-webhook"),
        ("MutatingWebhookConfiguration", "metaproxy-injector"),
        ("Pod", "orders"),
        ("StatefulSet", "metaproxy-valkey"),
        ("Service", "metaproxy-valkey"),
        ("NetworkPolicy", "metaproxy-valkey"),
        ("Secret", "metaproxy-store"),
        ("Secret", "metaproxy-broker-fleet"),
        ("Secret", "metaproxy-broker-keys"),
        ("Secret", "metaproxy-broker-tls"),
        ("Secret", "metaproxy-webhook-tls"),
        ("Namespace", "metaproxy-node"),
        ("DaemonSet", "metaproxy-cni"),
    }
    eks = RENDERED["eks"]
    present = {(d["kind"], eks.base_name(d)) for d in eks.objects}
    present |= {(d["kind"], d["metadata"]["name"]) for d in EXAMPLE}
    assert expected <= present
    kinds = {d["kind"] for d in eks.objects}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}  # no API rights


@needs_kustomize
def test_broker_deployment_is_hardened_and_configured() -> None:
    """At least three non-root replicas, read-only root, probes on the admin port, METAPROXY_*
    config, the cluster's issuer from settings.yaml."""
    deployment = one("Deployment", "metaproxy-broker")
    # The HPA owns the count: a replicas field would reset it on every `kubectl apply -k`.
    assert "replicas" not in deployment["spec"]
    assert one("HorizontalPodAutoscaler", "metaproxy-broker")["spec"]["minReplicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    broker = container(deployment)
    assert broker["args"] == ["broker"]
    assert broker["securityContext"]["readOnlyRootFilesystem"] is True
    assert broker["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert set(broker["resources"]) == {"requests", "limits"}
    ports = {p["name"]: p["containerPort"] for p in broker["ports"]}
    assert ports == {"https": 8443, "metrics": 9902, "control": 9443}
    assert broker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert broker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    env = {e["name"]: e.get("value") for e in broker["env"]}
    assert env["METAPROXY_LISTEN"] == "0.0.0.0:8443"
    assert env["METAPROXY_ADMIN_LISTEN"] == "0.0.0.0:9902"
    issuer = RENDERED["eks"].settings["issuer"]
    assert env["METAPROXY_TRUST"] == (
        f"{issuer},metaproxy-broker,/etc/metaproxy/jwks/cluster.json,kubernetes"
    )
    for name in ("METAPROXY_TLS_CERT", "METAPROXY_TLS_KEY", "METAPROXY_POLICIES_DIR"):
        assert env[name]
    assert env["METAPROXY_AUDIT_S3_URL"].startswith("s3://")
    mounts = {m["mountPath"] for m in broker["volumeMounts"]}
    for name in ("METAPROXY_TLS_CERT", "METAPROXY_TLS_KEY"):
        assert str(Path(env[name]).parent) in mounts
    for name in ("METAPROXY_POLICIES_DIR", "METAPROXY_AUDIT_DIR"):
        assert env[name] in mounts
    assert str(Path(env["METAPROXY_TRUST"].split(",")[2]).parent) in mounts
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9902"


def env_entry(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (entry,) = [e for e in container(workload)["env"] if e["name"] == name]
    result: dict[str, Any] = entry
    return result


def volume_of(workload: dict[str, Any], path: str) -> dict[str, Any]:
    """The pod volume mounted at the directory holding `path` (or at `path` itself)."""
    mounts = {m["mountPath"]: m["name"] for m in container(workload)["volumeMounts"]}
    name = mounts.get(path) or mounts[str(Path(path).parent)]
    volumes = workload["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == name]
    return dict(volume)


@needs_kustomize
def test_broker_joins_the_fleet_through_secrets_and_volumes() -> None:
    """Store URL from a Secret, key and token as Secret files, state on an emptyDir, control API."""
    deployment = one("Deployment", "metaproxy-broker")
    eks = RENDERED["eks"]
    store = env_entry(deployment, "METAPROXY_STORE")
    assert "value" not in store, "the store URL carries a password: never inline"
    reference = store["valueFrom"]["secretKeyRef"]
    assert reference["key"] == "url"
    assert eks.base_name(eks.by_name("Secret", reference["name"])) == "metaproxy-store"
    fleet_secret = eks.one("Secret", "metaproxy-broker-fleet")
    for name, key in (
        ("METAPROXY_STORE_KEY_FILE", "store.key"),
        ("METAPROXY_CONTROL_TOKEN_FILE", "control.token"),
    ):
        path = env_entry(deployment, name)["value"]
        assert Path(path).name == key and key in fleet_secret["data"]
        secret_name = volume_of(deployment, path)["secret"]["secretName"]
        assert secret_name == fleet_secret["metadata"]["name"]
    assert env_entry(deployment, "METAPROXY_CONTROL_LISTEN")["value"] == "0.0.0.0:9443"
    state_dir = env_entry(deployment, "METAPROXY_STATE_DIR")["value"]
    assert "emptyDir" in volume_of(deployment, state_dir)
    service_ports = {
        p["name"]: p["port"] for p in one("Service", "metaproxy-broker")["spec"]["ports"]
    }
    assert service_ports["control"] == 9443


@needs_kustomize
def test_broker_writes_only_to_its_volumes() -> None:
    """Read-only root: every directory the broker writes (audit, state, /tmp) is an emptyDir."""
    deployment = one("Deployment", "metaproxy-broker")
    assert container(deployment)["securityContext"]["readOnlyRootFilesystem"] is True
    for path in (
        env_entry(deployment, "METAPROXY_AUDIT_DIR")["value"],
        env_entry(deployment, "METAPROXY_STATE_DIR")["value"],
        "/tmp",
    ):
        assert "emptyDir" in volume_of(deployment, path), path


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes binary quantity ("2Gi", "64Mi") in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    return int(quantity[:-2]) * units[quantity[-2:]]


@needs_kustomize
def test_audit_buffer_bound_fits_the_audit_volume() -> None:
    """The broker refuses to issue before its unshipped audit log fills the volume (eviction)."""
    deployment = one("Deployment", "metaproxy-broker")
    bound = int(env_entry(deployment, "METAPROXY_AUDIT_MAX_LOCAL_BYTES")["value"])
    audit = volume_of(deployment, env_entry(deployment, "METAPROXY_AUDIT_DIR")["value"])
    size = quantity_bytes(audit["emptyDir"]["sizeLimit"])
    # Room for the open segment, checkpoints and the rotation that crosses the bound.
    assert 0 < bound <= size * 0.8


@needs_kustomize
def test_sts_budget_is_the_accounts_whole_budget() -> None:
    """One budget in the store for the fleet: not divided by the HPA's maxReplicas any more."""
    deployment = one("Deployment", "metaproxy-broker")
    budget = float(env_entry(deployment, "METAPROXY_STS_BUDGET_PER_SECOND")["value"])
    max_replicas = one("HorizontalPodAutoscaler", "metaproxy-broker")["spec"]["maxReplicas"]
    assert budget == ACCOUNT_STS_BUDGET
    assert budget != ACCOUNT_STS_BUDGET / max_replicas


@needs_kustomize
def test_valkey_keeps_an_append_only_file_on_a_volume_behind_a_password() -> None:
    """AOF fsynced each second, no RDB, no eviction, data on a PVC, password from a Secret."""
    statefulset = one("StatefulSet", "metaproxy-valkey")
    valkey = container(statefulset)
    assert valkey["image"].startswith("valkey/valkey:8")
    args = valkey["args"]
    options = dict(zip(args[::2], args[1::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--save"] == ""
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--requirepass"] == "$(VALKEY_PASSWORD)"
    password = env_entry(statefulset, "VALKEY_PASSWORD")["valueFrom"]["secretKeyRef"]
    assert password["key"] == "password"
    eks = RENDERED["eks"]
    assert eks.base_name(eks.by_name("Secret", password["name"])) == "metaproxy-store"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in valkey["volumeMounts"]}
    assert mounts[options["--dir"]] == claim["metadata"]["name"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    probe = " ".join(valkey["readinessProbe"]["exec"]["command"])
    assert "valkey-cli" in probe and "ping" in probe and "PONG" in probe
    assert statefulset["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert valkey["securityContext"]["readOnlyRootFilesystem"] is True
    assert valkey["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert set(valkey["resources"]) == {"requests", "limits"}
    service = one("Service", "metaproxy-valkey")["spec"]
    assert service["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == "metaproxy-valkey"


@needs_kustomize
def test_only_brokers_reach_valkey() -> None:
    """The store admits broker pods on 6379 and nothing else, and reaches nothing."""
    policy = one("NetworkPolicy", "metaproxy-valkey")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = policy["ingress"]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "metaproxy-broker"}}}
    ]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    assert policy["egress"] == []


def test_repository_holds_no_secret_material() -> None:
    """Secrets are generated from the files make-secrets.sh writes into git-ignored folders: the
    manifests hold no key, password or token, nor a placeholder Secret to apply by mistake."""
    ignored = (KUBERNETES / "overlays" / ".gitignore").read_text().split()
    assert {"*/secrets/", "*/cluster-jwks.json"} <= set(ignored)
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "deploy/kubernetes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    paths = [ROOT / name for name in tracked if name]
    assert paths, "no tracked manifests: not a git checkout?"
    for path in paths:
        assert "secrets" not in path.relative_to(KUBERNETES).parts, path
        assert path.name != "cluster-jwks.json", path
        if path.suffix == ".yaml":
            kinds = {d.get("kind") for d in yaml.safe_load_all(path.read_text()) if d}
            assert "Secret" not in kinds, path


@needs_kustomize
def test_broker_env_names_are_config_fields() -> None:
    """Every METAPROXY_* variable the broker gets is a BrokerConfig field (or TRUST)."""
    import dataclasses

    from metaproxy.broker.config import BrokerConfig

    fields = {f"METAPROXY_{f.name.upper()}" for f in dataclasses.fields(BrokerConfig)}
    fields.add("METAPROXY_TRUST")
    env = {e["name"] for e in container(one("Deployment", "metaproxy-broker"))["env"]}
    assert env <= fields


@needs_kustomize
def test_autoscaler_uses_cpu_and_queue_depth() -> None:
    """The HPA scales the broker on CPU and on the queue-depth Pods metric."""
    hpa = one("HorizontalPodAutoscaler", "metaproxy-broker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"]["metric"]["name"] == "metaproxy_broker_queue_depth"
    assert hpa["spec"]["minReplicas"] >= 3


@needs_kustomize
def test_broker_network_policy_limits_ingress_ports() -> None:
    """8443 (sidecars), 9902 (monitoring), 9443 (operators); egress DNS, 443 and the store."""
    policy = one("NetworkPolicy", "metaproxy-broker")["spec"]
    ingress_ports = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert ingress_ports == {8443, 9902, 9443}
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 443, 6379}
    api_rule = next(r for r in policy["ingress"] if r["ports"][0]["port"] == 8443)
    assert api_rule["from"], "8443 must not be open to every pod"
    store_rule = next(r for r in policy["egress"] if r["ports"][0]["port"] == 6379)
    assert store_rule["to"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "metaproxy-valkey"}}}
    ]


@needs_kustomize
def test_control_port_is_open_to_operators_only() -> None:
    """9443 admits labelled pods of the operators' namespace, never the monitoring namespace."""
    policy = one("NetworkPolicy", "metaproxy-broker")["spec"]
    monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    for rule in policy["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        sources = rule["from"]
        if monitoring in [s.get("namespaceSelector") for s in sources]:
            assert ports == {9902}, "monitoring reaches the admin port and nothing else"
        if 9443 in ports:
            assert ports == {9443}
            assert sources, "the control port must not be open to every pod"
            for source in sources:
                assert source.get("namespaceSelector") not in (None, {}, monitoring)
                assert source.get("podSelector", {}).get("matchLabels")


@needs_kustomize
def test_webhook_configuration_is_safe() -> None:
    """The webhook fires on labelled pods only, fails closed, and has no side effects."""
    (webhook,) = one("MutatingWebhookConfiguration", "metaproxy-injector")["webhooks"]
    assert webhook["objectSelector"] == {"matchLabels": {"metaproxy.io/inject": "true"}}
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["sideEffects"] == "None"
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["clientConfig"]["service"]["path"] == "/mutate"
    assert webhook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    service = one("Service", "metaproxy-webhook")
    assert webhook["clientConfig"]["service"]["port"] in {
        p["port"] for p in service["spec"]["ports"]
    }
    args = container(one("Deployment", "metaproxy-webhook"))["args"]
    assert args[0] == "webhook"
    assert any(a.startswith("--tls-cert=") for a in args)


@needs_kustomize
def test_cni_daemonset_installs_the_plugin_on_every_node() -> None:
    """On every node, before pod networking: install-cni writes the host's CNI dirs as uid 0
    with no capability, holds no API token, and is ready once the plugin is in place."""
    from metaproxy.cli import build_parser

    daemonset = one("DaemonSet", "metaproxy-cni")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["hostNetwork"] is True
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod  # no API access: the namespace's default suffices
    installer = container(daemonset)
    assert installer["image"] == container(one("Deployment", "metaproxy-webhook"))["image"]
    assert installer["args"][:2] == ["link-local", "install-cni"]
    args = build_parser("link-local").parse_args(installer["args"])  # every flag exists
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: m for m in installer["volumeMounts"]}
    for directory, host in (
        (args.cni_bin_dir, "/opt/cni/bin"),
        (args.cni_conf_dir, "/etc/cni/net.d"),
    ):
        assert host_paths[mounts[str(directory)]["name"]] == host
        assert not mounts[str(directory)].get("readOnly")
    assert "emptyDir" in volume_of(daemonset, str(args.ready_file))
    command = installer["readinessProbe"]["exec"]["command"]
    probe = build_parser("link-local").parse_args(command[1:])
    assert (command[0], probe.link_local_command) == ("metaproxy", "check-install")
    assert probe.ready_file == args.ready_file
    security = installer["securityContext"]
    assert (security["runAsUser"], security["runAsNonRoot"]) == (0, False)
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert set(installer["resources"]) == {"requests", "limits"}


@needs_kustomize
def test_cni_daemonset_has_a_namespace_that_admits_node_agents() -> None:
    """`metaproxy` stays restricted, which refuses hostNetwork, hostPath and uid 0; the
    DaemonSet's own namespace allows them and holds nothing else."""
    daemonset = one("DaemonSet", "metaproxy-cni")
    namespace = daemonset["metadata"]["namespace"]
    labels = one("Namespace", namespace)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    eks = RENDERED["eks"].objects
    assert [d for d in eks if d["metadata"].get("namespace") == namespace] == [daemonset]
    restricted = one("Namespace", "metaproxy")["metadata"]["labels"]
    assert restricted["pod-security.kubernetes.io/enforce"] == "restricted"


@needs_kustomize
def test_cni_entry_lets_sidecars_reach_the_node_metadata_the_webhook_grants() -> None:
    """`nodeMetadata` in the plugin's entry exactly when the webhook injects sidecars that answer
    node metadata paths (its --node-metadata, non-empty by default)."""
    webhook = container(one("Deployment", "metaproxy-webhook"))["args"]
    paths = [a.partition("=")[2] for a in webhook if a.startswith("--node-metadata")]
    grants = not paths or paths[-1] not in ("", "''", '""')
    assert ("--node-metadata" in container(one("DaemonSet", "metaproxy-cni"))["args"]) == grants


def test_example_pod_asks_for_injection() -> None:
    """The example pod carries the label the webhook selects on, in an enabled namespace."""
    pod = one("Pod", "orders")
    assert pod["metadata"]["labels"]["metaproxy.io/inject"] == "true"
    namespace = one("Namespace", pod["metadata"]["namespace"])
    assert namespace["metadata"]["labels"]["metaproxy.io/enabled"] == "true"


# ---- The overlays: one source, the keygen commands' files, settings in one place ---------------

# Each generated Secret's keys and the file make-secrets.sh wrote for each (under the name its
# keygen command gives it), per overlay.
SECRET_FILES = {
    "metaproxy-broker-tls": {
        "tls.crt": "broker-tls/broker.pem",
        "tls.key": "broker-tls/broker.key",
        "ca.crt": "broker-tls/ca.pem",
    },
    "metaproxy-webhook-tls": {
        "tls.crt": "webhook-tls/broker.pem",
        "tls.key": "webhook-tls/broker.key",
        "ca.crt": "webhook-tls/ca.pem",
    },
    "metaproxy-broker-keys": {
        "audit-signing.key": "audit-signing.key",
        "document.key": "document.key",
    },
    "metaproxy-broker-fleet": {"store.key": "store.key", "control.token": "control.token"},
    "metaproxy-store": {"password": "store-password", "url": "store-url"},
}
OVERLAY_SECRETS = {
    "eks": SECRET_FILES,
    "single": {
        **{k: v for k, v in SECRET_FILES.items() if k != "metaproxy-store"},
        "metaproxy-broker-fleet": {"control.token": "control.token"},
    },
}
overlays = pytest.mark.parametrize("overlay", manifests.OVERLAYS)


def test_keygen_commands_write_the_names_the_overlays_read() -> None:
    """The file names of SECRET_FILES are the ones the commands' code writes."""
    from metaproxy.audit.signing_keys import PRIVATE_KEY_NAME
    from metaproxy.commands.certs import FILES

    assert {"ca.pem", "broker.pem", "broker.key"} <= set(FILES)
    assert SECRET_FILES["metaproxy-broker-keys"]["audit-signing.key"] == PRIVATE_KEY_NAME


@needs_kustomize
@overlays
def test_secrets_hold_the_files_the_keygen_commands_wrote(overlay: str) -> None:
    """Each Secret holds, byte for byte, the files make-secrets.sh wrote, and nothing else."""
    rendered = RENDERED[overlay]
    expected = OVERLAY_SECRETS[overlay]
    secrets = {rendered.base_name(s) for s in rendered.all("Secret")}
    assert secrets == set(expected)
    for name, files in expected.items():
        secret = rendered.one("Secret", name)
        data = rendered.data("Secret", secret["metadata"]["name"])
        assert data == {key: (rendered.secrets / path).read_bytes() for key, path in files.items()}
        assert secret["metadata"]["namespace"] == "metaproxy"


@needs_kustomize
@overlays
async def test_broker_accepts_what_its_overlay_gives_it(overlay: str, tmp_path: Path) -> None:
    """The broker's environment and mounted files, as the kubelet gives them, build a broker:
    TLS pair, keys, store URL and key, control token, the cluster's JWKS and the policies."""
    from metaproxy.audit.signing_keys import load_private_key as load_audit_key
    from metaproxy.broker.config import BrokerConfig
    from metaproxy.broker.control import ControlToken
    from metaproxy.broker.server import BrokerServer
    from metaproxy.config import build_config, readable_paths
    from metaproxy.identity.keys import load_private_key

    rendered = RENDERED[overlay]
    environ = rendered.materialize("Deployment", "metaproxy-broker", "broker", tmp_path)
    config = build_config(BrokerConfig, None, environ)
    readable_paths(config)
    (trusted,) = config.trusted_issuers
    assert (trusted.issuer, trusted.kind) == (rendered.settings["issuer"], "kubernetes")
    assert config.audit_key is not None and config.document_key is not None
    load_audit_key(config.audit_key)
    load_private_key(config.document_key)
    assert config.control_token_file is not None
    token = config.control_token_file.read_text()
    assert ControlToken(config.control_token_file).matches(token)
    server = BrokerServer(config)  # builds every part, checking it; starts nothing
    assert set(server.policies.current.tenants) == {"shop"}
    await server.aclose()
    assert config.store == ("memory" if overlay == "single" else environ["METAPROXY_STORE"])
    assert (config.store_key_file is None) == (overlay == "single")


@needs_kustomize
@overlays
def test_broker_trusts_the_tokens_the_cluster_projects_for_its_pods(
    overlay: str, tmp_path: Path, issued_secrets: set[str]
) -> None:
    """A service-account token signed with the cluster's key (its JWKS is the overlay's
    cluster-jwks.json) for a pod of namespace shop verifies under the broker's trust and
    belongs to tenant shop; signed for another audience, it is refused."""
    from metaproxy.broker.config import BrokerConfig
    from metaproxy.config import build_config
    from metaproxy.errors import Unauthenticated
    from metaproxy.identity.verify import IdentityVerifier
    from metaproxy.policy.load import load_policy_dir

    rendered = RENDERED[overlay]
    environ = rendered.materialize("Deployment", "metaproxy-broker", "broker", tmp_path)
    config = build_config(BrokerConfig, None, environ)
    verifier = IdentityVerifier(
        config.trusted_issuers,
        leeway=config.token_leeway_seconds,
        cluster_name=config.cluster_name,
        cluster_arn=config.cluster_arn,
    )
    token = rendered.service_account_token("shop", "orders", pod="orders-7f9c")
    issued_secrets.add(token)
    identity = verifier.verify(token)
    assert (identity.kind, identity.namespace, identity.service_account) == (
        "kubernetes",
        "shop",
        "orders",
    )
    assert identity.cluster_name == rendered.settings["cluster-name"]
    issuers = [trusted.issuer for trusted in config.trusted_issuers]
    policies = load_policy_dir(config.policies_dir, kubernetes_issuers=issuers)
    assert [t.tenant for t in policies.tenants.values() if t.claims(identity)] == ["shop"]

    environ["METAPROXY_TRUST"] = environ["METAPROXY_TRUST"].replace(",metaproxy-broker,", ",x,")
    other_audience = build_config(BrokerConfig, None, environ)
    with pytest.raises(Unauthenticated):
        IdentityVerifier(other_audience.trusted_issuers).verify(token)


def certificate(pem: bytes) -> Any:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem)


def verify_server_certificate(ca_pem: bytes, leaf_pem: bytes, host: str) -> None:
    """The leaf is valid for `host` under the CA, as a TLS client checks it."""
    from cryptography.x509 import DNSName
    from cryptography.x509.verification import PolicyBuilder, Store

    verifier = (
        PolicyBuilder().store(Store([certificate(ca_pem)])).build_server_verifier(DNSName(host))
    )
    verifier.verify(certificate(leaf_pem), [])


@needs_kustomize
@overlays
def test_webhook_accepts_its_arguments_and_is_trusted_by_the_api_server(
    overlay: str, tmp_path: Path
) -> None:
    """The webhook's arguments build its config; its certificate is valid for its Service under
    the caBundle; the sidecars it injects verify the broker's Service under the broker CA."""
    from metaproxy.cli import build_parser
    from metaproxy.config import build_config, readable_paths
    from metaproxy.process.runtime import server_tls_context
    from metaproxy.webhook.config import WebhookConfig

    rendered = RENDERED[overlay]
    rendered.materialize("Deployment", "metaproxy-webhook", "webhook", tmp_path)
    webhook = rendered.container("Deployment", "metaproxy-webhook", "webhook")
    arguments = [re.sub(r"=/etc/", f"={tmp_path}/etc/", argument) for argument in webhook["args"]]
    config = build_config(WebhookConfig, build_parser("webhook").parse_args(arguments), {})
    readable_paths(config)
    server_tls_context(config.tls_cert, config.tls_key)
    assert config.image == webhook["image"] == rendered.settings["image"]
    assert config.region == rendered.settings["region"]

    service = rendered.one("Service", "metaproxy-webhook")["metadata"]
    (hook,) = rendered.one("MutatingWebhookConfiguration", "metaproxy-injector")["webhooks"]
    ca_bundle = base64.b64decode(hook["clientConfig"]["caBundle"])
    assert ca_bundle == (rendered.secrets / "webhook-tls" / "ca.pem").read_bytes()
    assert config.tls_cert is not None
    verify_server_certificate(
        ca_bundle, config.tls_cert.read_bytes(), f"{service['name']}.{service['namespace']}.svc"
    )
    broker_tls = rendered.data(
        "Secret", rendered.one("Secret", "metaproxy-broker-tls")["metadata"]["name"]
    )
    host = config.broker_url.split("//", 1)[1].rsplit(":", 1)[0]
    verify_server_certificate(broker_tls["ca.crt"], broker_tls["tls.crt"], host)
    assert (
        broker_tls["ca.crt"] != ca_bundle
    )  # one CA each: the webhook's key cannot pose as the broker


@needs_kustomize
def test_each_setting_lives_in_one_place(tmp_path: Path) -> None:
    """Changing a value in settings.yaml changes every field that carries it, and the old value
    is left nowhere in the rendered manifests."""
    eks = RENDERED["eks"]
    tree = tmp_path / "kubernetes"
    shutil.copytree(eks.directory.parent.parent, tree)
    directory = tree / "overlays" / "eks"
    old = eks.settings
    new = {
        "image": "registry.test/metaproxy:9.9.9",
        "issuer": "https://oidc.eks.eu-west-3.amazonaws.com/id/0123456789ABCDEF0123456789ABCDEF",
        "region": "eu-west-3",
        "cluster-name": "other-cluster",
        "cluster-arn": "arn:aws:eks:eu-west-3:444455556666:cluster/other-cluster",
        "audit-s3-url": "s3://other-audit-bucket/other-cluster/",
        "broker-role-arn": "arn:aws:iam::444455556666:role/other-broker",
    }
    assert set(new) == set(old)
    text = (directory / "settings.yaml").read_text()
    for key, value in new.items():
        text = text.replace(f"  {key}: {old[key]}\n", f"  {key}: {value}\n")
    (directory / "settings.yaml").write_text(text)
    changed = manifests.render_directory("eks", directory, eks.cluster_key)
    assert changed.settings == new

    for key, value in old.items():
        assert value not in changed.text, f"{key}: {value} is still in the rendered manifests"
    broker = changed.env("Deployment", "metaproxy-broker", "broker", "pod-0")
    assert broker["METAPROXY_TRUST"].split(",")[0] == new["issuer"]
    assert broker["METAPROXY_STS_REGION"] == new["region"]
    assert broker["METAPROXY_CLUSTER_NAME"] == new["cluster-name"]
    assert broker["METAPROXY_CLUSTER_ARN"] == new["cluster-arn"]
    assert broker["METAPROXY_AUDIT_S3_URL"] == new["audit-s3-url"]
    account = changed.one("ServiceAccount", "metaproxy-broker")["metadata"]["annotations"]
    assert account["eks.amazonaws.com/role-arn"] == new["broker-role-arn"]
    webhook = changed.container("Deployment", "metaproxy-webhook", "webhook")
    assert f"--image={new['image']}" in webhook["args"]
    assert f"--region={new['region']}" in webhook["args"]
    images = {
        c["image"]
        for d in changed.objects
        if "template" in d.get("spec", {})
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {
        new["image"],
        container(changed.one("StatefulSet", "metaproxy-valkey"))["image"],
    }
    assert all(d["metadata"]["name"] != "metaproxy-settings" for d in changed.objects)


@needs_kustomize
def test_single_overlay_runs_one_broker_on_the_memory_store() -> None:
    """`single`: one broker replica keeping fleet state in memory; no store, no Valkey, no
    autoscaler, no store key; everything else as in production."""
    single = RENDERED["single"]
    deployment = single.one("Deployment", "metaproxy-broker")
    assert deployment["spec"]["replicas"] == 1
    env = single.env("Deployment", "metaproxy-broker", "broker", "pod-0")
    assert env["METAPROXY_STORE"] == "memory"
    assert "METAPROXY_STORE_KEY_FILE" not in env
    kinds = {(d["kind"], single.base_name(d)) for d in single.objects}
    assert not {k for k in kinds if "valkey" in k[1] or k[0] == "HorizontalPodAutoscaler"}
    policy = single.one("NetworkPolicy", "metaproxy-broker")["spec"]
    assert {p["port"] for rule in policy["egress"] for p in rule["ports"]} == {53, 443}
    eks = RENDERED["eks"]
    for kind, name in (
        ("Namespace", "metaproxy"),
        ("Namespace", "metaproxy-node"),
        ("Service", "metaproxy-broker"),
        ("Service", "metaproxy-webhook"),
        ("PodDisruptionBudget", "metaproxy-broker"),
        ("NetworkPolicy", "metaproxy-webhook"),
        ("ConfigMap", "metaproxy-policies"),
    ):
        assert single.one(kind, name) == eks.one(kind, name), (kind, name)


# ---- Dockerfile --------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(instruction, arguments) per stage, with line continuations joined and comments dropped;
    a FROM's `${ARG}` replaced by the default of the ARG declared before the first FROM."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    defaults: dict[str, str] = {}
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "ARG" and not stages:
            name, _, default = arguments.strip().partition("=")
            defaults[name] = default
            continue
        if instruction.upper() == "FROM":
            stages.append([])
            for name, default in defaults.items():
                arguments = arguments.replace("${" + name + "}", default)
        assert stages, "instructions before the first FROM"
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def test_dockerfile_structure() -> None:
    """The Dockerfile's text: multi-stage, slim non-root final stage.

    This reads the Dockerfile's text (`make image-test`, tests/cluster/, builds and runs it).
    What it guarantees: the final stage starts FROM the base ARG (python:3.11-slim by default),
    copies only /opt/venv from the builder, installs no compiler, runs as a numeric non-root
    user and has `metaproxy` as its entrypoint with the sidecar as the default command.
    """
    stages = dockerfile_stages()
    assert len(stages) >= 2, "expected a builder stage and a final stage"
    builder, final = stages[0], stages[-1]
    assert builder[0] == ("FROM", "python:3.11-slim AS builder")
    assert final[0][1].split()[0] == "python:3.11-slim"
    builder_run = " ".join(a for i, a in builder if i == "RUN")
    assert "pip wheel" in builder_run
    assert "/opt/venv" in builder_run
    assert "metaproxy[broker]" in builder_run

    copies = [a for i, a in final if i == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    final_run = " ".join(a for i, a in final if i == "RUN")
    for forbidden in ("build-essential", "gcc", "g++", "clang", "make ", "pip install"):
        assert forbidden not in final_run, forbidden

    (user,) = [a for i, a in final if i == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit(), "USER must be numeric for runAsNonRoot"
    assert int(uid) == 10001
    assert ("ENTRYPOINT", '["metaproxy"]') in final
    (command,) = [json.loads(a) for i, a in final if i == "CMD"]
    assert command[0] == "sidecar"
    # As non-root the default command must not need port 80 (it could not start).
    listens = [command[i + 1] for i, flag in enumerate(command) if flag.endswith("-listen")]
    assert listens and all(int(address.rpartition(":")[2]) >= 1024 for address in listens)


def test_dockerignore_keeps_local_state_out() -> None:
    """The build context excludes the venv, git metadata, tests and key material."""
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "tests", "*.pem", "*.key"} <= ignored
    assert "metaproxy" not in ignored and "pyproject.toml" not in ignored
