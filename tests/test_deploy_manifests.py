"""Kubernetes manifests validate against the API schemas; the Dockerfile has the agreed shape."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"
# The example AWS account's AssumeRole budget (calls per second) the broker manifests assume.
ACCOUNT_STS_BUDGET = 600.0


def load_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document is not None:
                documents.append((f"{path.relative_to(KUBERNETES)}#{index}", document))
    return documents


DOCUMENTS = load_documents()
BY_KIND: dict[str, list[dict[str, Any]]] = {}
for _, _document in DOCUMENTS:
    BY_KIND.setdefault(_document["kind"], []).append(_document)


def one(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in BY_KIND.get(kind, []) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


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
    """Every document is a valid Kubernetes 1.30 object with no unknown fields."""
    assert kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    if document["kind"] not in ("Namespace", "MutatingWebhookConfiguration"):
        assert document["metadata"].get("namespace"), f"{where} names no namespace"


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
        ("Namespace", "metaproxy-node"),
        ("DaemonSet", "metaproxy-cni"),
    }
    present = {(d["kind"], d["metadata"]["name"]) for _, d in DOCUMENTS}
    assert expected <= present
    assert not BY_KIND.get("Role") and not BY_KIND.get("ClusterRole")  # no API rights needed


def test_broker_deployment_is_hardened_and_configured() -> None:
    """Three non-root replicas, read-only root, probes on the admin port, METAPROXY_* config."""
    deployment = one("Deployment", "metaproxy-broker")
    assert deployment["spec"]["replicas"] == 3
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
    assert env["METAPROXY_TRUST"] == (
        "https://kubernetes.default.svc,metaproxy-broker,/etc/metaproxy/jwks/cluster.json,"
        "kubernetes"
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


def test_broker_joins_the_fleet_through_secrets_and_volumes() -> None:
    """Store URL from a Secret, key and token as Secret files, state on an emptyDir, control API."""
    deployment = one("Deployment", "metaproxy-broker")
    store = env_entry(deployment, "METAPROXY_STORE")
    assert "value" not in store, "the store URL carries a password: never inline"
    assert store["valueFrom"]["secretKeyRef"] == {"name": "metaproxy-store", "key": "url"}
    secrets = {d["metadata"]["name"]: d for d in BY_KIND["Secret"]}
    assert "url" in secrets["metaproxy-store"]["stringData"]
    fleet = secrets["metaproxy-broker-fleet"]["stringData"]
    for name, key in (
        ("METAPROXY_STORE_KEY_FILE", "store.key"),
        ("METAPROXY_CONTROL_TOKEN_FILE", "control.token"),
    ):
        path = env_entry(deployment, name)["value"]
        assert Path(path).name == key and key in fleet
        assert volume_of(deployment, path)["secret"]["secretName"] == "metaproxy-broker-fleet"
    assert env_entry(deployment, "METAPROXY_CONTROL_LISTEN")["value"] == "0.0.0.0:9443"
    state_dir = env_entry(deployment, "METAPROXY_STATE_DIR")["value"]
    assert "emptyDir" in volume_of(deployment, state_dir)
    service_ports = {
        p["name"]: p["port"] for p in one("Service", "metaproxy-broker")["spec"]["ports"]
    }
    assert service_ports["control"] == 9443


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


def test_audit_buffer_bound_fits_the_audit_volume() -> None:
    """The broker refuses to issue before its unshipped audit log fills the volume (eviction)."""
    deployment = one("Deployment", "metaproxy-broker")
    bound = int(env_entry(deployment, "METAPROXY_AUDIT_MAX_LOCAL_BYTES")["value"])
    audit = volume_of(deployment, env_entry(deployment, "METAPROXY_AUDIT_DIR")["value"])
    size = quantity_bytes(audit["emptyDir"]["sizeLimit"])
    # Room for the open segment, checkpoints and the rotation that crosses the bound.
    assert 0 < bound <= size * 0.8


def test_sts_budget_is_the_accounts_whole_budget() -> None:
    """One budget in the store for the fleet: not divided by the HPA's maxReplicas any more."""
    deployment = one("Deployment", "metaproxy-broker")
    budget = float(env_entry(deployment, "METAPROXY_STS_BUDGET_PER_SECOND")["value"])
    max_replicas = one("HorizontalPodAutoscaler", "metaproxy-broker")["spec"]["maxReplicas"]
    assert budget == ACCOUNT_STS_BUDGET
    assert budget != ACCOUNT_STS_BUDGET / max_replicas


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
    password = env_entry(statefulset, "VALKEY_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {"name": "metaproxy-store", "key": "password"}
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


def test_secret_templates_hold_placeholders_and_are_labelled_to_be_skipped() -> None:
    """Applying the folder with -l '!metaproxy.io/template' never overwrites the real Secrets."""
    for secret in BY_KIND["Secret"]:
        assert secret["metadata"]["labels"]["metaproxy.io/template"] == "true"
        assert all("REPLACE-ME" in value for value in secret["stringData"].values())


def test_broker_env_names_are_config_fields() -> None:
    """Every METAPROXY_* variable the broker gets is a BrokerConfig field (or TRUST)."""
    import dataclasses

    from metaproxy.broker.config import BrokerConfig

    fields = {f"METAPROXY_{f.name.upper()}" for f in dataclasses.fields(BrokerConfig)}
    fields.add("METAPROXY_TRUST")
    env = {e["name"] for e in container(one("Deployment", "metaproxy-broker"))["env"]}
    assert env <= fields


def test_autoscaler_uses_cpu_and_queue_depth() -> None:
    """The HPA scales the broker on CPU and on the queue-depth Pods metric."""
    hpa = one("HorizontalPodAutoscaler", "metaproxy-broker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"]["metric"]["name"] == "metaproxy_broker_queue_depth"
    assert hpa["spec"]["minReplicas"] >= 3


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


def test_cni_daemonset_has_a_namespace_that_admits_node_agents() -> None:
    """`metaproxy` stays restricted, which refuses hostNetwork, hostPath and uid 0; the
    DaemonSet's own namespace allows them and holds nothing else."""
    daemonset = one("DaemonSet", "metaproxy-cni")
    namespace = daemonset["metadata"]["namespace"]
    labels = one("Namespace", namespace)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert [d for _, d in DOCUMENTS if d["metadata"].get("namespace") == namespace] == [daemonset]
    restricted = one("Namespace", "metaproxy")["metadata"]["labels"]
    assert restricted["pod-security.kubernetes.io/enforce"] == "restricted"


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


# ---- Dockerfile --------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(instruction, arguments) per stage, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        assert stages, "instructions before the first FROM"
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def test_dockerfile_structure() -> None:
    """Static checks only (no Docker engine here): multi-stage, slim non-root final stage.

    This reads the Dockerfile's text; it does not build the image, so it cannot catch a failing
    RUN step. What it does guarantee: the final stage starts FROM python:3.11-slim, copies only
    /opt/venv from the builder, installs no compiler, runs as a numeric non-root user and has
    `metaproxy` as its entrypoint with the sidecar as the default command.
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
