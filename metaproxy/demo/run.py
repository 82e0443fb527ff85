"""The whole flow on one laptop: moto as the local STS, the broker, one sidecar per sample tenant,
and boto3 getting each task's credentials through its sidecar with no configuration but the
sidecar's address."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaproxy.demo.local import (
    AUDIENCE,
    EMULATOR_CREDENTIALS,
    ISSUER,
    broker_args,
    make_local_keys,
    sidecar_args,
)
from metaproxy.demo.processes import Child, start_metaproxy, wait_ready


@dataclass(frozen=True)
class DemoOptions:
    policies_dir: Path
    state_dir: Path
    state_file: Path | None
    once: bool


def _tenants(policies_dir: Path) -> list[str]:
    from metaproxy.policy.load import load_policy_dir

    return sorted(load_policy_dir(policies_dir).tenants)


def _client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_DEFAULT_REGION="us-east-1",
        **extra,
    )
    return env


CALLER_IDENTITY = (
    "import json, sys, boto3\n"
    "print(json.dumps(boto3.client('sts', endpoint_url=sys.argv[1]).get_caller_identity()))\n"
)


def caller_identity_via(imds_url: str, sts_endpoint: str) -> dict[str, Any]:
    """An unmodified boto3 in its own process, told nothing but where the metadata service is."""
    out = subprocess.run(  # noqa: S603 - our interpreter, our script
        [sys.executable, "-c", CALLER_IDENTITY, sts_endpoint],
        env=_client_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds_url + "/"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _role_arn(container_url: str, token_file: Path) -> str:
    request = urllib.request.Request(  # noqa: S310 - loopback URL we bound ourselves
        container_url + "/v1/credentials", headers={"Authorization": token_file.read_text()}
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        return str(json.load(response)["RoleArn"])


def run_demo(options: DemoOptions) -> int:
    from metaproxy.identity.issue import issue_token
    from metaproxy.testing.emulator import StsEmulator

    state_dir = options.state_dir.resolve()
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    policies_dir = options.policies_dir.resolve()
    tenants = _tenants(policies_dir)
    keys = make_local_keys(state_dir / "keys")
    audit_dir = state_dir / "audit"
    with ExitStack() as stack:
        emulator = StsEmulator(log_path=logs / "sts-emulator.log")
        sts_endpoint = emulator.start()
        stack.callback(emulator.stop)
        print(f"local STS (moto)  {sts_endpoint}")
        broker = start_metaproxy(
            "broker",
            broker_args(
                keys,
                policies_dir=policies_dir,
                audit_dir=audit_dir,
                sts_endpoint=sts_endpoint,
                instance="demo-broker",
            ),
            ready_file=state_dir / "broker.ready.json",
            log_file=logs / "broker.log",
            env=EMULATOR_CREDENTIALS,
        )
        stack.callback(broker.stop)
        print(f"broker            {broker.ready['url']}  (admin {broker.ready['admin_url']})")
        sidecars: list[tuple[str, str, Child, Path]] = []
        for tenant in tenants:
            task = f"demo-{tenant}-1"
            identity_file = state_dir / "tasks" / task / "identity.jwt"
            identity_file.parent.mkdir(parents=True, exist_ok=True)
            identity_file.write_text(
                issue_token(
                    keys.identity_key,
                    issuer=ISSUER,
                    audience=AUDIENCE,
                    task=task,
                    tenant=tenant,
                    app="web",
                    ttl=86_400,
                )
            )
            auth_file = identity_file.with_name("authorization-token")
            sidecar = start_metaproxy(
                f"sidecar {tenant}",
                sidecar_args(
                    keys,
                    broker_url=broker.ready["url"],
                    identity_file=identity_file,
                    authorization_file=auth_file,
                ),
                ready_file=identity_file.with_name("sidecar.ready.json"),
                log_file=logs / f"sidecar-{tenant}.log",
            )
            stack.callback(sidecar.stop)
            sidecars.append((tenant, task, sidecar, auth_file))
        described = []
        for tenant, task, sidecar, auth_file in sidecars:
            wait_ready(sidecar.ready["admin_url"])
            imds_url = sidecar.ready["imds_urls"][0]
            container_url = sidecar.ready["container_urls"][0]
            identity = caller_identity_via(imds_url, sts_endpoint)
            print(f"{tenant:<8} task {task:<16} boto3 via {imds_url} → {identity['Arn']}")
            described.append(
                {
                    "tenant": tenant,
                    "task": task,
                    "role_arn": _role_arn(container_url, auth_file),
                    "imds_url": imds_url,
                    "container_credentials_url": container_url + "/v1/credentials",
                    "authorization_token_file": str(auth_file),
                    "admin_url": sidecar.ready["admin_url"],
                    "pid": sidecar.process.pid,
                }
            )
        state = {
            "sts_endpoint": sts_endpoint,
            "broker": {
                "url": broker.ready["url"],
                "admin_url": broker.ready["admin_url"],
                "pid": broker.process.pid,
            },
            "sidecars": described,
            "audit_dir": str(audit_dir),
            "policies_dir": str(policies_dir),
        }
        if options.state_file is not None:
            options.state_file.write_text(json.dumps(state, indent=2))
        print(f"audit log         {audit_dir}   (metaproxy audit query {audit_dir})")
        if options.once:
            return 0
        print("serving; Ctrl-C to stop")
        with contextlib.suppress(KeyboardInterrupt):
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0
