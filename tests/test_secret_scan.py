"""The secret scan (tests/secret_scan.py): what it records, where it looks, and that a leak in
any process of a parallel run fails the run without printing the secret."""

from __future__ import annotations

import textwrap
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from tests.conftest import ISSUED_SECRETS, record_broker_secrets
from tests.secret_scan import SECRETS_FILE, SESSION_LOG, is_scanned, scan
from tests.support import REPO, Pki, issue

STS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
IDENTITY_TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ0LTEifQ.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"


def worker_dir(root: Path, name: str, *secrets: str) -> Path:
    """A process's base temp dir as the plugin leaves it: its list and its session log."""
    directory = root / name
    directory.mkdir()
    (directory / SECRETS_FILE).write_text("".join(f"{s}\n" for s in secrets))
    (directory / SESSION_LOG).write_text("12:00:00 WARNING metaproxy.broker all quiet\n")
    return directory


def test_a_secret_one_worker_issued_is_found_in_another_workers_log(tmp_path: Path) -> None:
    """The lists of every process are merged: a log anywhere in the run is checked for all."""
    worker_dir(tmp_path, "popen-gw0", STS_SECRET)
    gw1 = worker_dir(tmp_path, "popen-gw1", IDENTITY_TOKEN)
    (gw1 / "test_x0" / "audit").mkdir(parents=True)
    (gw1 / "test_x0" / "sidecar.log").write_text(f"refused key {STS_SECRET}\n")
    (gw1 / "test_x0" / "audit" / "segment-0001.jsonl").write_text(f'{{"t": "{IDENTITY_TOKEN}"}}')

    report = scan(tmp_path)

    assert [str(leak) for leak in report.leaks] == [
        "popen-gw1/test_x0/audit/segment-0001.jsonl: an issued identity token",
        "popen-gw1/test_x0/sidecar.log: an issued STS secret",
    ]
    assert (report.lists, report.files, report.ok) == (2, 4, False)
    assert STS_SECRET not in report.summary()
    assert IDENTITY_TOKEN not in report.summary()


def test_a_clean_run_reports_what_it_looked_at(tmp_path: Path) -> None:
    """No leak: the summary counts the secrets by kind, the processes and the files."""
    worker_dir(tmp_path, "popen-gw0", STS_SECRET, "testing")  # too short to look for
    worker_dir(tmp_path, "popen-gw1", IDENTITY_TOKEN)

    report = scan(tmp_path)

    assert report.ok
    assert report.summary() == (
        "2 secrets issued by 2 processes (1 STS secret, 1 identity token), "
        f"looked for in 2 files under {tmp_path}: none found"
    )


def test_a_process_without_its_session_log_makes_the_scan_fail(tmp_path: Path) -> None:
    """A list with no session log beside it means that process's log records went unscanned."""
    gw0 = worker_dir(tmp_path, "popen-gw0", STS_SECRET)
    (gw0 / SESSION_LOG).unlink()
    assert scan(tmp_path).problems == [
        "popen-gw0/session.log: missing (its process's log records went unscanned)"
    ]


def test_lists_of_sessions_that_tests_ran_themselves_are_not_merged(tmp_path: Path) -> None:
    """Only the run's own processes' lists count; a pytester session deeper down has its own."""
    worker_dir(tmp_path, "popen-gw0")
    inner = tmp_path / "popen-gw0" / "test_inner0" / "basetemp"
    inner.mkdir(parents=True)
    (inner / SECRETS_FILE).write_text(f"{STS_SECRET}\n")
    (inner / SESSION_LOG).write_text(f"{STS_SECRET}\n")
    assert scan(tmp_path).ok


async def test_tokens_and_a_brokers_credentials_are_recorded_and_its_audit_files_scanned(
    broker: BrokerServer,
    https: aiohttp.ClientSession,
    pki: Pki,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """What the scan looks for is what the fixtures hand out, and the broker's audit segment
    is among the files it reads."""
    token = issue(pki, "t-scan", "acme")
    headers = {"Authorization": f"Bearer {token}"}
    async with https.post(f"{broker.url}/v1/credentials", json={}, headers=headers) as response:
        assert response.status == 200
        credentials = (await response.json())["credentials"]
    record_broker_secrets(broker)

    issued = {token, credentials["secret_access_key"], credentials["session_token"]}
    assert issued <= ISSUED_SECRETS
    listed = (tmp_path_factory.getbasetemp() / SECRETS_FILE).read_text().splitlines()
    assert issued <= set(listed)
    segments = list((tmp_path / "audit").glob("segment-*.jsonl"))
    assert segments
    assert all(is_scanned(segment) for segment in segments)


INNER_TESTS = """
import logging

import pytest

from tests.secret_scan import ISSUED


def planted(worker: str) -> str:
    return f"planted-secret-of-{worker}-0123456789"


@pytest.mark.parametrize("n", range(3))
def test_issue(worker_id: str, n: int) -> None:
    ISSUED.add(planted(worker_id))
    if worker_id == "gw1" and n == 2:
        logging.getLogger("inner").warning("leaked %s", planted("gw0"))
"""


def test_a_leak_on_one_worker_of_a_secret_another_issued_fails_the_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `pytest -n 2` run: gw1 logs a secret only gw0 issued; the run exits 1 and names
    the file and the kind, and the secret appears nowhere in its output."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    # Only the two plugins the run needs: the others cost seconds of start-up in each process.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_inner=textwrap.dedent(INNER_TESTS))

    result = pytester.runpytest_subprocess(
        "-p", "xdist", "-p", "tests.secret_scan", "-n", "2", "--dist", "each"
    )

    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(
        ["*secret scan FAILED*", "popen-gw1/session.log: an issued STS secret", "*1 leaked"]
    )
    assert "planted-secret-of-gw0" not in result.stdout.str() + result.stderr.str()
