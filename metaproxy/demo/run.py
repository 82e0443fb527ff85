"""The whole flow on one laptop: moto as the local STS, the broker, one sidecar per sample tenant,
and boto3 getting each task's credentials through its sidecar with no configuration but the
sidecar's address."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaproxy.demo.brokers import audit_home, describe_broker, start_brokers, start_store
from metaproxy.demo.local import (
    AUDIENCE,
    ISSUER,
    make_fleet_secrets,
    make_local_keys,
    sidecar_args,
)
from metaproxy.demo.processes import (
    Child,
    children_ignore_interrupt,
    start_metaproxy,
    stop_all,
    stop_step,
    wait_for_stop,
    wait_ready,
)


@dataclass(frozen=True)
class DemoOptions:
    policies_dir: Path
    state_dir: Path
    state_file: Path | None
    once: bool
    replicas: int = 1  # 2 or more: a fleet of brokers sharing a local Valkey/Redis
    drain_seconds: float = 5.0  # on Ctrl-C, each part's drain is capped at this


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


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during start-up: stop what runs, in order, and exit 130."""


def _stage(name: str, children: list[Child], timeout: float) -> Callable[[], None]:
    """A stop step for the exit stack: drain `children` together within `timeout`, and say so."""

    def stop() -> None:
        if not children:
            return
        started = time.monotonic()
        killed = stop_all(children, timeout)
        took = time.monotonic() - started
        if killed:
            print(f"stopped {name}: {', '.join(killed)} did not drain within {timeout:g}s, killed")
        else:
            print(f"stopped {name} (drained in {took:.1f}s)")

    return stop


def _write_token(path: Path, token: str) -> None:
    """Identity tokens are credentials: 0600, written without following a planted link."""
    from metaproxy.fsutil import write_atomically

    write_atomically(path, token.encode("ascii"), 0o600)


def try_it_lines(imds_url: str, container_url: str, auth_file: Path, sts: str) -> list[str]:
    """What a person pastes into a shell to use this sidecar: both endpoints, and one call."""
    container = container_url + "/v1/credentials"
    no_other_credentials = (
        "env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE "
        f"AWS_CONFIG_FILE={os.devnull} AWS_SHARED_CREDENTIALS_FILE={os.devnull}"
    )
    return [
        "  # the EC2 metadata endpoint (IMDS), as any AWS SDK finds it:",
        f"  export AWS_EC2_METADATA_SERVICE_ENDPOINT={imds_url}/ AWS_DEFAULT_REGION=us-east-1",
        "  # or the container-credentials endpoint (SDKs prefer it when both are set):",
        f"  export AWS_CONTAINER_CREDENTIALS_FULL_URI={container}"
        f" AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={shlex.quote(str(auth_file))}",
        "  # try it (with no other credentials in the way; STS is the local emulator):",
        f"  {no_other_credentials} AWS_EC2_METADATA_SERVICE_ENDPOINT={imds_url}/"
        f" AWS_DEFAULT_REGION=us-east-1 aws sts get-caller-identity --endpoint-url {sts}",
    ]


def run_demo(options: DemoOptions) -> int:
    with children_ignore_interrupt() as stop_requested:
        try:
            return _run_demo(options, stop_requested)
        except Interrupted:
            return 130


def _run_demo(options: DemoOptions, stop_requested: Callable[[], bool]) -> int:  # noqa: PLR0915
    from metaproxy.identity.issue import issue_token
    from metaproxy.testing.emulator import StsEmulator

    def check() -> None:
        if stop_requested():
            raise Interrupted

    state_dir = options.state_dir.resolve()
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    policies_dir = options.policies_dir.resolve()
    tenants = _tenants(policies_dir)
    keys = make_local_keys(state_dir / "keys")
    fleet = make_fleet_secrets(state_dir / "keys")
    audit_dir = audit_home(state_dir, options.replicas)
    drain = options.drain_seconds
    # A child that drained has exited; one more second covers interpreter shutdown.
    stage_timeout = drain + 1.0
    # The exit stack stops in reverse: sidecars, then brokers, then the store, then STS, so no
    # process outlives what it depends on and no broker sees its store vanish while it serves.
    with ExitStack() as stack:
        emulator = StsEmulator(log_path=logs / "sts-emulator.log")
        sts_endpoint = emulator.start()
        stack.callback(stop_step("local STS", emulator.stop))
        print(f"local STS (moto)  {sts_endpoint}")
        check()
        store = start_store(options.replicas, state_dir, stack, fleet.store_password)
        broker_children: list[Child] = []
        stack.callback(_stage("brokers", broker_children, stage_timeout))
        brokers = start_brokers(
            replicas=options.replicas,
            policies_dir=policies_dir,
            state_dir=state_dir,
            drain_seconds=drain,
            keys=keys,
            fleet=fleet,
            store=store,
            sts_endpoint=sts_endpoint,
            started=broker_children,
        )
        check()
        sidecar_children: list[Child] = []
        stack.callback(_stage("sidecars", sidecar_children, stage_timeout))
        sidecars: list[tuple[str, str, Child, Path, str]] = []
        for n, tenant in enumerate(tenants):
            # Round-robin, as a Service in front of the replicas would spread new connections.
            broker = brokers[n % len(brokers)]
            task = f"demo-{tenant}-1"
            identity_file = state_dir / "tasks" / task / "identity.jwt"
            identity_file.parent.mkdir(parents=True, exist_ok=True)
            _write_token(
                identity_file,
                issue_token(
                    keys.identity_key,
                    issuer=ISSUER,
                    audience=AUDIENCE,
                    task=task,
                    tenant=tenant,
                    app="web",
                    ttl=86_400,
                ),
            )
            auth_file = identity_file.with_name("authorization-token")
            sidecar = start_metaproxy(
                f"sidecar {tenant}",
                [
                    *sidecar_args(
                        keys,
                        broker_url=broker.child.ready["url"],
                        identity_file=identity_file,
                        authorization_file=auth_file,
                    ),
                    *("--drain-seconds", str(drain)),
                ],
                ready_file=identity_file.with_name("sidecar.ready.json"),
                log_file=logs / f"sidecar-{tenant}.log",
            )
            sidecar_children.append(sidecar)
            sidecars.append((tenant, task, sidecar, auth_file, broker.instance))
            check()
        described = []
        for tenant, task, sidecar, auth_file, instance in sidecars:
            wait_ready(sidecar.ready["admin_url"])
            imds_url = sidecar.ready["imds_urls"][0]
            container_url = sidecar.ready["container_urls"][0]
            identity = caller_identity_via(imds_url, sts_endpoint)
            via = f" (broker {instance})" if len(brokers) > 1 else ""
            print(f"{tenant:<8} task {task:<16} boto3 via {imds_url} → {identity['Arn']}{via}")
            for line in try_it_lines(imds_url, container_url, auth_file, sts_endpoint):
                print(line)
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
            check()
        state = {
            "sts_endpoint": sts_endpoint,
            "ca_file": str(keys.ca),
            "control_token_file": str(fleet.control_token_file),
            "store": {"url": store.shown, "pid": store.pid},
            "broker": describe_broker(brokers[0]),
            "brokers": [describe_broker(b) for b in brokers],
            "sidecars": described,
            "audit_dir": str(audit_dir),
            "policies_dir": str(policies_dir),
        }
        if options.state_file is not None:
            options.state_file.write_text(json.dumps(state, indent=2))
        if len(brokers) > 1:
            # One chain per replica under audit-fleet/<instance>/: `audit verify` and `query`
            # read the folder as a fleet.
            print(f"audit logs        {audit_dir}   (metaproxy audit query --fleet {audit_dir})")
        else:
            print(f"audit log         {audit_dir}   (metaproxy audit query {audit_dir})")
        if options.once:
            return 0
        print(f"serving; Ctrl-C to stop (each part drains for at most {drain:g}s)", flush=True)
        wait_for_stop(stop_requested)
        print("stopping: sidecars, brokers, store, STS", flush=True)
    return 0
