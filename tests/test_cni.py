"""The CNI plugin and the init-container command put the metadata addresses in each pod's own
network namespace and redirect them to its own sidecar on loopback ports (docs/link-local.md).

Plugins run exactly as a container runtime runs them: the binary named by `type`, found in
CNI_PATH, with CNI_* in its environment and the derived configuration on stdin; `loopback` first,
then the chain `[bridge (host-local IPAM), metaproxy]`, DEL in reverse order. The "runtime" runs
them inside a node namespace the test makes, so the bridge, its routes and every packet stay in
namespaces the test owns:

    host ── broker (in this process) on a Unix socket ── sidecars reach it by path
    host ── veth 198.18.Y.1/30 ── node 198.18.Y.2 (moto, STS)      (test 4 only)
    node:  lo 169.254.169.254/32 (the "node IMDS")  bridge mpxbrTAG 198.18.X.1/24
    pod:   lo 169.254.169.254/32 169.254.170.2/32 169.254.170.23/32 (+ fd00:ec2::…)
           eth0 198.18.X.n/24, default via 198.18.X.1
           nat OUTPUT -o lo → METAPROXY-LINK-LOCAL: port 80 of those → 127.0.0.1:8182 (IMDS),
           127.0.0.1:8181 (container credentials), where the sidecar listens (::1 for IPv6)

Subnets come from 198.18.0.0/15 (the benchmark range), never from a private range.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.cli import main
from metaproxy.podnet import CONTAINER_PORT, IMDS_PORT, LINK_LOCAL_ANNOTATION, LINK_LOCAL_CNI
from tests.support import REPO, Pki, broker_config, cannot_run, issue, run_command
from tests.test_netns import (
    CHAIN,
    host_network_state,
    ip_json,
    listening,
    our_nat,
    readyz_over_socket,
    require_netns,
    unconfigured_env,
)

PLUGINS = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
PLUGIN = Path(sys.executable).parent / "metaproxy-cni"
CAPABILITY = "io.kubernetes.cri.pod-annotations"
BENCHMARK_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
SIDECAR_UID = 10001  # the image's user (Dockerfile)
TASK_V4 = {"169.254.169.254/32", "169.254.170.2/32", "169.254.170.23/32"}
TASK_V6 = {"fd00:ec2::254/128", "fd00:ec2::23/128"}
IPV6 = Path("/proc/sys/net/ipv6").is_dir()
TASK = TASK_V4 | (TASK_V6 if IPV6 else set())
JUMP = f"-A OUTPUT -o lo -j {CHAIN}"


def redirect(address: str, port: int) -> str:
    return f"-A {CHAIN} -d {address} -p tcp -m tcp --dport 80 -j REDIRECT --to-ports {port}"


# The nat table's lines that mention our chain, as `iptables -t nat -S` prints them.
NAT_V4 = [
    f"-N {CHAIN}",
    JUMP,
    redirect("169.254.169.254/32", IMDS_PORT),
    redirect("169.254.170.2/32", CONTAINER_PORT),
    redirect("169.254.170.23/32", CONTAINER_PORT),
]
NAT_V6 = [
    f"-N {CHAIN}",
    JUMP,
    redirect("fd00:ec2::254/128", IMDS_PORT),
    redirect("fd00:ec2::23/128", CONTAINER_PORT),
]
ERROR_KEYS = {"cniVersion", "code", "msg", "details"}

CLIENT = """
import json, sys, urllib.request, boto3
session = boto3.Session()
credentials = session.get_credentials()
sts = session.client("sts", endpoint_url=sys.argv[1], region_name="us-east-1")
base = "http://169.254.169.254/latest"
ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
token = urllib.request.urlopen(urllib.request.Request(base + "/api/token", method="PUT",
                                                      headers=ttl), timeout=5).read().decode()
def get(path):
    request = urllib.request.Request(base + path, headers={"X-aws-ec2-metadata-token": token})
    return urllib.request.urlopen(request, timeout=5).read().decode()
role = get("/meta-data/iam/security-credentials/")
document = json.loads(get("/meta-data/iam/security-credentials/" + role))
print(json.dumps({"method": credentials.method, "arn": sts.get_caller_identity()["Arn"],
                  "boto3_key": credentials.get_frozen_credentials().access_key,
                  "imds_key": document["AccessKeyId"]}))
"""
CLIENT_CONTAINER = """
import json, os, sys, urllib.request, boto3
relative = sys.argv[2]
raw = {host: json.loads(urllib.request.urlopen(f"http://{host}{relative}", timeout=5).read())
       for host in ("169.254.170.2", "169.254.170.23")}
os.environ["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"] = relative
session = boto3.Session()
credentials = session.get_credentials()
sts = session.client("sts", endpoint_url=sys.argv[1], region_name="us-east-1")
print(json.dumps({"method": credentials.method, "arn": sts.get_caller_identity()["Arn"],
                  "boto3_key": credentials.get_frozen_credentials().access_key,
                  "raw_keys": sorted({r["AccessKeyId"] for r in raw.values()})}))
"""
SERVER = """
import http.server, socket, sys, threading
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = sys.argv[1].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class V6(http.server.HTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        # As nginx's `listen [::]:80` does, so that it can sit beside 0.0.0.0:80.
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()
servers = []
for listen in sys.argv[2:]:
    host, _, port = listen.rpartition(":")
    kind = V6 if host.startswith("[") else http.server.HTTPServer
    servers.append(kind((host.strip("[]"), int(port)), Answer))
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""
ASK = """
import json, sys, urllib.error, urllib.request
method, url, *headers = sys.argv[1:]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
request = urllib.request.Request(url, method=method, headers=dict(h.split(": ") for h in headers))
try:
    with opener.open(request, timeout=5) as response:
        print(json.dumps([response.status, response.read().decode()]))
except urllib.error.HTTPError as exc:
    print(json.dumps([exc.code, exc.read().decode()]))
except OSError as exc:
    print(json.dumps([0, type(getattr(exc, "reason", exc)).__name__]))
"""
TOKEN_TTL = "X-aws-ec2-metadata-token-ttl-seconds: 60"
FETCH = """
import json, socket, sys
def fetch(device):
    sock = socket.socket()
    sock.settimeout(2)
    if device:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    try:
        sock.connect(("169.254.169.254", 80))
        sock.sendall(b"GET / HTTP/1.0\\r\\nHost: 169.254.169.254\\r\\n\\r\\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        return answer.partition(b"\\r\\n\\r\\n")[2].decode()
    except OSError as exc:
        return type(exc).__name__
    finally:
        sock.close()
print(json.dumps({"plain": fetch(None), "bound": fetch(sys.argv[1])}))
"""


def require_cni() -> None:
    """Root, namespaces and Debian's CNI plugins; a skip outside CI, a failure in CI."""
    require_netns()
    missing = [p for p in ("loopback", "bridge", "host-local") if not (PLUGINS / p).exists()]
    if missing or not PLUGIN.exists():
        cannot_run(f"{PLUGINS}/{missing} or {PLUGIN} missing (make system-deps; pip install -e .)")


def free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    """/24s of 198.18.0.0/15 that no host route overlaps."""
    taken = [
        ipaddress.ip_network(route["dst"], strict=False)
        for route in ip_json("-4", "route", "show", "table", "all")
        if route["dst"] != "default"
    ]
    candidates = list(BENCHMARK_RANGE.subnets(new_prefix=24))
    random.shuffle(candidates)
    return [s for s in candidates if not any(s.overlaps(t) for t in taken)][:count]


def lo_addresses(netns: str) -> set[str]:
    links = ip_json("-n", netns, "addr", "show", "dev", "lo")
    return {f"{a['local']}/{a['prefixlen']}" for link in links for a in link["addr_info"]}


def sysctl(netns: str, key: str) -> str:
    argv = ["ip", "netns", "exec", netns, "cat", f"/proc/sys/{key}"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def nat_in_place(netns: str) -> bool:
    """Exactly one jump and one set of rules, in each family the namespace has."""
    in_place = our_nat(netns) == NAT_V4
    return in_place and (not IPV6 or our_nat(netns, 6) == NAT_V6)


def ask(netns: str, method: str, url: str, *headers: str) -> tuple[int, str]:
    """One HTTP request from inside `netns`: (status, body), or (0, the error's type)."""
    argv = ["ip", "netns", "exec", netns, sys.executable, "-c", ASK, method, url, *headers]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    status, body = json.loads(out)
    return status, body


LOOPBACK = {"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]}


@dataclass
class Pod:
    name: str
    netns: str
    annotations: dict[str, str]
    container_id: str = field(default_factory=lambda: secrets.token_hex(32))
    # Each network's final ADD result, which the runtime caches for CHECK and DEL.
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"/run/netns/{self.netns}"


@dataclass
class Node:
    """A node of the test's own (a namespace) whose "runtime" runs the plugins for its pods."""

    work: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: ipaddress.IPv4Network = field(default_factory=lambda: free_subnets(1)[0])
    pods: list[Pod] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"mpx-{self.tag}-node"

    @property
    def cni_path(self) -> str:
        return f"{self.work / 'cni-bin'}:{PLUGINS}"

    def start(self) -> None:
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        # The plugin as the runtime finds it: an executable named after its `type`.
        shim = self.work / "cni-bin" / "metaproxy"
        shim.parent.mkdir()
        shim.write_text(f'#!/bin/sh\nexec {PLUGIN} "$@"\n')
        shim.chmod(0o755)

    def pod(self, name: str, **annotations: str) -> Pod:
        pod = Pod(name, f"mpx-{self.tag}-{name}", annotations)
        subprocess.run(["ip", "netns", "add", pod.netns], check=True)
        self.pods.append(pod)
        return pod

    def network(self, **metaproxy: Any) -> dict[str, Any]:
        """The conflist: bridge with host-local IPAM, then our plugin with its capability."""
        bridge = {
            "type": "bridge",
            "bridge": f"mpxbr{self.tag}",
            "isGateway": True,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "subnet": str(self.subnet),
                "dataDir": str(self.work / "ipam"),
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }
        ours = {"type": "metaproxy", "capabilities": {CAPABILITY: True}, **metaproxy}
        return {"cniVersion": "1.0.0", "name": f"mpx-{self.tag}", "plugins": [bridge, ours]}

    def invoke(
        self,
        plugin: dict[str, Any],
        command: str,
        pod: Pod,
        network: dict[str, Any],
        prev: dict[str, Any] | None = None,
    ) -> tuple[int, str, str]:
        """One plugin execution, with the request configuration derived as libcni does."""
        conf = {k: v for k, v in plugin.items() if k != "capabilities"}
        conf |= {"cniVersion": network["cniVersion"], "name": network["name"]}
        offered = {CAPABILITY: pod.annotations}
        runtime = {k: offered[k] for k, on in plugin.get("capabilities", {}).items() if on}
        if runtime:
            conf["runtimeConfig"] = runtime
        if prev is not None:
            conf["prevResult"] = prev
        directory = next(d for d in self.cni_path.split(":") if (Path(d) / plugin["type"]).exists())
        env = {
            "PATH": os.environ["PATH"],
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.container_id,
            "CNI_NETNS": pod.path,
            "CNI_IFNAME": "lo" if network is LOOPBACK else "eth0",
            "CNI_PATH": self.cni_path,
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod.name}",
        }
        result = subprocess.run(
            ["ip", "netns", "exec", self.netns, str(Path(directory) / plugin["type"])],
            input=json.dumps(conf),
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        return result.returncode, result.stdout, result.stderr

    def run(self, command: str, pod: Pod, network: dict[str, Any]) -> list[dict[str, Any]]:
        """One operation on an attachment: ADD in order, each plugin given the previous one's
        result; CHECK in order and DEL in reverse, each given the cached ADD result."""
        plugins = network["plugins"][::-1] if command == "DEL" else network["plugins"]
        outputs: list[dict[str, Any]] = []
        for plugin in plugins:
            if command == "ADD":
                prev = outputs[-1] if outputs else None
            else:
                prev = pod.results.get(network["name"])
            rc, out, err = self.invoke(plugin, command, pod, network, prev)
            assert rc == 0, f"{plugin['type']} {command}: {out} {err}"
            if command == "ADD":
                outputs.append(json.loads(out))
        if command == "ADD":
            pod.results[network["name"]] = outputs[-1]
        return outputs

    def attach(self, pod: Pod, network: dict[str, Any]) -> list[dict[str, Any]]:
        """ADD: loopback first (its own network, as containerd runs it), then the chain."""
        self.run("ADD", pod, LOOPBACK)
        return self.run("ADD", pod, network)

    def detach(self, pod: Pod, network: dict[str, Any]) -> None:
        self.run("DEL", pod, network)
        self.run("DEL", pod, LOOPBACK)

    def spawn(self, argv: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        with log.open("ab") as output:
            process = subprocess.Popen(argv, stdout=output, stderr=output, **kwargs)
        self.processes.append(process)
        return process

    def serve(self, netns: str, answer: str, *listen: str) -> None:
        """A tiny HTTP server in `netns` that answers `answer` on each `host:port` given."""
        argv = ["ip", "netns", "exec", netns, sys.executable, "-c", SERVER, answer, *listen]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.processes.append(process)
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n"

    def link_to_host(self) -> tuple[str, str]:
        """A veth between the host and the node; returns (host address, node address)."""
        other = next(s for s in free_subnets(3) if s != self.subnet)
        subnet = next(other.subnets(new_prefix=30))
        host, inside = (str(subnet.network_address + n) for n in (1, 2))
        host_link, node_link = f"mpx{self.tag}h", f"mpx{self.tag}n"
        for command in (
            f"ip link add {host_link} type veth peer {node_link} netns {self.netns}".split(),
            ["ip", "addr", "add", f"{host}/30", "dev", host_link],
            ["ip", "link", "set", host_link, "up"],
            ["ip", "-n", self.netns, "addr", "add", f"{inside}/30", "dev", node_link],
            ["ip", "-n", self.netns, "link", "set", node_link, "up"],
        ):
            subprocess.run(command, check=True)
        return host, inside

    def stop_processes(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def teardown(self) -> None:
        """Deleting the node deletes its bridge and its veths; the host's end of the host link
        is deleted first, as the kernel frees a deleted namespace's devices asynchronously."""
        self.stop_processes()
        host_link = ["ip", "link", "del", f"mpx{self.tag}h"]
        subprocess.run(host_link, check=False, capture_output=True)
        for name in [pod.netns for pod in self.pods] + [self.netns]:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        shutil.rmtree(self.work / "ipam", ignore_errors=True)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A node namespace; afterwards the host's links, addresses, routes, namespaces and nat
    tables are as they were."""
    require_cni()
    node = Node(tmp_path)
    before = host_network_state(node.tag)
    try:
        node.start()
        yield node
    finally:
        node.teardown()
    assert host_network_state(node.tag) == before


CNI_POD = {LINK_LOCAL_ANNOTATION: LINK_LOCAL_CNI}


@pytest.mark.netns
@pytest.mark.slow  # started first: see tests/conftest.py
def test_add_check_del_lifecycle(node: Node) -> None:
    """ADD puts the addresses on lo and the redirect in nat, passing prevResult on; CHECK passes;
    ADD again leaves one jump and one set of rules; DEL removes both, and repeats."""
    pod = node.pod("web", **CNI_POD)
    network = node.network()
    bridge_result, ours = node.attach(pod, network)
    assert ours == bridge_result
    assert lo_addresses(pod.netns) >= TASK
    assert nat_in_place(pod.netns)
    node.run("CHECK", pod, network)

    for _ in range(2):
        rc, out, err = node.invoke(network["plugins"][1], "ADD", pod, network, prev=ours)
        assert (rc, json.loads(out)) == (0, bridge_result), err
    assert nat_in_place(pod.netns)
    node.run("CHECK", pod, network)

    node.detach(pod, network)
    assert not lo_addresses(pod.netns) & TASK
    assert (our_nat(pod.netns), our_nat(pod.netns, 6) if IPV6 else []) == ([], [])
    node.detach(pod, network)
    subprocess.run(["ip", "netns", "del", pod.netns], check=True)
    node.detach(pod, network)


@pytest.mark.netns
def test_check_names_a_missing_redirect_and_add_repairs_it(node: Node) -> None:
    """CHECK fails with code 101 naming the missing jump and rule, and the address refuses
    connections meanwhile; ADD puts them back."""
    pod = node.pod("web", **CNI_POD)
    network = node.network()
    _, ours = node.attach(pod, network)
    iptables = ["ip", "netns", "exec", pod.netns, "iptables", "-t", "nat"]
    subprocess.run([*iptables, "-D", "OUTPUT", "-o", "lo", "-j", CHAIN], check=True)
    subprocess.run([*iptables, "-D", CHAIN, "1"], check=True)
    rc, out, _ = node.invoke(network["plugins"][1], "CHECK", pod, network, prev=ours)
    error = json.loads(out)
    assert (rc, error["code"]) == (1, 101)
    assert f"IPv4 nat OUTPUT does not jump to {CHAIN}" in error["details"]
    assert f"no redirect 169.254.169.254:80 -> :{IMDS_PORT}" in error["details"]
    # Fail closed: without its redirect the address answers from the pod, never the node.
    assert ask(pod.netns, "GET", "http://169.254.169.254/") == (0, "ConnectionRefusedError")
    rc, out, err = node.invoke(network["plugins"][1], "ADD", pod, network, prev=ours)
    assert rc == 0, err
    assert nat_in_place(pod.netns)
    node.run("CHECK", pod, network)
    node.detach(pod, network)


@pytest.mark.netns
def test_imds_port_and_container_port_choose_where_the_redirect_goes(node: Node) -> None:
    """`imdsPort` and `containerPort` set the rules' ports; ADD with other ports replaces them."""
    pod = node.pod("web", **CNI_POD)
    network = node.network(imdsPort=9182, containerPort=9181)
    _, ours = node.attach(pod, network)
    assert our_nat(pod.netns) == [
        f"-N {CHAIN}",
        JUMP,
        redirect("169.254.169.254/32", 9182),
        redirect("169.254.170.2/32", 9181),
        redirect("169.254.170.23/32", 9181),
    ]
    node.run("CHECK", pod, network)
    default = node.network()
    rc, _, err = node.invoke(default["plugins"][1], "ADD", pod, default, prev=ours)
    assert rc == 0, err
    assert nat_in_place(pod.netns)
    node.detach(pod, network)


@pytest.mark.netns
def test_pod_without_the_annotation_is_untouched(node: Node) -> None:
    """A pod without metaproxy.io/link-local=cni keeps its lo, nat table and sysctls."""
    pod = node.pod("plain", **{"kubernetes.io/config.source": "api"})
    bridge_result, ours = node.attach(pod, node.network(nodeMetadata=True))
    assert ours == bridge_result
    assert not lo_addresses(pod.netns) & TASK
    assert our_nat(pod.netns) == []
    assert sysctl(pod.netns, "net/ipv4/conf/eth0/accept_local") == "0"
    node.detach(pod, node.network(nodeMetadata=True))


def cni(command: str, stdin: str, **env: str) -> tuple[int, dict[str, Any], str]:
    """The plugin run directly, as a runtime would, with a valid environment unless overridden."""
    base = {
        "PATH": os.environ["PATH"],
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/run/netns/mpx-not-there",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(PLUGINS),
    }
    environment = {k: v for k, v in (base | env).items() if v}
    result = subprocess.run(
        [str(PLUGIN)], input=stdin, env=environment, capture_output=True, text=True, check=False
    )
    return result.returncode, json.loads(result.stdout or "{}"), result.stderr


def config(**fields: Any) -> str:
    return json.dumps({"cniVersion": "1.0.0", "name": "pods", "type": "metaproxy"} | fields)


BAD_INPUT = [
    pytest.param("BOGUS", config(), {}, 4, id="unknown-command"),
    pytest.param("ADD", config(), {"CNI_NETNS": ""}, 4, id="add-without-netns"),
    pytest.param("ADD", config(), {"CNI_NETNS": "netns"}, 4, id="relative-netns"),
    pytest.param("ADD", config(), {"CNI_IFNAME": "eth/0"}, 4, id="bad-ifname"),
    pytest.param("DEL", config(), {"CNI_CONTAINERID": "-x"}, 4, id="bad-container-id"),
    pytest.param("ADD", config(), {"CNI_ARGS": "K8S_POD_NAME"}, 4, id="bad-cni-args"),
    pytest.param("ADD", "{not json", {}, 6, id="stdin-not-json"),
    pytest.param("ADD", "[1, 2]", {}, 6, id="stdin-not-an-object"),
    pytest.param("ADD", config(cniVersion="0.2.0"), {}, 1, id="unsupported-version"),
    pytest.param("ADD", config(cniVersion=None), {}, 1, id="no-version"),
    pytest.param("CHECK", config(cniVersion="0.3.1"), {}, 1, id="check-before-0.4.0"),
    pytest.param("STATUS", config(), {}, 1, id="status-before-1.1.0"),
    pytest.param("ADD", config(name=5), {}, 7, id="name-not-a-string"),
    pytest.param("ADD", config(nodeMetadata="yes"), {}, 7, id="nodeMetadata-not-a-boolean"),
    pytest.param("ADD", config(pods="some"), {}, 7, id="pods-not-annotated-or-all"),
    pytest.param("ADD", config(imdsPort="8182"), {}, 7, id="imdsPort-not-an-integer"),
    pytest.param("ADD", config(imdsPort=True), {}, 7, id="imdsPort-a-boolean"),
    pytest.param("ADD", config(imdsPort=0), {}, 7, id="imdsPort-zero"),
    pytest.param("ADD", config(containerPort=65536), {}, 7, id="containerPort-above-65535"),
    pytest.param("ADD", config(prevResult=[]), {}, 7, id="prevResult-not-an-object"),
    pytest.param("ADD", config(runtimeConfig=[]), {}, 7, id="runtimeConfig-not-an-object"),
    pytest.param(
        "ADD", config(runtimeConfig={CAPABILITY: {"a": 1}}), {}, 7, id="annotation-not-a-string"
    ),
]


@pytest.mark.parametrize(("command", "stdin", "env", "code"), BAD_INPUT)
def test_bad_input_is_the_specs_error_object(
    command: str, stdin: str, env: dict[str, str], code: int
) -> None:
    """Bad parameters or configuration: the spec's error object and code, one stderr line."""
    rc, error, err = cni(command, stdin, **env)
    assert rc != 0
    assert set(error) == ERROR_KEYS
    assert error["code"] == code
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_version_lists_the_supported_versions() -> None:
    """VERSION answers in the version asked and lists every version the plugin speaks."""
    rc, answer, _ = cni("VERSION", '{"cniVersion": "1.0.0"}')
    assert (rc, answer) == (
        0,
        {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]},
    )


def test_status_and_gc_succeed_with_nothing_to_do() -> None:
    """The plugin keeps no state: STATUS and GC (spec 1.1.0) succeed with no output."""
    for command in ("STATUS", "GC"):
        rc, answer, err = cni(command, config(cniVersion="1.1.0"))
        assert (rc, answer) == (0, {}), err


def test_first_in_chain_answers_a_minimal_result() -> None:
    """First in its chain, ADD answers an empty result in the configuration's version."""
    rc, answer, err = cni("ADD", config(cniVersion="0.4.0"))
    assert (rc, answer) == (0, {"cniVersion": "0.4.0", "interfaces": [], "ips": [], "dns": {}})
    assert "untouched" in err


# --- end to end: two pods, each boto3 gets its own pod's role from 169.254.169.254 -------------


@functools.cache
def unprivileged_python() -> tuple[list[str], dict[str, str]]:
    """How to run our code as the sidecar's uid: (argv prefix, environment). The venv's python
    may live where that uid cannot read (/root, 0700, here), so the system's python of the same
    version comes first, with the venv's packages on PYTHONPATH. Only if no interpreter works
    as that uid does the sidecar run as root (and the test says so on stderr)."""
    site = sysconfig.get_paths()["purelib"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{REPO}:{site}", "HOME": "/nonexistent"}
    drop = ["setpriv", f"--reuid={SIDECAR_UID}", f"--regid={SIDECAR_UID}", "--clear-groups"]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (f"/usr/bin/{version}", sys.executable):
        probe = [*drop, python, "-c", "import metaproxy.sidecar.process"]
        if subprocess.run(probe, env=env, capture_output=True, check=False).returncode == 0:
            return [*drop, python], env
    print(f"no python that uid {SIDECAR_UID} can run: the sidecars run as root", file=sys.stderr)
    return [sys.executable], env


@contextlib.contextmanager
def moto_in(node: Node, host: str, log: Path) -> Iterator[str]:
    """moto (STS) in the node namespace, bound to the node's end of its host veth."""
    port = random.randrange(20000, 30000)
    argv = ["ip", "netns", "exec", node.netns, sys.executable, "-m", "moto.server"]
    process = node.spawn([*argv, "-H", host, "-p", str(port)], log, stdin=subprocess.DEVNULL)
    url = f"http://{host}:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 30
    while True:
        try:
            with opener.open(url + "/", timeout=1):
                break
        except urllib.error.HTTPError:
            break
        except OSError:
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "moto did not start"
            time.sleep(0.1)
    yield url


def credentials_path() -> str:
    """A pod's secret relative URI, as the webhook makes one."""
    return "/v2/credentials/" + secrets.token_urlsafe(24)


def start_sidecar(
    node: Node,
    pod: Pod,
    run_dir: Path,
    broker_socket: Path,
    token: str,
    log: Path,
    *,
    hosts: tuple[str, ...] = ("127.0.0.1",),
    relative_uri: str = "",
) -> subprocess.Popen[bytes]:
    """`metaproxy sidecar` in the pod's namespace as uid 10001, on loopback ports only."""
    home = run_dir / pod.name
    home.mkdir(mode=0o700)
    (home / "identity.jwt").write_text(token)
    for path in (home, home / "identity.jwt"):
        os.chown(path, SIDECAR_UID, SIDECAR_UID)
    prefix, env = unprivileged_python()
    argv = ["nsenter", f"--net={pod.path}", "--", *prefix, "-m", "metaproxy", "sidecar"]
    argv += [
        "--imds-listen=" + ",".join(f"{host}:{IMDS_PORT}" for host in hosts),
        "--container-listen=" + ",".join(f"{host}:{CONTAINER_PORT}" for host in hosts),
        f"--container-credentials-path={relative_uri}",
        f"--admin-listen=unix:{home / 'admin.sock'}",
        f"--broker-socket={broker_socket}",
        f"--identity-token-file={home / 'identity.jwt'}",
        "--drain-seconds=1",
        "--log-format=text",
    ]
    return node.spawn(argv, log, env=env, cwd=home, stdin=subprocess.DEVNULL)


async def wait_ready(admin_socket: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError, aiohttp.ClientError):
            if await readyz_over_socket(admin_socket) == 200:
                return
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        await asyncio.sleep(0.1)


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


@pytest.mark.netns
@pytest.mark.slow  # started first: see tests/conftest.py
async def test_each_pod_gets_its_own_credentials_at_169_254_169_254(
    node: Node,
    tmp_path: Path,
    pki: Pki,
    policies_dir: Path,
    record_secrets: Callable[[BrokerServer], None],
) -> None:
    """In two pods whose sidecars listen on loopback ports only, unconfigured boto3 and IMDSv2
    at 169.254.169.254, and ECS's relative URI at 169.254.170.2, get each pod's own role."""
    pods = [node.pod("pod-a", **CNI_POD), node.pod("pod-b", **CNI_POD)]
    network = node.network(nodeMetadata=True)
    for pod in pods:
        node.attach(pod, network)
    # Short: a Unix socket path must fit in 108 bytes. Group 10001 may enter, nobody else.
    run_dir = Path(tempfile.mkdtemp(prefix="mpx-", dir="/tmp"))
    os.chown(run_dir, 0, SIDECAR_UID)
    run_dir.chmod(0o750)
    broker_socket = run_dir / "broker.sock"
    (tmp_path / "home").mkdir()
    client_env = unconfigured_env(tmp_path / "home")
    relative_uris = [credentials_path() for _ in pods]
    try:
        _, sts_host = node.link_to_host()
        with moto_in(node, sts_host, tmp_path / "moto.log") as sts_url:
            config = broker_config(
                tmp_path,
                pki,
                sts_url,
                policies_dir,
                socket=broker_socket,
                socket_group=str(SIDECAR_UID),
            )
            broker = await BrokerServer.start(replace(config, tls_cert=None, tls_key=None))
            try:
                sidecars = []
                for pod, tenant, uri in zip(pods, ("acme", "globex"), relative_uris, strict=True):
                    log = tmp_path / f"{pod.name}-sidecar.log"
                    token = issue(pki, pod.name, tenant)
                    process = start_sidecar(
                        node, pod, run_dir, broker_socket, token, log, relative_uri=uri
                    )
                    await wait_ready(run_dir / pod.name / "admin.sock", process, log)
                    sidecars.append(process)
                listens = [listening(pod.netns) for pod in pods]
                seen, container = [], []
                for pod, uri in zip(pods, relative_uris, strict=True):
                    python = ("ip", "netns", "exec", pod.netns, sys.executable, "-c")
                    rc, out, err = await run_command(*python, CLIENT, sts_url, env=client_env)
                    assert rc == 0, err
                    seen.append(json.loads(out))
                    argv = (*python, CLIENT_CONTAINER, sts_url, uri)
                    rc, out, err = await run_command(*argv, env=client_env)
                    assert rc == 0, err
                    container.append(json.loads(out))
                if unprivileged_python()[0][0] == "setpriv":
                    assert [uid_of(p.pid) for p in sidecars] == [SIDECAR_UID, SIDECAR_UID]
            finally:
                record_secrets(broker)
                node.stop_processes()
                await broker.aclose()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    loopback = {f"127.0.0.1:{IMDS_PORT}", f"127.0.0.1:{CONTAINER_PORT}"}
    assert listens == [loopback, loopback]
    expected = [
        "arn:aws:sts::111111111111:assumed-role/acme-app/acme.pod-a",
        "arn:aws:sts::222222222222:assumed-role/globex-app/globex.pod-b",
    ]
    assert [s["arn"] for s in seen] == [c["arn"] for c in container] == expected
    assert all(s["method"] == "iam-role" and s["boto3_key"] == s["imds_key"] for s in seen)
    assert all(c["method"] == "container-role" for c in container)
    assert all(c["raw_keys"] == [c["boto3_key"]] for c in container)
    assert seen[0]["imds_key"] != seen[1]["imds_key"]
    for pod in pods:
        node.detach(pod, network)
        assert not lo_addresses(pod.netns) & TASK
        assert our_nat(pod.netns) == []


@pytest.mark.netns
async def test_an_application_in_the_pod_keeps_port_80(node: Node, tmp_path: Path) -> None:
    """Beside the running sidecar, an application listens on 0.0.0.0:80 (and [::]:80) and is
    reached at the pod's own address, while 169.254.169.254:80 still reaches the sidecar."""
    pod = node.pod("web", **CNI_POD)
    _, ours = node.attach(pod, node.network())
    pod_ip = ours["ips"][0]["address"].partition("/")[0]
    run_dir = Path(tempfile.mkdtemp(prefix="mpx-", dir="/tmp"))
    os.chown(run_dir, 0, SIDECAR_UID)
    run_dir.chmod(0o750)
    hosts = ("127.0.0.1", "[::1]") if IPV6 else ("127.0.0.1",)
    try:
        # No broker: the sidecar serves IMDSv2 tokens without one, which is all this needs.
        log = tmp_path / "sidecar.log"
        sidecar = start_sidecar(
            node, pod, run_dir, run_dir / "no-broker.sock", "x.y.z", log, hosts=hosts
        )
        deadline = time.monotonic() + 30
        while f"127.0.0.1:{IMDS_PORT}" not in listening(pod.netns):
            assert sidecar.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)

        node.serve(pod.netns, "app", "0.0.0.0:80", *(["[::]:80"] if IPV6 else []))

        assert ask(node.netns, "GET", f"http://{pod_ip}/") == (200, "app")
        assert ask(pod.netns, "GET", f"http://{pod_ip}/") == (200, "app")
        imds = ["http://169.254.169.254"] + (["http://[fd00:ec2::254]"] if IPV6 else [])
        for base in imds:
            status, token = ask(pod.netns, "PUT", f"{base}/latest/api/token", TOKEN_TTL)
            assert (status, len(token) > 20) == (200, True), token
        if IPV6:
            assert ask(pod.netns, "GET", "http://[::1]/") == (200, "app")
    finally:
        node.stop_processes()
        shutil.rmtree(run_dir, ignore_errors=True)
    node.detach(pod, node.network())


# --- the init-container command ---------------------------------------------------------------


NET_ADMIN_ONLY = ("--bounding-set", "-all,+net_admin", "--inh-caps", "-all")
NO_CAPABILITY = ("--bounding-set", "-all", "--inh-caps", "-all")


def link_local(
    netns: str, *args: str, caps: tuple[str, ...] = NET_ADMIN_ONLY, hide_sbin: bool = False
) -> tuple[int, str, str]:
    """`metaproxy link-local …` in the namespace as an init container runs it: /proc/sys is
    mounted read-only (a private mount namespace, as container runtimes do), the capability
    bounding set holds only `caps`, and PATH has no sbin directory. `hide_sbin`: an image
    without iptables (an empty /usr/sbin)."""
    mounts = ["mount --bind /proc/sys /proc/sys", "mount -o remount,bind,ro /proc/sys"]
    if hide_sbin:
        mounts.append("mount -t tmpfs none /usr/sbin")
    argv = ["nsenter", f"--net=/run/netns/{netns}", "--", "unshare", "--mount"]
    argv += ["--propagation", "private", "sh", "-c", " && ".join([*mounts, 'exec "$@"']), "sh"]
    argv += ["setpriv", *caps, sys.executable, "-m", "metaproxy", "link-local", *args]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO, env=env)
    return result.returncode, result.stdout, result.stderr


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    name = f"mpx-init-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.netns
def test_init_container_with_only_net_admin_sets_up_the_addresses_and_redirect() -> None:
    """With NET_ADMIN alone and /proc/sys read-only, `link-local setup` adds the addresses and
    the redirect (iptables found outside PATH), and `check` reports the namespace ready."""
    require_netns()
    with namespace() as netns:
        rc, out, err = link_local(netns, "setup")
        assert (rc, out.count("\n")) == (0, 1), err
        assert lo_addresses(netns) >= TASK
        assert nat_in_place(netns)
        rc, out, err = link_local(netns, "setup")
        assert (rc, nat_in_place(netns)) == (0, True), err
        rc, out, err = link_local(netns, "check")
        assert (rc, out.count("\n")) == (0, 1), err
        assert out.startswith(
            f"metaproxy link-local check: ready: 169.254.169.254:80 -> :{IMDS_PORT}, "
            f"169.254.170.2:80 -> :{CONTAINER_PORT}"
        )


@pytest.mark.netns
def test_init_container_without_net_admin_fails_in_one_line_naming_it() -> None:
    """Without NET_ADMIN, `setup` and `check` exit 1 with one line naming the capability."""
    require_netns()
    with namespace() as netns:
        for action in ("setup", "check"):
            rc, _, err = link_local(netns, action, caps=NO_CAPABILITY)
            assert (rc, err.count("\n")) == (1, 1), err
            assert "needs the NET_ADMIN capability" in err
            assert "Traceback" not in err
        assert not lo_addresses(netns) & TASK


@pytest.mark.netns
def test_init_container_without_iptables_fails_before_changing_anything() -> None:
    """In an image without the iptables binaries, `setup` names the package and adds nothing."""
    require_netns()
    with namespace() as netns:
        rc, _, err = link_local(netns, "setup", hide_sbin=True)
        assert (rc, err.count("\n")) == (1, 1), err
        assert "iptables not found in PATH, /usr/sbin or /sbin" in err
        assert "install the iptables package" in err
        assert not lo_addresses(netns) & TASK


@pytest.mark.parametrize("flag", ["--imds-port=0", "--container-port=65536", "--imds-port=http"])
def test_link_local_refuses_a_port_that_is_not_a_tcp_port(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A port flag outside 1..65535 is refused with exit status 2, before anything runs."""
    with pytest.raises(SystemExit) as exit_:
        main(["link-local", "setup", flag])
    assert exit_.value.code == 2
    assert "is not a TCP port (1 to 65535)" in capsys.readouterr().err


# --- the node's own IMDS through the uplink -----------------------------------------------------


@pytest.mark.netns
def test_bound_to_the_uplink_reaches_the_node_imds_only_with_node_metadata(node: Node) -> None:
    """Bound to eth0, a pod reaches the node IMDS only with nodeMetadata: the redirect takes
    only what is routed to lo. Unbound, it reaches its own sidecar's port through the redirect."""
    subprocess.run(
        ["ip", "-n", node.netns, "addr", "add", "169.254.169.254/32", "dev", "lo"], check=True
    )
    node.serve(node.netns, "node", "169.254.169.254:80")
    without = node.pod("without", **CNI_POD)
    node.attach(without, node.network(nodeMetadata=False))
    with_ = node.pod("with", **CNI_POD)
    node.attach(with_, node.network(nodeMetadata=True))
    prefix, env = unprivileged_python()
    seen = {}
    for pod in (without, with_):
        node.serve(pod.netns, pod.name, f"127.0.0.1:{IMDS_PORT}")
        argv = ["ip", "netns", "exec", pod.netns, *prefix, "-c", FETCH, "eth0"]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
        seen[pod.name] = json.loads(out)
    assert seen == {
        "without": {"plain": "without", "bound": "TimeoutError"},
        "with": {"plain": "with", "bound": "node"},
    }
    rc, _, err = link_local(without.netns, "check", "--node-metadata")
    assert rc == 1
    assert "accept_local is off on eth0" in err
    rc, out, err = link_local(with_.netns, "check", "--node-metadata")
    assert rc == 0, err
