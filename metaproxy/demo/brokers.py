"""The demo's brokers: one, as always, or a fleet of replicas, each with its own instance name,
audit chain and state dir, sharing a local Valkey/Redis (a single broker keeps its state in
process)."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaproxy.demo.local import (
    EMULATOR_CREDENTIALS,
    FleetSecrets,
    LocalKeys,
    broker_args,
    store_env,
)
from metaproxy.demo.processes import Child, start_metaproxy, stop_step


@dataclass(frozen=True)
class Replica:
    instance: str
    child: Child


@dataclass(frozen=True)
class Store:
    url: str = field(repr=False)  # "memory" for a single broker; else it holds the password
    shown: str  # the URL for the terminal and the state file: its password as ***
    pid: int | None


def audit_home(state_dir: Path, replicas: int) -> Path:
    """One broker's chain, or the fleet's folder of chains (`<instance>/`): apart, so that a
    single demo and a fleet demo run in one state directory never mix their logs in a folder
    `audit verify` would have to refuse."""
    return state_dir / ("audit" if replicas < 2 else "audit-fleet")


def start_store(replicas: int, state_dir: Path, stack: ExitStack, password: str) -> Store:
    """A single broker keeps its state in process; replicas share a Valkey/Redis under the state
    dir, which asks for `password`: loopback is every local user's, and whoever reaches the store
    can lift revocations and read who holds which role."""
    if replicas < 2:
        return Store("memory", "memory", None)
    from metaproxy.broker.store.redis_conn import parse_store_url
    from metaproxy.testing.redis_server import RedisServer

    server = RedisServer(state_dir / "redis", password=password)
    url = server.start()
    stack.callback(stop_step("store", server.stop))
    shown = parse_store_url(url).redacted()
    print(f"store (redis)     {shown}   (AOF in {server.directory})")
    return Store(url, shown, server.pid)


def start_brokers(
    *,
    replicas: int,
    policies_dir: Path,
    state_dir: Path,
    drain_seconds: float,
    keys: LocalKeys,
    fleet: FleetSecrets,
    store: Store,
    sts_endpoint: str,
    started: list[Child],
) -> list[Replica]:
    """One broker as always, or `replicas` of them, each with its own instance name, audit
    chain and state dir (the audit chains are per replica; the store is what they share)."""
    single = replicas < 2
    brokers = []
    for i in range(1, replicas + 1):
        instance = "demo-broker" if single else f"demo-broker-{i}"
        name = "broker" if single else f"broker-{i}"
        child = start_metaproxy(
            name,
            [
                *broker_args(
                    keys,
                    policies_dir=policies_dir,
                    audit_dir=audit_home(state_dir, replicas) / ("" if single else instance),
                    sts_endpoint=sts_endpoint,
                    instance=instance,
                    fleet=fleet,
                    state_dir=state_dir / ("state" if single else f"state-{i}"),
                    store=not single,
                ),
                "--drain-seconds",
                str(drain_seconds),
            ],
            ready_file=state_dir / f"{name}.ready.json",
            log_file=state_dir / "logs" / f"{name}.log",
            env={**EMULATOR_CREDENTIALS, **({} if single else store_env(store.url))},
        )
        started.append(child)
        brokers.append(Replica(instance, child))
        control = child.ready.get("control_url", "")
        extra = f", control {control}" if control else ""
        print(f"{name:<17} {child.ready['url']}  (admin {child.ready['admin_url']}{extra})")
    return brokers


def describe_broker(broker: Replica) -> dict[str, Any]:
    ready = broker.child.ready
    return {
        "url": ready["url"],
        "admin_url": ready["admin_url"],
        # The broker's ready file names its control API once the broker serves one.
        "control_url": ready.get("control_url", ""),
        "instance": broker.instance,
        "pid": broker.child.process.pid,
    }
