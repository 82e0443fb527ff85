"""Alerts, dashboard and SLO queries use only metrics and labels the code actually exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from metaproxy.broker import metrics as broker_metrics
from metaproxy.broker.server import BrokerServer
from metaproxy.sidecar import metrics as sidecar_metrics
from tests.support import Pki, issue, require_tool

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "metaproxy.json"
SLO = ROOT / "docs" / "slo.md"
HPA = ROOT / "deploy" / "kubernetes" / "components" / "fleet" / "broker-hpa.yaml"

METRIC_NAME = re.compile(r"\bmetaproxy_[a-z0-9_]*[a-z0-9]")
SELECTOR = re.compile(r"\b(metaproxy_[a-z0-9_]+)\{([^}]*)\}")
LABEL_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# Added by the scrape configuration (deploy/prometheus/scrape.yaml), not by the code.
TARGET_LABELS = {"namespace", "pod", "job", "instance"}
EXPORTED = sidecar_metrics.exported_names() | broker_metrics.exported_names()


def families() -> list[tuple[str, set[str]]]:
    """(name, label names) of every metric: the broker's definitions (named as queried) and
    the sidecar's own (metaproxy.sidecar.wire.exposition)."""
    found = [(metric.name, set(metric.labelnames)) for metric in sidecar_metrics.families()]
    found += [(family.name, set(family.labels)) for family in broker_metrics.FAMILIES]
    return found


def label_names() -> dict[str, set[str]]:
    """Sample name -> the labels it may carry (its metric's labels, plus `le` on buckets)."""
    labels: dict[str, set[str]] = {}
    for name, names in families():
        for suffix in ("", "_total", "_created", "_sum", "_count"):
            labels[name + suffix] = names
        labels[name + "_bucket"] = names | {"le"}
    return labels


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def queries() -> dict[str, str]:
    """Every PromQL query (or series name) we ship, by a name for failure messages."""
    found = {f"alert {rule['alert']}": rule["expr"] for rule in alert_rules()}
    for index, expr in enumerate(dashboard_exprs()):
        found[f"dashboard target {index}"] = expr
    for index, block in enumerate(re.findall(r"```promql\n(.*?)```", SLO.read_text(), re.S)):
        found[f"docs/slo.md promql block {index}"] = block
    series = re.findall(r"series: '([^']*)'", ALERT_TESTS.read_text())
    found["alerts_test.yaml series"] = "\n".join(series)
    found["broker-hpa.yaml"] = yaml.safe_load(HPA.read_text())["spec"]["metrics"][1]["pods"][
        "metric"
    ]["name"]
    return found


def prose() -> dict[str, str]:
    """Text that names metrics for people: alert annotations and the SLO document."""
    found = {f"alert {r['alert']} annotations": json.dumps(r["annotations"]) for r in alert_rules()}
    found["docs/slo.md"] = SLO.read_text()
    return found


# In prose a histogram may be named by its family (`..._seconds`); a query must name a sample.
FAMILIES = {name for name, _labels in families()}


def test_exported_names_cover_every_suffix() -> None:
    """exported_names() lists the counter, histogram and gauge samples the modules produce."""
    assert {
        "metaproxy_sidecar_requests_total",
        "metaproxy_sidecar_requests_created",
        "metaproxy_sidecar_request_seconds_bucket",
        "metaproxy_sidecar_request_seconds_sum",
        "metaproxy_sidecar_request_seconds_count",
        "metaproxy_sidecar_ready",
    } <= sidecar_metrics.exported_names()
    assert {
        "metaproxy_broker_queue_depth",
        "metaproxy_broker_sts_calls_total",
        "metaproxy_broker_audit_write_seconds_bucket",
        "metaproxy_broker_credentials_issued_total",
    } <= broker_metrics.exported_names()
    assert not sidecar_metrics.exported_names() & broker_metrics.exported_names()


async def test_exported_names_match_the_live_exposition(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """Every sample a running broker's /metrics and a sidecar's metrics expose is in
    exported_names()."""
    headers = {"Authorization": f"Bearer {issue(pki, 'names-task', 'acme')}"}
    async with https.post(broker.url + "/v1/credentials", json={}, headers=headers) as answer:
        assert answer.status == 200
    async with https.get(broker.admin_url + "/metrics") as answer:
        broker_exposition = await answer.text()
    sidecar = sidecar_metrics.SidecarMetrics()
    sidecar.requests.labels(path_class="token", status="200", listener="127.0.0.1:8182").inc(0)
    sidecar.request_seconds.labels(path_class="token").observe(0.001)
    exposition = broker_exposition + sidecar.render().decode()
    exposed = {
        line.split("{")[0].split(" ")[0]
        for line in exposition.splitlines()
        if line.startswith("metaproxy_")
    }
    assert exposed
    assert exposed <= EXPORTED


QUERIES = queries()


@pytest.mark.parametrize("where", sorted(QUERIES))
def test_every_metric_name_queried_is_exported(where: str) -> None:
    """Alerts, dashboard, SLO queries, alert tests and the HPA query only exported samples."""
    used = set(METRIC_NAME.findall(QUERIES[where]))
    assert used, f"{where} names no metaproxy metric"
    unknown = used - EXPORTED
    assert not unknown, f"{where} uses metrics no module exports: {sorted(unknown)}"


def test_every_metric_named_in_prose_exists() -> None:
    """Alert descriptions and docs/slo.md name only metrics (or their samples) that exist."""
    for where, text in prose().items():
        unknown = set(METRIC_NAME.findall(text)) - EXPORTED - FAMILIES
        assert not unknown, f"{where} names metrics no module exports: {sorted(unknown)}"


def test_label_matchers_use_existing_labels() -> None:
    """Every `metric{label=...}` selector names labels the metric has (or target labels)."""
    labels = label_names()
    for where, text in (QUERIES | prose()).items():
        for name, matchers in SELECTOR.findall(text.replace('\\"', '"')):
            if name not in EXPORTED:
                continue  # reported by test_every_metric_name_used_is_exported
            for label in LABEL_MATCHER.findall(matchers):
                assert label in labels.get(name, set()) | TARGET_LABELS, (
                    f"{where}: {name} has no label {label!r}"
                )


def test_dashboard_shows_every_metric() -> None:
    """Each metric the code defines appears on at least one dashboard panel."""
    joined = "\n".join(dashboard_exprs())
    for name, _labels in families():
        assert re.search(rf"\b{name}(_total|_bucket|_sum|_count)?\b", joined), (
            f"{name} is on no dashboard panel"
        )


def test_dashboard_structure() -> None:
    """Panels have unique ids, fit the 24-column grid, and every query has an expr and refId."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "metaproxy"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


DURATION = re.compile(r"^(\d+[smhdwy])+$")


def test_alert_rules_structure() -> None:
    """A Prometheus rule file: named groups, unique alerts, each with expr, for, severity, text."""
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    group_names = [group["name"] for group in document["groups"]]
    assert len(group_names) == len(set(group_names))
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")"), rule["alert"]
        assert expr.count("{") == expr.count("}"), rule["alert"]
    slos = {rule["labels"].get("slo") for rule in rules} - {None}
    assert slos == {
        "credential-availability",
        "credential-latency",
        "credential-start",
        "broker-issuance",
    }


def test_slo_doc_gives_promql_for_each_objective() -> None:
    """docs/slo.md has a section and a PromQL block for each of the four objectives."""
    text = SLO.read_text()
    for heading in (
        "## Credential start latency",
        "## Credential request latency",
        "## Availability of credential serving",
        "## Failed issuance ratio at the broker",
    ):
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        assert "```promql" in section, heading
    for rule in alert_rules():
        anchor = rule["annotations"].get("runbook_url", "#").split("#", 1)[1]
        if anchor:
            slugs = {
                re.sub(r"[^a-z0-9 -]", "", line[3:].lower()).replace(" ", "-")
                for line in text.splitlines()
                if line.startswith("## ")
            }
            assert anchor in slugs, f"{rule['alert']} links to a missing section {anchor}"


def test_promtool_checks_and_unit_tests_pass() -> None:
    """`promtool check rules` accepts alerts.yaml and its unit tests (alerts_test.yaml) pass."""
    require_tool("promtool", "prometheus")
    check = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        ["promtool", "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_sidecar_metrics_import_nothing_of_the_broker() -> None:
    """The sidecar's metrics module loads neither the broker's metrics, nor boto3, nor
    prometheus-client (3.5 MB of every pod)."""
    code = (
        "import sys, metaproxy.sidecar.metrics\n"
        "bad = {'metaproxy.broker.metrics', 'boto3', 'prometheus_client'} & set(sys.modules)\n"
        "sys.exit(f'imported {sorted(bad)}' if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
