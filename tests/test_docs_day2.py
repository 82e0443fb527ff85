"""The day-2 pages keep up with the code: every alert and every readiness reason has its entry
in docs/troubleshooting.md, the upgrade page covers each key, and the pages' links resolve."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from metaproxy.commands.configdoc import render
from metaproxy.models import BrokerLimits, SidecarLimits
from metaproxy.sidecar import diagnosis, link_local
from tests.support import REPO

DOCS = REPO / "docs"
TROUBLESHOOTING = (DOCS / "troubleshooting.md").read_text()
ALERTS = re.findall(
    r"^\s*- alert: (\w+)$", (REPO / "deploy/prometheus/alerts.yaml").read_text(), re.M
)

# Each readiness reason as the code words it, by the file that says it: the page must quote the
# same words, and a reworded reason fails here until the page follows.
READINESS = {
    "metaproxy/broker/admin.py": ["draining"],
    "metaproxy/broker/revocation.py": [
        "revocations not loaded (store unreachable)",
        "revocations not re-read for",
    ],
    "metaproxy/sidecar/app.py": ["not ready: draining"],
    "metaproxy/sidecar/diagnosis.py": [
        "identity token file unusable",
        "identity token expired at",
        "broker refused the identity token",
        "broker denied this task",
        "broker CA bundle unusable",
        "TLS verification of the broker at",
        "broker unreachable at",
    ],
    "metaproxy/sidecar/link_local.py": [
        "does not reach this sidecar",
        "answers, but not with this sidecar's tokens",
    ],
}


def test_the_rules_define_alerts() -> None:
    """The alert names are read from the rules file (so the next test is not vacuous)."""
    assert len(ALERTS) >= 20


@pytest.mark.parametrize("alert", ALERTS)
def test_every_alert_says_what_to_do(alert: str) -> None:
    """Each alert in deploy/prometheus/alerts.yaml has its row in docs/troubleshooting.md."""
    row = re.search(rf"^\| `{alert}` \|([^|]+)\|([^|]+)\|$", TROUBLESHOOTING, re.M)
    assert row is not None, f"{alert} has no row in docs/troubleshooting.md"
    assert all(cell.strip() for cell in row.groups())


@pytest.mark.parametrize(
    ("source", "reason"),
    [(source, reason) for source, reasons in READINESS.items() for reason in reasons],
)
def test_every_readiness_reason_says_what_to_do(source: str, reason: str) -> None:
    """Each /readyz reason, as the code words it, is in docs/troubleshooting.md."""
    assert reason in (REPO / source).read_text(), f"{source} no longer says {reason!r}"
    assert reason in TROUBLESHOOTING


def test_the_reasons_held_in_constants_are_quoted() -> None:
    """The sidecar's waiting and link-local checking lines, from their constants."""
    assert f"not ready: {diagnosis.WAITING}" in TROUBLESHOOTING
    assert f"not ready: {link_local.NOT_CHECKED}" in TROUBLESHOOTING


def test_the_upgrade_page_covers_the_fleet_and_every_key() -> None:
    """A rolling broker fleet; the store key, the audit key, the identity keys and the CA."""
    headings = re.findall(r"^## (.+)$", (DOCS / "upgrade.md").read_text(), re.M)
    for wanted in (
        "Rolling the broker fleet",
        "The store key",
        "The audit key",
        "The identity keys",
        "The broker CA",
    ):
        assert wanted in headings


@pytest.mark.parametrize("page", ["upgrade.md", "troubleshooting.md", "faq.md"])
def test_the_day2_pages_link_to_pages_and_sections_that_exist(page: str) -> None:
    """Every relative link names an existing page, and its #section an existing heading."""
    text = (DOCS / page).read_text()
    links = re.findall(r"\]\(([a-z_-]+\.md)(?:#([a-z0-9-]+))?\)", text)
    assert links
    for target, section in links:
        assert (DOCS / target).is_file(), f"{page} links to missing {target}"
        if section:
            slugs = {
                re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
                for heading in re.findall(r"^#+ (.+)$", (DOCS / target).read_text(), re.M)
            }
            assert section in slugs, f"{page} links to {target}#{section}, not a heading there"


def test_the_reference_documents_every_per_tenant_limit() -> None:
    """Each field of [limits.sidecar] and [limits.broker], with its default, unit and meaning."""
    page = render()
    for table, cls in (("limits.sidecar", SidecarLimits), ("limits.broker", BrokerLimits)):
        for f in fields(cls):
            assert f.metadata.get("doc") and f.metadata.get("unit"), f.name
            row = f"| `[{table}]` | `{f.name}` | `{f.default}` | {f.metadata['unit']} |"
            assert row in page, row
