"""A node's own EC2 metadata service, for tests: one instance's IMDS, IMDSv2 only.

The sidecar asks its node's IMDS for the fields the operator allows (placement, instance, network,
spot and event notices) and must never pass on the node's role, credentials, keys, user-data or
identity document. Tests run two of these, as two nodes in two zones, and check what each pod
reports. It serves what a real instance serves at these paths, in EC2's formats, including the
secrets that must never come through (marked `NODE-SECRET` so a test can grep for them).

    python -m metaproxy.testing.ec2_node --listen 169.254.169.254:80 --zone us-east-1b ...

Run as a process of its own (a node's namespace, in tests/podlab.py), it cannot be asked for
`asked`: `--log FILE` appends each path it is asked, one a line, as it is asked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

SECRET_MARK = "NODE-SECRET"  # noqa: S105 - a marker in every value the node keeps to itself


@dataclass(frozen=True)
class Instance:
    """The node: what its IMDS says about it."""

    instance_id: str = "i-0a1b2c3d4e5f60718"
    instance_type: str = "m6i.large"
    region: str = "us-east-1"
    zone: str = "us-east-1b"
    zone_id: str = "use1-az2"
    local_ipv4: str = "10.0.1.17"
    mac: str = "0e:12:34:56:78:9a"
    ami_id: str = "ami-0123456789abcdef0"
    spot_action: dict[str, str] | None = None  # a spot interruption notice, when set
    tags: dict[str, str] = field(default_factory=lambda: {"Name": "node-a"})

    def tree(self) -> dict[str, Any]:
        """The node's IMDS tree: dict = directory, str = leaf."""
        hostname = f"ip-{self.local_ipv4.replace('.', '-')}.ec2.internal"
        credentials = json.dumps(
            {"Code": "Success", "AccessKeyId": "ASIANODE", "SecretAccessKey": SECRET_MARK},
            indent=2,
            separators=(",", " : "),
        )
        document = json.dumps(
            {"instanceId": self.instance_id, "accountId": "999999999999", "pad": SECRET_MARK}
        )
        meta_data: dict[str, Any] = {
            "ami-id": self.ami_id,
            "hostname": hostname,
            "iam": {
                "info": json.dumps(
                    {"InstanceProfileArn": f"arn:aws:iam::9:instance-profile/{SECRET_MARK}"}
                ),
                "security-credentials": {"node-role": credentials},
            },
            "identity-credentials": {
                "ec2": {"security-credentials": {"ec2-instance": credentials}}
            },
            "instance-id": self.instance_id,
            "instance-life-cycle": "spot" if self.spot_action else "on-demand",
            "instance-type": self.instance_type,
            "local-hostname": hostname,
            "local-ipv4": self.local_ipv4,
            "mac": self.mac,
            "network": {
                "interfaces": {
                    "macs": {
                        self.mac: {
                            "device-number": "0",
                            "local-ipv4s": self.local_ipv4,
                            "subnet-id": "subnet-0123456789abcdef0",
                            "vpc-id": "vpc-0123456789abcdef0",
                        }
                    }
                }
            },
            "placement": {
                "availability-zone": self.zone,
                "availability-zone-id": self.zone_id,
                "region": self.region,
            },
            "public-keys": {"0": {"openssh-key": f"ssh-ed25519 AAAA {SECRET_MARK}"}},
            "tags": {"instance": dict(self.tags)},
        }
        if self.spot_action is not None:
            meta_data["spot"] = {"instance-action": json.dumps(self.spot_action)}
        return {
            "meta-data": meta_data,
            "user-data": f"#!/bin/sh\nexport DB_PASSWORD={SECRET_MARK}",
            "dynamic": {"instance-identity": {"document": document, "signature": SECRET_MARK}},
        }


class NodeImds:
    """`app()` serves the instance; `asked` records every path a client asked for, and so does
    `log` (one path a line, flushed at once) when given."""

    def __init__(self, instance: Instance, log: TextIO | None = None) -> None:
        self.instance = instance
        self.asked: list[str] = []
        self._log = log
        self._tokens: set[str] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_put("/latest/api/token", self._token)
        app.router.add_get("/{tail:.*}", self._get)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return web.Response(status=400)
        token = "AQ" + secrets.token_urlsafe(40)[:52] + "=="
        self._tokens.add(token)
        headers = {"X-Aws-Ec2-Metadata-Token-Ttl-Seconds": ttl, "Server": "EC2ws"}
        return web.Response(text=token, headers=headers)

    async def _get(self, request: web.Request) -> web.Response:
        self.asked.append(request.path)
        if self._log is not None:
            # A few bytes to the page cache: no need for an executor in a test emulator.
            self._log.write(request.path + "\n")
            self._log.flush()
        if request.headers.get("X-aws-ec2-metadata-token") not in self._tokens:
            return web.Response(status=401)  # IMDSv2 required, as EC2 recommends for nodes
        parts = [p for p in request.path.split("/") if p]
        if not parts or parts[0] != "latest":
            return web.Response(status=404)
        node: Any = self.instance.tree()
        for name in parts[1:]:
            if not isinstance(node, dict) or name not in node:
                return web.Response(status=404)
            node = node[name]
        if isinstance(node, dict):
            body = "\n".join(f"{k}/" if isinstance(v, dict) else k for k, v in node.items())
        else:
            body = node
        return web.Response(text=body, headers={"Server": "EC2ws"})


def _parse() -> tuple[str, int, Instance, str | None]:
    parser = argparse.ArgumentParser(description="serve one EC2 instance's IMDS (tests only)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    parser.add_argument("--instance-id", default=Instance.instance_id)
    parser.add_argument("--instance-type", default=Instance.instance_type)
    parser.add_argument("--region", default=Instance.region)
    parser.add_argument("--zone", default=Instance.zone)
    parser.add_argument("--zone-id", default=Instance.zone_id)
    parser.add_argument("--local-ipv4", default=Instance.local_ipv4)
    parser.add_argument("--log", metavar="FILE", help="append each path asked, one a line")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    instance = Instance(
        instance_id=args.instance_id,
        instance_type=args.instance_type,
        region=args.region,
        zone=args.zone,
        zone_id=args.zone_id,
        local_ipv4=args.local_ipv4,
    )
    return host, int(port), instance, args.log


async def _serve(host: str, port: int, imds: NodeImds) -> None:
    runner = web.AppRunner(imds.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"node IMDS for {imds.instance.instance_id} on {host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    host, port, instance, log_path = _parse()
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(Path(log_path).open("a")) if log_path else None
        asyncio.run(_serve(host, port, NodeImds(instance, log)))


if __name__ == "__main__":
    main()
