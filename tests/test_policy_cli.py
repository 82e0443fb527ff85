"""`metaproxy policy check` and `metaproxy policy explain` as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from metaproxy.cli import main

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "policies"
BROKEN = ROOT / "tests" / "data" / "policies" / "broken"


def mistake_line(name: str) -> int:
    """The line of a broken fixture marked `# MISTAKE`."""
    lines = (BROKEN / f"{name}.toml").read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if "# MISTAKE" in line)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    return status, capsys.readouterr().out


def test_check_accepts_the_shipped_policies(capsys: pytest.CaptureFixture[str]) -> None:
    """The sample policies check clean."""
    assert run(capsys, "policy", "check", str(SHIPPED)) == (0, "ok: 2 tenants\n")


def test_check_reports_each_mistake_with_file_line_and_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """null, an unknown key, a bad role ARN and an unbuildable session name: all four reported."""
    status, out = run(capsys, "policy", "check", str(BROKEN))
    assert status == 1
    reported = {tuple(line.split(": ", 2)[:2]) for line in out.splitlines()}
    assert reported == {
        (f"{BROKEN}/nulls.toml:{mistake_line('nulls')}", "session.name"),
        (f"{BROKEN}/unknown.toml:{mistake_line('unknown')}", "owner"),
        (f"{BROKEN}/badarn.toml:{mistake_line('badarn')}", "roles[0].arn"),
        (f"{BROKEN}/badname.toml:{mistake_line('badname')}", "session.name"),
    }


def test_check_as_a_real_process_fails_on_problems() -> None:
    """`python -m metaproxy policy check` exits non-zero and prints problems on stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "metaproxy", "policy", "check", str(BROKEN)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert f"unknown.toml:{mistake_line('unknown')}: owner: unknown key" in result.stdout


def test_explain_shows_the_assume_role_call(capsys: pytest.CaptureFixture[str]) -> None:
    """An allowed platform identity: exit 0 and the exact AssumeRole parameters."""
    status, out = run(
        capsys,
        "policy",
        "explain",
        str(SHIPPED),
        "--tenant",
        "acme",
        "--task",
        "t-42",
        "--app",
        "web",
    )
    report = json.loads(out)
    assert status == 0
    assert (report["allowed"], report["tenant"], report["rule"]) == (
        True,
        "acme",
        "acme.toml roles[0]",
    )
    call = report["assume_role"]
    assert call["RoleArn"] == report["role_arn"] == "arn:aws:iam::111111111111:role/acme-app"
    assert (call["RoleSessionName"], call["SourceIdentity"], call["DurationSeconds"]) == (
        "acme.t-42",
        "acme.web",
        3600,
    )
    assert {"Key": "task", "Value": "t-42"} in call["Tags"]
    assert "acme-data/t-42/*" in call["Policy"]


def test_explain_denied_exits_3_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    """A role the app may not have: exit 3, allowed false, the rule and reason shown."""
    status, out = run(
        capsys,
        "policy",
        "explain",
        str(SHIPPED),
        "--tenant",
        "acme",
        "--task",
        "t-1",
        "--app",
        "web",
        "--role",
        "acme-reports",
    )
    report = json.loads(out)
    assert status == 3
    assert (report["allowed"], report["rule"], report["assume_role"]) == (
        False,
        "app-not-allowed",
        None,
    )
    assert "reports" in report["reason"]


def test_explain_kubernetes_identity(capsys: pytest.CaptureFixture[str]) -> None:
    """A pod in namespace globex gets globex's role; its service account is the app."""
    status, out = run(
        capsys,
        "policy",
        "explain",
        str(SHIPPED),
        "--kind",
        "kubernetes",
        "--namespace",
        "globex",
        "--service-account",
        "billing",
        "--task",
        "pod-1",
    )
    report = json.loads(out)
    assert (status, report["tenant"]) == (0, "globex")
    assert {"Key": "app", "Value": "billing"} in report["assume_role"]["Tags"]


ECS_EXAMPLE = SHIPPED / "examples" / "ecs"
ATTESTED = ["--issuer", "aws:111122223333", "--tenant", "shop", "--task", "0f1e2d3c4b5a6978"]


def test_explain_aws_identity_as_the_brokers_rule_maps_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An attested ECS task (account, the rule's tenant and app, its task ID) gets shop's role
    for its app; the same names as a platform token match no tenant, an app the role does not
    list is denied."""
    explain = ["policy", "explain", str(ECS_EXAMPLE), *ATTESTED]
    status, out = run(capsys, *explain, "--kind", "aws", "--app", "shop-orders-task")
    report = json.loads(out)
    assert (status, report["tenant"], report["role_arn"]) == (
        0,
        "shop",
        "arn:aws:iam::111122223333:role/shop-orders",
    )
    call = report["assume_role"]
    assert (call["RoleSessionName"], call["SourceIdentity"]) == (
        "shop.0f1e2d3c4b5a6978",
        "shop.shop-orders-task",
    )
    status, out = run(capsys, *explain, "--kind", "platform", "--app", "shop-orders-task")
    assert (status, json.loads(out)["rule"]) == (3, "no-tenant")
    status, out = run(
        capsys, *explain, "--kind", "aws", "--app", "shop-reports-task", "--role", "shop-orders"
    )
    assert (status, json.loads(out)["rule"]) == (3, "app-not-allowed")


def test_explain_aws_requires_the_account_tenant_and_app(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --issuer aws:ACCOUNT (12 digits), --tenant or --app: exit 2, naming all three."""
    aws = ["policy", "explain", str(ECS_EXAMPLE), "--kind", "aws", "--task", "t"]
    for missing in (
        ["--tenant", "shop", "--app", "shop-orders-task"],
        ["--issuer", "aws:1111", "--tenant", "shop", "--app", "shop-orders-task"],
        ["--issuer", "aws:111122223333", "--tenant", "shop"],
    ):
        assert main([*aws, *missing]) == 2
        assert "--issuer aws:ACCOUNT (12 digits), --tenant and --app" in capsys.readouterr().err


def test_explain_on_an_invalid_directory_is_a_config_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Explaining against broken policies refuses (exit 2) and names the problems."""
    status = main(["policy", "explain", str(BROKEN), "--tenant", "x", "--task", "t"])
    assert status == 2
    assert "roles[0].arn" in capsys.readouterr().err


def test_explain_requires_the_identity_fields_of_its_kind(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A platform identity needs --tenant; a kubernetes one needs namespace and account."""
    assert main(["policy", "explain", str(SHIPPED), "--task", "t"]) == 2
    assert "--tenant is required" in capsys.readouterr().err
    kube = ["policy", "explain", str(SHIPPED), "--kind", "kubernetes", "--task", "t"]
    assert main([*kube, "--namespace", "acme"]) == 2
    assert "--service-account" in capsys.readouterr().err


TWO_CLUSTERS = [
    "--trust",
    "https://kubernetes.default.svc,metaproxy-broker,/jwks/prod.json,kubernetes",
    "--trust",
    "https://dev.example,metaproxy-broker,/jwks/dev.json,kubernetes",
]


def test_check_refuses_unpinned_kubernetes_rules_with_two_clusters_trusted(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With two Kubernetes issuers trusted (as the broker's --trust), a rule without `issuer`
    is reported with file, line and field; the shipped policies pin theirs and pass."""
    assert run(capsys, "policy", "check", str(SHIPPED), *TWO_CLUSTERS) == (0, "ok: 2 tenants\n")
    policies = tmp_path / "policies"
    policies.mkdir()
    text = (SHIPPED / "globex.toml").read_text()
    pinned = 'issuer = "https://kubernetes.default.svc"\nnamespace = "globex"'
    assert pinned in text
    (policies / "globex.toml").write_text(text.replace(pinned, 'namespace = "globex"'))
    lines = (policies / "globex.toml").read_text().splitlines()
    line = lines.index('kind = "kubernetes"')  # the rule's `[[identities]]` header, 1-based

    assert run(capsys, "policy", "check", str(policies)) == (0, "ok: 1 tenants\n")
    status, out = run(capsys, "policy", "check", str(policies), *TWO_CLUSTERS)
    assert status == 1
    assert out.startswith(f"{policies}/globex.toml:{line}: identities[1].issuer: missing; ")
    assert len(out.splitlines()) == 1


def test_check_reads_the_trusted_issuers_from_the_environment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the broker's pod, METAPROXY_TRUST (the broker's own setting) is what check uses."""
    policies = tmp_path / "policies"
    policies.mkdir()
    text = (SHIPPED / "acme.toml").read_text()
    (policies / "acme.toml").write_text(
        text.replace('issuer = "https://kubernetes.default.svc"', "")
    )
    monkeypatch.setenv("METAPROXY_TRUST", ";".join(TWO_CLUSTERS[1::2]))
    status, out = run(capsys, "policy", "check", str(policies))
    assert (status, [line.split(": ")[1] for line in out.splitlines()]) == (
        1,
        ["identities[1].issuer"],
    )
