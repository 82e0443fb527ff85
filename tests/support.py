"""Helpers shared by the tests: key material, configs, starting real servers, running clients."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import aiohttp
import pytest

from metaproxy.audit.writer import AuditLog
from metaproxy.broker.config import BrokerConfig
from metaproxy.config import TrustedIssuer
from metaproxy.demo.local import AUDIENCE, ISSUER, LocalKeys, make_local_keys
from metaproxy.demo.processes import Child
from metaproxy.sidecar.config import SidecarConfig

if TYPE_CHECKING:
    from metaproxy.sidecar.process import Sidecar

REPO = Path(__file__).resolve().parents[1]


Pki = LocalKeys


def make_pki(directory: Path) -> Pki:
    return make_local_keys(directory)


def cannot_run(reason: str) -> NoReturn:
    """A test that needs what this machine lacks: outside CI it skips and says why; in CI
    (CI=true, as root, after `make system-deps`) it fails, because nothing may skip there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"cannot run in CI: {reason}")
    pytest.skip(reason)


def require_tool(name: str, package: str) -> str:
    """The path of a command the test runs (`package`: the Debian package that has it)."""
    path = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if path is None:
        cannot_run(f"{name} is not installed (Debian: {package}; `make system-deps` installs it)")
    return path


CONTROL_TOKEN = "test-control-token-0123456789abcdef"


def control_token_file(tmp: Path) -> Path:
    path = tmp / "control.token"
    if not path.exists():
        path.write_text(CONTROL_TOKEN + "\n")
    return path


def broker_config(
    tmp: Path, pki: Pki, sts_url: str, policies_dir: Path, **overrides: Any
) -> BrokerConfig:
    config = BrokerConfig(
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        tls_cert=pki.broker_cert,
        tls_key=pki.broker_key,
        policies_dir=policies_dir,
        policy_reload_seconds=0.2,
        trusted_issuers=(TrustedIssuer(ISSUER, AUDIENCE, pki.jwks),),
        document_key=pki.document_key,
        audit_dir=tmp / "audit",
        audit_key=pki.audit_key,
        sts_endpoint=sts_url,
        instance="test-broker",
        drain_seconds=2.0,
        control_listen="127.0.0.1:0",
        control_token_file=control_token_file(tmp),
        state_dir=tmp / "state",
    )
    return replace(config, **overrides)


def issue(pki: Pki, task: str, tenant: str, app: str = "web", **kwargs: Any) -> str:
    from metaproxy.identity.issue import issue_token

    return issue_token(
        pki.identity_key,
        issuer=ISSUER,
        audience=AUDIENCE,
        task=task,
        tenant=tenant,
        app=app,
        **kwargs,
    )


def sidecar_config(
    tmp: Path, pki: Pki, broker_url: str, token_file: Path, **overrides: Any
) -> SidecarConfig:
    config = SidecarConfig(
        broker_url=broker_url,
        broker_ca_file=pki.ca,
        identity_token_file=token_file,
        imds_listen=("127.0.0.1:0",),
        container_listen=("127.0.0.1:0",),
        admin_listen="127.0.0.1:0",
        authorization_token_file=token_file.with_name(token_file.stem + ".auth"),
        drain_seconds=2.0,
    )
    return replace(config, **overrides)


async def wait_ready(admin_url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(admin_url + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{admin_url} not ready after {timeout}s")
            await asyncio.sleep(0.05)


def audit_records(audit_dir: Path) -> list[dict[str, Any]]:
    """Every record of a local audit log, in order (the chain itself is audit/verify's job)."""
    return [
        json.loads(line)
        for segment in sorted(audit_dir.glob("segment-*.jsonl"))
        for line in segment.read_text().splitlines()
    ]


def hang_audit_disk(log: AuditLog) -> threading.Event:
    """Occupy the log's disk thread with a job that hangs until the returned event is set: the
    log's next write waits behind it, as behind an fsync on a hung disk."""
    stall = threading.Event()
    executor = log._disk._executor
    assert executor is not None
    executor.submit(stall.wait, 30)
    return stall


def clean_aws_env(**extra: str) -> dict[str, str]:
    """The environment of an unconfigured client: no AWS credentials or config anywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE="/nonexistent/config",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials",
        AWS_DEFAULT_REGION="us-east-1",
    )
    env.update(extra)
    return env


async def run_command(
    *argv: str, env: dict[str, str], timeout: float = 60.0, cwd: Path | None = None
) -> tuple[int, str, str]:
    """A real client in its own process, so the event loop keeps serving while it runs."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def run_python(code: str, env: dict[str, str], timeout: float = 60.0) -> tuple[int, str, str]:
    return await run_command(sys.executable, "-c", code, env=env, timeout=timeout)


CALLER_IDENTITY = """
import json, sys, boto3
sts = boto3.client("sts", endpoint_url=sys.argv[1] if len(sys.argv) > 1 else None)
print(json.dumps(sts.get_caller_identity()))
"""


async def caller_identity(sts_url: str, env: dict[str, str]) -> dict[str, Any]:
    import json

    rc, out, err = await run_command(
        sys.executable, "-c", CALLER_IDENTITY, sts_url, env=env, timeout=60
    )
    assert rc == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(admin_url: str) -> Samples:
    """Every sample of an admin port's /metrics, by (name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(admin_url + "/metrics") as answer:
        assert answer.status == 200
        text = await answer.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def start_sidecar_process(
    directory: Path, broker_url: str, pki: Pki, token: str, *extra_args: str
) -> Child:
    """`metaproxy sidecar` as its own process (the real entry point, on uvloop) on free loopback
    ports, started; its log is `directory/sidecar.log`. The caller waits for ready and stops it."""
    from metaproxy.demo.processes import start_metaproxy

    token_file = directory / "sidecar.jwt"
    token_file.write_text(token)
    args = ["sidecar", "--broker-url", broker_url, "--broker-ca-file", str(pki.ca)]
    args += ["--identity-token-file", str(token_file), "--imds-listen", "127.0.0.1:0"]
    args += ["--container-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *extra_args]
    return await asyncio.to_thread(
        start_metaproxy,
        "sidecar",
        args,
        ready_file=directory / "sidecar.ready",
        log_file=directory / "sidecar.log",
    )


ALERT_RULES = REPO / "deploy" / "prometheus" / "alerts.yaml"


def container_request(sidecar: Sidecar) -> tuple[str, int, bytes]:
    """The host and port of an in-process sidecar's container endpoint, and a kept-alive GET of
    its credentials with the task's token, as bytes to write (and repeat) on a raw connection."""
    host, port = sidecar.container_url.removeprefix("http://").rsplit(":", 1)
    request = (
        f"GET /v1/credentials HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: {sidecar.state.authorization_token}\r\n\r\n"
    ).encode()
    return host, int(port), request


def require_promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make test` installs it (Debian's prometheus)")
    return promtool


def expected_annotations(alert: str, labels: dict[str, str]) -> dict[str, str]:
    """The annotations of `alert` in deploy/prometheus/alerts.yaml with `labels` filled in, as
    promtool renders them."""
    import yaml

    rule = next(
        r
        for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]
        for r in group["rules"]
        if r.get("alert") == alert
    )
    annotations: dict[str, str] = {}
    for name, template in rule["annotations"].items():
        rendered = template
        for label, value in labels.items():
            rendered = rendered.replace(f"{{{{ $labels.{label} }}}}", value)
        annotations[name] = rendered
    return annotations


def assert_promtool_passes(promtool: str, path: Path, test: dict[str, Any]) -> None:
    """Run `promtool test rules` on `test` (a rule test file's content), written to `path`."""
    path.write_text(json.dumps(test))  # JSON is YAML
    result = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
