"""prometheus-operator objects: generated from alerts.yaml and scrape.yaml's jobs, up to date,
shaped as the CRDs require, and scraping the ports the manifests and the webhook name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import manifests

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
OPERATOR = PROMETHEUS / "operator"
BASE = ROOT / "deploy" / "kubernetes" / "base"
GENERATOR = PROMETHEUS / "generate_operator.py"
API_VERSION = "monitoring.coreos.com/v1"
# The fields of the CRDs' RuleGroup, Rule, PodMonitorSpec and PodMetricsEndpoint these objects
# may use (prometheus-operator's API reference); anything else would be refused by its schema.
GROUP_FIELDS = {"name", "interval", "rules", "limit", "partial_response_strategy", "query_offset"}
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
POD_MONITOR_FIELDS = {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel"}
ENDPOINT_FIELDS = {"port", "path", "scheme", "interval", "relabelings", "metricRelabelings"}
DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")
ALERT_NAME = re.compile(r"[A-Z][A-Za-z0-9]*")


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((OPERATOR / name).read_text()) if d]


def base(name: str) -> dict[str, Any]:
    result: dict[str, Any] = yaml.safe_load((BASE / name).read_text())
    return result


def test_generated_objects_are_up_to_date() -> None:
    """operator/ is what the generator makes from alerts.yaml now (`make prometheus-operator`)."""
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_prometheus_rule_holds_the_alerts_yaml_groups() -> None:
    """One PrometheusRule whose groups are alerts.yaml's (the rules promtool tests), each group
    and rule in the shape the CRD requires."""
    (rule,) = documents("prometheusrule.yaml")
    assert (rule["apiVersion"], rule["kind"]) == (API_VERSION, "PrometheusRule")
    assert rule["metadata"]["namespace"] == "metaproxy"
    assert rule["metadata"]["labels"]["app.kubernetes.io/part-of"] == "metaproxy"
    groups = rule["spec"]["groups"]
    assert groups == yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())["groups"]
    names = [group["name"] for group in groups]
    assert names and len(set(names)) == len(names)
    for group in groups:
        assert set(group) <= GROUP_FIELDS and group["rules"]
        for each in group["rules"]:
            assert set(each) <= RULE_FIELDS
            assert ALERT_NAME.fullmatch(each["alert"]) and "record" not in each
            assert isinstance(each["expr"], str) and each["expr"].strip()
            assert DURATION.fullmatch(each.get("for", "0s"))
            for table in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in each.get(table, {}).values())


def test_pod_monitors_scrape_the_ports_the_manifests_and_webhook_name() -> None:
    """The broker monitor selects the broker pods of their namespace on their admin port; the
    sidecar monitor selects the pods the webhook injects, on the port it gives the sidecar."""
    from metaproxy.webhook.containers import sidecar_container
    from metaproxy.webhook.settings import InjectionSettings, PodSecrets

    monitors = {d["metadata"]["name"]: d for d in documents("podmonitors.yaml")}
    assert set(monitors) == {"metaproxy-broker", "metaproxy-sidecar"}
    for monitor in monitors.values():
        assert (monitor["apiVersion"], monitor["kind"]) == (API_VERSION, "PodMonitor")
        assert set(monitor["spec"]) <= POD_MONITOR_FIELDS
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert set(endpoint) <= ENDPOINT_FIELDS and endpoint["path"] == "/metrics"

    broker = monitors["metaproxy-broker"]["spec"]
    deployment = base("broker-deployment.yaml")
    template = deployment["spec"]["template"]
    selector = broker["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert broker["namespaceSelector"] == {"matchNames": [deployment["metadata"]["namespace"]]}
    (container,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (endpoint,) = broker["podMetricsEndpoints"]
    assert ports[endpoint["port"]] == int(template["metadata"]["annotations"]["prometheus.io/port"])

    sidecar = monitors["metaproxy-sidecar"]["spec"]
    (hook,) = base("webhook-mutatingwebhookconfiguration.yaml")["webhooks"]
    assert sidecar["selector"] == hook["objectSelector"]
    assert sidecar["namespaceSelector"] == {"any": True}
    settings = InjectionSettings(image="metaproxy", broker_url="https://broker:8443")
    injected = sidecar_container(settings, "", PodSecrets.new(lambda: "x" * 32))
    (endpoint,) = sidecar["podMetricsEndpoints"]
    assert [p["name"] for p in injected["ports"]] == [endpoint["port"]]


@pytest.mark.skipif(manifests.kustomize_problem() is not None, reason="no kubectl kustomize v5")
def test_operator_folder_applies_with_kubectl_kustomize() -> None:
    """`kubectl apply -k deploy/prometheus/operator` applies the rule and both monitors."""
    rendered = [d for d in yaml.safe_load_all(manifests.kustomize(OPERATOR)) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == [
        ("PodMonitor", "metaproxy-broker"),
        ("PodMonitor", "metaproxy-sidecar"),
        ("PrometheusRule", "metaproxy"),
    ]
