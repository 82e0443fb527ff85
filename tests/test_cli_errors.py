"""Ordinary mistakes end as one line naming the flag or file, never a traceback: exit status 2
for a usage mistake, 1 for a run-time failure (see metaproxy/cli.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO, clean_aws_env

USAGE, RUNTIME = 2, 1


def metaproxy(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metaproxy", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env=clean_aws_env(),
    )


def last_line(stderr: str) -> str:
    """Servers may log before they fail (JSON lines); the verdict is the last line."""
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cli-errors")
    result = subprocess.run(
        [sys.executable, "-m", "metaproxy", "identity", "keygen", "--out", str(base)],
        capture_output=True,
        check=True,
    )
    assert result.returncode == 0
    garbage = base / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return {"base": base, "jwks": base / "identity.jwks.json", "garbage": garbage}


def broker_argv(files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "broker",
        *("--policies-dir", str(REPO / "policies"), "--audit-dir", str(files["base"] / "audit")),
        *("--trust", f"metaproxy-platform,metaproxy-broker,{files['jwks']}"),
        *("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"),
        *extra,
    ]


def issue_argv(key: str) -> list[str]:
    return ["identity", "issue", "--key", key, "--task", "t-1", "--tenant", "acme"]


# (id, argv builder, exit status, what the last line of stderr says)
CASES = [
    (
        "busy port (broker --listen)",
        lambda f, port: broker_argv(f, "--listen", f"127.0.0.1:{port}"),
        RUNTIME,
        "metaproxy broker: --listen: cannot listen on 127.0.0.1:{port}: address already in use",
    ),
    (
        "busy port (broker --admin-listen)",
        lambda f, port: broker_argv(f, "--admin-listen", f"127.0.0.1:{port}"),
        RUNTIME,
        "metaproxy broker: --admin-listen: cannot listen on 127.0.0.1:{port}: "
        "address already in use",
    ),
    (
        "busy port (sidecar --imds-listen)",
        lambda f, port: [
            "sidecar",
            "--imds-listen",
            f"127.0.0.1:{port}",
            "--container-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--identity-token-file",
            str(f["base"] / "none.jwt"),
        ],
        RUNTIME,
        "metaproxy sidecar: --imds-listen: cannot listen on 127.0.0.1:{port}: "
        "address already in use",
    ),
    (
        "missing TLS file",
        lambda f, port: broker_argv(
            f, "--tls-cert", "/nonexistent/broker.pem", "--tls-key", "/nonexistent/broker.key"
        ),
        RUNTIME,
        "metaproxy broker: --tls-cert: /nonexistent/broker.pem: No such file or directory",
    ),
    (
        "a directory where a file goes",
        lambda f, port: broker_argv(f, "--tls-cert", str(f["base"]), "--tls-key", str(f["base"])),
        RUNTIME,
        "metaproxy broker: --tls-cert: {base}: Is a directory",
    ),
    (
        "a file that is not a certificate",
        lambda f, port: broker_argv(
            f, "--tls-cert", str(f["garbage"]), "--tls-key", str(f["garbage"])
        ),
        RUNTIME,
        "metaproxy broker: --tls-cert/--tls-key: {garbage}, {garbage}: not a PEM certificate",
    ),
    (
        "missing policies directory",
        lambda f, port: broker_argv(f, "--policies-dir", "/nonexistent"),
        RUNTIME,
        "metaproxy broker: --policies-dir: /nonexistent: No such file or directory",
    ),
    (
        "missing JWKS file",
        lambda f, port: broker_argv(f, "--trust", "iss,aud,/nonexistent/jwks.json"),
        RUNTIME,
        "metaproxy broker: --trust: /nonexistent/jwks.json: No such file or directory",
    ),
    (
        "missing key file (identity issue --key)",
        lambda f, port: issue_argv("/nonexistent/identity.key"),
        RUNTIME,
        "metaproxy identity issue: --key: /nonexistent/identity.key: No such file or directory",
    ),
    (
        "a file that is not a signing key (identity issue --key)",
        lambda f, port: issue_argv(str(f["garbage"])),
        RUNTIME,
        "metaproxy identity issue: --key: cannot load private key {garbage}: ValueError",
    ),
    (
        "bad value",
        lambda f, port: broker_argv(f, "--drain-seconds", "soon"),
        USAGE,
        "metaproxy broker: --drain-seconds: 'soon' is not a number",
    ),
    (
        "bad choice",
        lambda f, port: ["sidecar", "--imds-v1", "sometimes"],
        USAGE,
        "metaproxy sidecar: --imds-v1: 'sometimes' is not one of allow, refuse",
    ),
    (
        "conflicting flags (--socket with --listen)",
        lambda f, port: broker_argv(f, "--socket", str(f["base"] / "b.sock")),
        USAGE,
        "metaproxy broker: --socket and --listen conflict",
    ),
    (
        "half a TLS pair",
        lambda f, port: broker_argv(f, "--tls-cert", str(f["garbage"])),
        USAGE,
        "metaproxy broker: --tls-cert and --tls-key go together",
    ),
    (
        "webhook without an image",
        lambda f, port: ["webhook", "--broker-url", "https://broker:8443"],
        USAGE,
        "metaproxy webhook: --image: must name the sidecar's container image",
    ),
    (
        "misspelt audit event",
        lambda f, port: ["audit", "query", str(f["base"]), "--event", "isued"],
        USAGE,
        "argument --event: invalid choice: 'isued'",
    ),
    (
        "demo with a bad drain time",
        lambda f, port: ["demo", "--drain-seconds", "0"],
        USAGE,
        "argument --drain-seconds: '0' must be more than 0",
    ),
]


@pytest.mark.parametrize(
    ("build", "status", "expected"),
    [pytest.param(build, status, expected, id=name) for name, build, status, expected in CASES],
)
def test_ordinary_mistakes_are_one_line(
    build: object, status: int, expected: str, files: dict[str, Path], busy_port: int
) -> None:
    """The exit status says usage (2) or run time (1); the last line names the flag or file."""
    argv = build(files, busy_port)  # type: ignore[operator]
    result = metaproxy(*argv)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == status, result.stderr
    line = last_line(result.stderr)
    wanted = expected.format(port=busy_port, base=files["base"], garbage=files["garbage"])
    assert wanted in line, result.stderr


def test_a_closed_pipe_is_not_an_error() -> None:
    """`metaproxy ... | head` when head has gone: no traceback, no message."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        result = subprocess.run(
            [sys.executable, "-m", "metaproxy", "policy", "explain", str(REPO / "policies"),
             "--tenant", "acme", "--task", "t-1", "--app", "web"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == RUNTIME


def test_a_closed_pipe_on_help_is_not_an_error() -> None:
    """`metaproxy broker --help | head -1` too."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "metaproxy", "broker", "--help"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.stderr == ""


def test_version() -> None:
    """`metaproxy --version` names the installed version."""
    result = metaproxy("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("metaproxy ")
