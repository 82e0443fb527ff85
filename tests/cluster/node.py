"""The node: a network namespace of its own, where podman's CNI plugins make the pod network.

    node netns   lo 10.213.255.N/32      Services' virtual addresses (service.py listens there)
                 lo 169.254.169.254/32   the node's own IMDS (metaproxy.testing.ec2_node)
                 mpxc0 10.213.0.1/24     bridge of `metaproxy-cluster`: Valkey, brokers, webhook
                 mpxw0 10.213.1.1/24     bridge of `metaproxy-workloads`: injected pods, with
                                         metaproxy-cni chained after the bridge
    pod netns    eth0 on one bridge, default route via the node; its own lo

Nothing of it is on the host's network: deleting the namespace deletes the bridges and every
veth, and the host's links, routes and nat table are never touched. The test process reaches
the pods and serves the Services from sockets made in the namespace (tests/podlab.py).

**The plugin, as the rendered DaemonSet installs it**: its install-cni container's arguments,
with `--once` in place of `--interval` and the node's directories in place of the /host mounts,
run on the node (the pod test's kubelet has no hostPath). That writes the zipapp into the
node's CNI bin directory and appends its entry to the first configuration by name,
`10-workloads.conflist`; the runtime (podman) runs it with the node's python3.

One change, forced by podman: podman hands CNI plugins no pod annotations (its runtimeConfig
carries aliases and port mappings only, and CNI_ARGS the pod's name), so `"pods": "annotated"`
would select nothing. The entry gets `"pods": "all"` instead, on a network that only injected
pods join: the network a pod is put on stands in for the annotation the webhook sets.
"""

from __future__ import annotations

import http.client
import json
import secrets
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.cluster.podman import DEBIAN_CNI_PLUGINS, Podman, containers_conf
from tests.podlab import socket_in

CLUSTER_NETWORK = "metaproxy-cluster"
WORKLOADS_NETWORK = "metaproxy-workloads"
NETWORKS = {  # name: (configuration file, bridge, subnet)
    WORKLOADS_NETWORK: ("10-workloads.conflist", "mpxw0", "10.213.1"),
    CLUSTER_NETWORK: ("20-cluster.conflist", "mpxc0", "10.213.0"),
}
SERVICE_PREFIX = "10.213.255"
HTTP_TIMEOUT = 5.0


def bridge_network(name: str, bridge: str, prefix: str, ipam_dir: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,  # nothing leaves the node: no NAT needed
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [[{"subnet": f"{prefix}.0/24", "gateway": f"{prefix}.1"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }
        ],
    }


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]


class Node:
    """One node: its namespace, its CNI directories and the podman that runs pods in it."""

    def __init__(self, podman: Podman, directory: Path) -> None:
        self.name = f"mpx-node-{secrets.token_hex(3)}"
        self.netns = Path("/run/netns") / self.name
        self.directory = directory
        self.bin_dir = directory / "opt-cni-bin"
        self.conf_dir = directory / "etc-cni-net.d"
        conf = containers_conf(
            directory / "containers.conf", self.conf_dir, [self.bin_dir, DEBIAN_CNI_PLUGINS]
        )
        self.podman = podman.in_node(self.netns, conf)
        self._services = 0

    def start(self, install_cni: list[str]) -> None:
        """The namespace, the two networks, and metaproxy-cni installed with `install_cni`
        (the DaemonSet's install-cni arguments)."""
        ip("netns", "add", self.name)
        ip("-n", self.name, "link", "set", "lo", "up")
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for name, (file, bridge, prefix) in NETWORKS.items():
            network = bridge_network(name, bridge, prefix, self.directory / "ipam")
            (self.conf_dir / file).write_text(json.dumps(network, indent=2))
        self._install_plugin(install_cni)

    def _install_plugin(self, install_cni: list[str]) -> None:
        mounts = {"--cni-bin-dir": self.bin_dir, "--cni-conf-dir": self.conf_dir}
        mounts["--ready-file"] = self.directory / "cni-ready"
        args = [*install_cni[:2], "--once"]
        for arg in install_cni[2:]:
            flag, _, _ = arg.partition("=")
            if flag == "--interval":
                continue
            args.append(f"{flag}={mounts[flag]}" if flag in mounts else arg)
        assert install_cni[:2] == ["link-local", "install-cni"], install_cni
        subprocess.run(
            [sys.executable, "-m", "metaproxy", *args], check=True, capture_output=True, text=True
        )
        path = self.conf_dir / NETWORKS[WORKLOADS_NETWORK][0]
        network = json.loads(path.read_text())
        [entry] = [p for p in network["plugins"] if p["type"] == "metaproxy"]
        entry["pods"] = "all"  # see the module's docstring
        path.write_text(json.dumps(network, indent=2))

    @property
    def plugin_entry(self) -> dict[str, Any]:
        network = json.loads((self.conf_dir / NETWORKS[WORKLOADS_NETWORK][0]).read_text())
        entry: dict[str, Any] = network["plugins"][-1]
        return entry

    def new_service_address(self) -> str:
        """A virtual address on the node's lo, as kube-proxy's ClusterIPs are the node's own."""
        self._services += 1
        return self.add_local(f"{SERVICE_PREFIX}.{self._services}")

    def add_local(self, address: str) -> str:
        ip("-n", self.name, "addr", "add", f"{address}/32", "dev", "lo")
        return address

    def request(
        self,
        address: str,
        port: int,
        path: str,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = HTTP_TIMEOUT,
    ) -> Answer:
        """One HTTP(S) request from the node (blocking: from a thread, or `asyncio.to_thread`)."""
        sock = socket_in(self.netns)
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=server_hostname or address)
            connection = http.client.HTTPConnection(address, port, timeout=timeout)
            connection.sock = sock
            connection.request(method, path, body=body, headers=headers or {})
            answer = connection.getresponse()
            return Answer(answer.status, answer.read(), dict(answer.getheaders()))
        finally:
            sock.close()

    def close(self) -> None:
        """Delete the namespace (its bridges and veths with it), if it was made."""
        if self.netns.exists():
            ip("netns", "del", self.name)


def unverified_tls() -> ssl.SSLContext:
    """What the kubelet's HTTPS probes use: encryption, no verification."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
