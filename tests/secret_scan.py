"""The secret scan: no secret issued during a run is in any log, audit or store file it wrote.

A pytest plugin (tests/conftest.py loads it). Every process of the run, the only one or each
xdist worker, appends each identity token it issues and each secret access key and session
token its brokers hand out to `issued-secrets.txt` in its base temp dir as it goes, so a worker
that dies still leaves its list behind. When the session ends, the process that owns it (xdist's
controller, or the only process) merges the lists of every process of the run and looks for each
exact value in every file the run wrote that holds log lines (each process's session log,
child processes' output), audit records (segments, checkpoints) or store data (Valkey/Redis
append-only files). A leak fails the session, naming the file and the kind of secret, never
the secret itself.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

SECRETS_FILE = "issued-secrets.txt"  # holds the secrets by design; never scanned
SESSION_LOG = "session.log"
# Shorter values, such as moto's fake key "testing", would be found by chance.
MIN_LENGTH = 16
WORKER_BASETEMP = "secret_scan_basetemp"  # the key in xdist's workeroutput

BASETEMP = pytest.StashKey[Path]()  # this process's, once the session fixture has run


def kind_of(secret: str) -> str:
    if secret.startswith("metaproxy-aws-v1."):
        return "AWS attestation"  # a signed GetCallerIdentity, session token inside
    return "identity token" if secret.startswith("eyJ") else "STS secret"


class IssuedSecrets(set[str]):
    """The secrets this process issued; each also goes to its list file as it is added."""

    def __init__(self) -> None:
        super().__init__()
        self._file: IO[str] | None = None

    def open(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")
        self._file.writelines(f"{secret}\n" for secret in self)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def add(self, secret: str) -> None:
        if secret in self:
            return
        super().add(secret)
        if self._file is not None:
            self._file.write(f"{secret}\n")
            self._file.flush()  # a worker killed mid-run still leaves a complete list

    def update(self, *groups: Iterable[str]) -> None:
        for group in groups:
            for secret in group:
                self.add(secret)


ISSUED = IssuedSecrets()


# -- the scan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leak:
    path: Path  # relative to the run's root
    kind: str

    def __str__(self) -> str:
        return f"{self.path}: an issued {self.kind}"


@dataclass(frozen=True)
class ScanReport:
    root: Path
    lists: int  # processes whose secrets were merged
    secrets: Counter[str]  # by kind
    files: int
    leaks: list[Leak]
    problems: list[str]  # why the scan itself cannot be trusted

    @property
    def ok(self) -> bool:
        return not self.leaks and not self.problems

    def summary(self) -> str:
        kinds = ", ".join(counted(n, kind) for kind, n in sorted(self.secrets.items()))
        found = f"{len(self.leaks)} leaked" if self.leaks else "none found"
        return (
            f"{counted(sum(self.secrets.values()), 'secret')} issued by "
            f"{counted(self.lists, 'process')} ({kinds or 'none'}), looked for in "
            f"{counted(self.files, 'file')} under {self.root}: {found}"
        )


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def is_scanned(path: Path) -> bool:
    """Log lines, audit segments and checkpoints, and Valkey/Redis append-only files."""
    name = path.name
    return (
        name.endswith((".log", ".jsonl", ".aof"))
        or (name.startswith("checkpoint-") and name.endswith(".json"))
        or name == "latest-checkpoint.json"
    )


def secret_lists(root: Path) -> list[Path]:
    """The lists of the run's processes: the root's own, or one per xdist worker's directory.
    Deeper ones belong to pytest sessions that tests ran themselves (pytester), not this run."""
    return sorted(p for p in [root / SECRETS_FILE, *root.glob(f"*/{SECRETS_FILE}")] if p.is_file())


def merged_secrets(lists: Iterable[Path]) -> set[str]:
    return {
        line
        for path in lists
        for line in path.read_text(encoding="utf-8").splitlines()
        if len(line) >= MIN_LENGTH
    }


def scan(root: Path) -> ScanReport:
    """Every issued secret of the run under `root`, looked for in every scanned file there."""
    lists = secret_lists(root)
    secrets = merged_secrets(lists)
    problems = [
        f"{path.parent.relative_to(root) / SESSION_LOG}: missing (its process's log records "
        "went unscanned)"
        for path in lists
        if not (path.parent / SESSION_LOG).is_file()
    ]
    files = sorted(p for p in root.rglob("*") if is_scanned(p) and p.is_file())
    needles = [(secret.encode(), kind_of(secret)) for secret in sorted(secrets)]
    leaks: list[Leak] = []
    for path in files:
        data = path.read_bytes()
        kinds = sorted({kind for needle, kind in needles if needle in data})
        leaks += [Leak(path.relative_to(root), kind) for kind in kinds]
    return ScanReport(
        root=root,
        lists=len(lists),
        secrets=Counter(kind_of(s) for s in secrets),
        files=len(files),
        leaks=leaks,
        problems=problems,
    )


# -- the plugin ----------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def session_log(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Every log record this process emits, unscrubbed, in <basetemp>/session.log; and the
    secrets it issues in <basetemp>/issued-secrets.txt. Both are for the scan at the end."""
    base = tmp_path_factory.getbasetemp()
    request.config.stash[BASETEMP] = base
    ISSUED.open(base / SECRETS_FILE)
    path = base / SESSION_LOG
    handler = logging.FileHandler(path, encoding="utf-8")
    # Plain format, no scrubbing filter: a secret passed to a logger must show up here. The
    # root level stays as it is (tests assert on what caplog sees), so this holds warnings and
    # errors, which are where error details, and so accidental secrets, end up.
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    yield path
    root.removeHandler(handler)
    handler.close()
    ISSUED.close()


@pytest.fixture(scope="session")
def issued_secrets() -> IssuedSecrets:
    """For tests that hand out secrets of their own making: add each, and the scan looks for it."""
    return ISSUED


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SecretScan(config), "secret-scan")


class SecretScan:
    """Hooks of the process that owns the session: merge, scan, and fail the session on a leak."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.worker_dirs: list[Path] = []
        self.tests_set_up = 0
        self.report: ScanReport | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Under xdist the controller sees every worker's reports: a test that was set up means
        # some process ran the session fixture above, so there is something to scan.
        if report.when == "setup" and report.passed:
            self.tests_set_up += 1

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object | None) -> None:
        """xdist's controller: a worker is done, and says where its base temp dir was."""
        output: dict[str, Any] = getattr(node, "workeroutput", {})
        if WORKER_BASETEMP in output:
            self.worker_dirs.append(Path(output[WORKER_BASETEMP]))

    # Last: after the session's fixtures are torn down, so whatever they logged is scanned too.
    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        workeroutput: dict[str, Any] | None = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller scans
            if BASETEMP in self.config.stash:
                workeroutput[WORKER_BASETEMP] = str(self.config.stash[BASETEMP])
            return
        roots = {path.parent for path in self.worker_dirs}
        if BASETEMP in self.config.stash:
            roots.add(self.config.stash[BASETEMP])
        if len(roots) == 1:
            self.report = scan(roots.pop())
        elif roots or self.tests_set_up:
            # xdist puts every worker's base temp dir in the controller's, so there is one root.
            problem = f"expected one base temp dir for the run, found {sorted(roots) or 'none'}"
            self.report = ScanReport(Path(), 0, Counter(), 0, [], [problem])
        if self.report is not None and not self.report.ok:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        report = self.report
        if report is None:
            return
        if report.ok:
            terminalreporter.write_line(f"secret scan: {report.summary()}")
            return
        terminalreporter.section("secret scan FAILED", sep="=", red=True, bold=True)
        for line in [*report.problems, *map(str, report.leaks)]:
            terminalreporter.write_line(line, red=True)
        terminalreporter.write_line(report.summary())
