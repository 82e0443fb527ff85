"""The pod lab: pods made on this host the way the webhook and a container runtime make them.

A pod is a network namespace of its own (`ip netns add`, a random name, deleted on close). For a
pod the webhook marked `metaproxy.io/link-local: cni`, the lab runs the CNI plugins exactly as a
runtime does (Debian's `loopback`, then `metaproxy-cni` with CNI_* in its environment and the
pod's annotations in `runtimeConfig`); any other pod only gets `lo` up (`loopback` alone).

Its containers run in it with `nsenter`, each in a private mount namespace that holds the pod's
volumes at their `mountPath`s, with exactly the environment of the patched pod spec:

    host ── broker (the test's process) on a Unix socket ── each pod's sidecar reaches it by path
    host ── recorder (FaultProxy) ── moto (STS and S3), all on 127.0.0.1
    pod:    lo 127.0.0.1:5000   a relay: its listening socket is made inside the pod, and the
                                test's process forwards each connection to the recorder
            sidecar             127.0.0.1:8181 / :8182, admin 0.0.0.0:9901, as uid 10001
            (link-local)        169.254.169.254, 169.254.170.2, 169.254.170.23 :80 → the sidecar

A pod alone has no veth, no bridge, no address outside loopback. The sidecar's
environment is its container's, remapped only where this host differs from a node: the broker
is a Unix socket (`METAPROXY_BROKER_SOCKET`, so no broker URL and no broker CA), and the pod's
volumes are directories of the lab's, bind-mounted where the spec mounts them.

A pod may also run on a node of the lab (`add_node`, then `add(..., node=)`): the node is a
network namespace of its own, whose `lo` holds its own 169.254.169.254 where its IMDS
(`metaproxy.testing.ec2_node`) listens, and the pod is linked to it as a runtime's CNI links a
pod, before the runtime runs the plugins:

    node:   lo 169.254.169.254/32 (its IMDS, port 80)    mpx<tag>p<n> 198.18.X.1/30
    pod:    eth0 198.18.X.2/30, default via 198.18.X.1   (plus all of the above)

and `metaproxy-cni` gets `"nodeMetadata": true` and `CNI_IFNAME=eth0`, so the sidecar reaches
its node's IMDS through eth0. The /30s come from 198.18.0.0/15 (the benchmark range); nothing
of a node is on the host's network, and deleting the pod's namespace deletes its veth.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from metaproxy.podnet import LINK_LOCAL_ANNOTATION
from metaproxy.podnet.namespace import entered
from metaproxy.testing.ec2_node import Instance
from metaproxy.webhook.settings import CA_DIR, SIDECAR_NAME
from tests.support import Samples
from tests.test_cni import PLUGIN, PLUGINS, SIDECAR_UID, free_subnets, unprivileged_python

T = TypeVar("T")

IN_POD_UPSTREAM_PORT = 5000  # where a pod reaches moto (through the recorder): 127.0.0.1:5000
IN_POD_UPSTREAM = f"http://127.0.0.1:{IN_POD_UPSTREAM_PORT}"
CNI_VERSION = "1.0.0"
ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
# What a container's process gets besides its spec's env, as a runtime sets it (PATH, HOME) and
# as the image would (LANG). Nothing else: no AWS_*, no proxy, no METAPROXY_*.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Sidecar variables that name a broker over TLS: replaced by METAPROXY_BROKER_SOCKET here.
TLS_BROKER_VARIABLES = ("METAPROXY_BROKER_URL", "METAPROXY_BROKER_CA_FILE")
UPLINK = "eth0"  # a pod's end of the veth to its node, as runtimes name it (CNI_IFNAME)
NODE_IMDS = "169.254.169.254"


# --- network namespaces, from this process -----------------------------------------------------


def in_netns(netns: Path, action: Callable[[], T]) -> T:
    """`action()` on a fresh thread that has entered `netns` (setns moves one thread only; a
    pool thread could be left behind in the pod); its sockets stay in the pod afterwards."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with entered(netns):
                outcome.append(action())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"netns {netns.name}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def socket_in(netns: Path, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    """A TCP socket of the pod's network namespace (a socket keeps the one it was made in)."""
    return in_netns(netns, lambda: socket.socket(family, socket.SOCK_STREAM))


def http_in(
    netns: Path, port: int, path: str, *, method: str = "GET", host: str = "127.0.0.1"
) -> tuple[int, bytes]:
    """One plain HTTP request from inside the pod (blocking: call it in a thread)."""
    sock = socket_in(netns)
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        sock.settimeout(5)
        sock.connect((host, port))
        connection.sock = sock
        connection.request(method, path)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()
        sock.close()


class Relay:
    """A TCP relay listening on 127.0.0.1:`port` inside a pod, to `target` on the host."""

    def __init__(self, netns: Path, port: int, target: tuple[str, int]) -> None:
        self._netns, self._port, self._target = netns, port, target
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        sock = socket_in(self._netns)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))  # the pod's own loopback: the socket is the pod's
        self._server = await asyncio.start_server(self._accepted, sock=sock)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            self._connections.discard(task)
            return
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                end.close()
            self._connections.discard(task)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy one direction; pass its end on (half-close), as the peer may still be sending."""
        with contextlib.suppress(OSError):
            while chunk := await source.read(65536):
                sink.write(chunk)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)


# --- the pod spec, as the webhook patched it ----------------------------------------------------


def env_of(container: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def container(pod: Mapping[str, Any], name: str) -> dict[str, Any]:
    spec = pod["spec"]
    found = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"no single container {name} in the pod"
    result: dict[str, Any] = found[0]
    return result


def run_path(mount_path: str) -> PurePosixPath | None:
    """Where a mountPath lies under /run (/var/run is a link to it), or None if elsewhere."""
    path = PurePosixPath(mount_path)
    for root in (PurePosixPath("/var/run"), PurePosixPath("/run")):
        if path.is_relative_to(root):
            return PurePosixPath("/run") / path.relative_to(root)
    return None


@dataclass(frozen=True)
class Mount:
    source: Path
    target: PurePosixPath
    read_only: bool


def mount_script(mounts: list[Mount], read_only_root: bool) -> str:
    """sh that gives the process a /run of its own holding the pod's volumes, and with
    `readOnlyRootFilesystem` a read-only / (this mount namespace's copy only), then execs "$@"."""
    lines = ["set -e", "mount -t tmpfs -o mode=0755 pod-run /run"]
    for mount in mounts:
        target, source = shlex.quote(str(mount.target)), shlex.quote(str(mount.source))
        lines += [f"mkdir -p {target}", f"mount --bind {source} {target}"]
        if mount.read_only:
            lines.append(f"mount -o remount,bind,ro {target}")
    if read_only_root:  # last: a bind mount made from a read-only mount would be read-only too
        lines.append("mount -o remount,bind,ro /")
    lines += ["unset PWD", 'exec "$@"']  # sh exports PWD; a runtime's process has no such thing
    return "\n".join(lines)


# --- pods ---------------------------------------------------------------------------------------


@dataclass
class Pod:
    """One pod: its namespace, volumes and sidecar; `run()` starts a container process in it."""

    name: str
    spec: dict[str, Any]  # the pod as the webhook's patch made it
    directory: Path
    netns: str
    logs: Path  # outside `directory`, so that they outlive the lab (and the secret scan reads them)
    container_id: str = field(default_factory=lambda: secrets.token_hex(32))
    sidecar: subprocess.Popen[bytes] | None = None
    relay: Relay | None = None
    cni_attached: bool = False
    node: Node | None = None  # the node it runs on, if any (`PodLab.add_node`)

    @property
    def path(self) -> Path:
        return Path("/run/netns") / self.netns

    @property
    def link_local(self) -> bool:
        annotations = self.spec["metadata"].get("annotations", {})
        return bool(annotations.get(LINK_LOCAL_ANNOTATION) == "cni")

    @property
    def sidecar_log(self) -> Path:
        return self.logs / f"{self.name}-sidecar.log"

    def volume(self, name: str) -> Path:
        return self.directory / "volumes" / name

    @property
    def admin_port(self) -> int:
        """The sidecar's admin port, as its container declares it (the kubelet probes it)."""
        ports = container(self.spec, SIDECAR_NAME)["ports"]
        port: int = next(p["containerPort"] for p in ports if p["name"] == "mp-admin")
        return port

    def mounts(self, spec: Mapping[str, Any]) -> list[Mount]:
        """The container's volumeMounts under /run; others (the broker CA in /etc) are left out,
        and the lab checks their variables were remapped."""
        found = []
        for mount in spec.get("volumeMounts", []):
            target = run_path(mount["mountPath"])
            if target is not None:
                found.append(Mount(self.volume(mount["name"]), target, bool(mount.get("readOnly"))))
        return found

    def launcher(self, spec: Mapping[str, Any]) -> list[str]:
        """argv prefix: into the pod's network, a mount namespace of its own with its volumes."""
        read_only = bool(spec.get("securityContext", {}).get("readOnlyRootFilesystem"))
        script = mount_script(self.mounts(spec), read_only)
        return [
            *("nsenter", f"--net={self.path}", "--"),
            *("unshare", "--mount", "--propagation", "private", "--"),
            *("sh", "-c", script, "sh"),
        ]

    def env(self, name: str = "app") -> dict[str, str]:
        """What the webhook gave container `name`, verbatim."""
        return env_of(container(self.spec, name))

    def user(self, name: str = "app") -> tuple[int, int]:
        """(uid, gid) container `name` runs as: its securityContext's, or the image's root."""
        context = container(self.spec, name).get("securityContext", {})
        uid = int(context.get("runAsUser", 0))
        return uid, int(context.get("runAsGroup", uid))

    def argv(self, argv: list[str], name: str = "app") -> list[str]:
        uid, gid = self.user(name)
        user = [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        return [*self.launcher(container(self.spec, name)), *user, *argv]

    def process_env(self, home: Path, name: str = "app") -> dict[str, str]:
        """Container `name`'s env plus PATH, HOME and LANG, and nothing else."""
        return {"PATH": BASE_PATH, "HOME": str(home), "LANG": "C.UTF-8", **self.env(name)}

    def home(self, directory: Path, name: str = "app") -> Path:
        """An empty HOME its user owns: no ~/.aws or ~/.s3cfg for any client to read."""
        directory.mkdir()
        os.chown(directory, *self.user(name))
        return directory

    async def run(
        self, argv: list[str], home: Path, timeout: float = 120.0, name: str = "app"
    ) -> tuple[int, str, str, float]:
        """A process of container `name`: (exit status, stdout, stderr, seconds taken)."""
        started = time.monotonic()
        process = await self.spawn(argv, home, name)
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode(), time.monotonic() - started

    async def spawn(
        self,
        argv: list[str],
        home: Path,
        name: str = "app",
        stdin: int = asyncio.subprocess.DEVNULL,
    ) -> asyncio.subprocess.Process:
        """A process of container `name`, its stdout and stderr piped (and its stdin with
        `stdin=PIPE`): the caller talks to it, and waits for it or kills it."""
        return await asyncio.create_subprocess_exec(
            *self.argv(argv, name),
            env=self.process_env(home, name),
            cwd=home,
            stdin=stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def get(self, port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
        """GET http://`host`:`port``path` from inside the pod (through its NAT, if any)."""
        return await asyncio.to_thread(http_in, self.path, port, path, host=host)

    async def metrics(self) -> Samples:
        """Every sample of the sidecar's /metrics, by (name, labels), read inside the pod."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = await self.get(self.admin_port, "/metrics")
        assert status == 200, body[:200]
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }


@dataclass
class Node:
    """A node of the lab: its namespace, whose `lo` holds 169.254.169.254, and its IMDS there."""

    name: str
    netns: str
    instance: Instance  # what its IMDS says about it
    imds_log: Path  # the emulator's output
    asked_log: Path  # every path its IMDS was asked, one a line (`ec2_node --log`)
    imds: subprocess.Popen[bytes] | None = None
    links: int = 0  # veths made to its pods so far (names their node ends)

    @property
    def path(self) -> Path:
        return Path("/run/netns") / self.netns

    def asked(self) -> list[str]:
        """The paths its IMDS was asked so far, in order."""
        if not self.asked_log.exists():
            return []
        return self.asked_log.read_text().splitlines()


def requests_by_path_class(samples: Samples) -> dict[tuple[str, str], float]:
    """metaproxy_sidecar_requests_total by (path class, status), summed over listeners."""
    totals: dict[tuple[str, str], float] = {}
    for (name, labels), count in samples.items():
        if name == "metaproxy_sidecar_requests_total":
            key = (dict(labels)["path_class"], dict(labels)["status"])
            totals[key] = totals.get(key, 0.0) + count
    return totals


@dataclass
class PodLab:
    """Pods on this host; `aclose()` undoes everything it made, whatever state it is in."""

    work: Path  # short (Unix socket paths), group SIDECAR_UID may enter
    logs: Path
    broker_socket: Path
    upstream: tuple[str, int]  # what each pod's 127.0.0.1:5000 leads to (the recorder)
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    pods: list[Pod] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    _uplinks: Iterator[ipaddress.IPv4Network] | None = None  # /30s for pod-to-node veths

    @property
    def cni_bin(self) -> Path:
        return self.work / "cni-bin"

    def _cni_path(self) -> str:
        return f"{self.cni_bin}:{PLUGINS}"

    def _plugin(self, pod: Pod, command: str, conf: dict[str, Any], ifname: str) -> str:
        """One plugin execution, as libcni does it: by `type` from CNI_PATH, CNI_* set."""
        directory = next(
            d for d in self._cni_path().split(":") if (Path(d) / conf["type"]).exists()
        )
        env = {
            "PATH": os.environ["PATH"],
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.container_id,
            "CNI_NETNS": str(pod.path),
            "CNI_IFNAME": ifname,
            "CNI_PATH": self._cni_path(),
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod.name}",
        }
        result = subprocess.run(
            [str(Path(directory) / conf["type"])],
            input=json.dumps(conf),
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 0, f"{conf['type']} {command}: {result.stdout} {result.stderr}"
        return result.stdout

    def _loopback(self, pod: Pod, command: str) -> None:
        conf = {"cniVersion": CNI_VERSION, "name": "cni-loopback", "type": "loopback"}
        self._plugin(pod, command, conf, "lo")

    def _metaproxy(self, pod: Pod, command: str) -> None:
        """Our plugin, alone in its chain; the runtime hands it the pod's annotations. On a node,
        with `nodeMetadata` and the pod's uplink as CNI_IFNAME: accept_local on it."""
        annotations = pod.spec["metadata"].get("annotations", {})
        conf: dict[str, Any] = {
            "cniVersion": CNI_VERSION,
            "name": f"mpx-{self.tag}",
            "type": "metaproxy",
            "runtimeConfig": {ANNOTATIONS_CAPABILITY: annotations},
        }
        if pod.node is not None:
            conf["nodeMetadata"] = True
        self._plugin(pod, command, conf, UPLINK)

    def _prepare_directories(self) -> None:
        os.chown(self.work, 0, SIDECAR_UID)
        self.work.chmod(0o750)
        shim = self.cni_bin / "metaproxy"  # the plugin as a runtime finds it: by its type
        shim.parent.mkdir(exist_ok=True)
        shim.write_text(f'#!/bin/sh\nexec {PLUGIN} "$@"\n')
        shim.chmod(0o755)

    def _volumes(self, pod: Pod, identity_token: str) -> None:
        """The pod's volumes as the kubelet fills them: the projected token, empty dirs."""
        for volume in pod.spec["spec"]["volumes"]:
            directory = pod.volume(volume["name"])
            directory.mkdir(parents=True)
            if "projected" in volume:
                token = directory / "token"
                token.write_text(identity_token)
                os.chown(token, SIDECAR_UID, SIDECAR_UID)
                token.chmod(0o600)
            elif "emptyDir" in volume:
                directory.chmod(0o777)  # an emptyDir is writable by any uid of the pod
        for parent in (pod.directory, pod.directory / "volumes"):
            os.chown(parent, 0, SIDECAR_UID)
            parent.chmod(0o750)

    def sidecar_env(self, pod: Pod) -> dict[str, str]:
        """The sidecar container's env, with the broker reached by its Unix socket."""
        env = env_of(container(pod.spec, SIDECAR_NAME))
        assert env["METAPROXY_BROKER_CA_FILE"].startswith(CA_DIR + "/")  # the mount left out
        for name in TLS_BROKER_VARIABLES:
            del env[name]
        env["METAPROXY_BROKER_SOCKET"] = str(self.broker_socket)
        return env

    async def add(
        self, name: str, spec: dict[str, Any], identity_token: str, node: Node | None = None
    ) -> Pod:
        """A pod for the patched `spec`: its namespace prepared (linked to `node` first, if
        given, as a runtime's network plugin would), its sidecar ready."""
        if not self.pods:
            self._prepare_directories()
        pod = Pod(name, spec, self.work / name, f"mpx-{self.tag}-{name}", self.logs, node=node)
        pod.directory.mkdir()
        subprocess.run(["ip", "netns", "add", pod.netns], check=True)
        self.pods.append(pod)
        if node is not None:
            self._link(pod, node)
        self._loopback(pod, "ADD")
        if pod.link_local:
            self._metaproxy(pod, "ADD")
            pod.cni_attached = True
        self._volumes(pod, identity_token)
        pod.relay = Relay(pod.path, IN_POD_UPSTREAM_PORT, self.upstream)
        await pod.relay.start()
        self._start_sidecar(pod)
        await self._wait_ready(pod)
        return pod

    async def add_node(self, name: str, instance: Instance, timeout: float = 30.0) -> Node:
        """A node: its namespace with 169.254.169.254 on `lo`, its IMDS listening there."""
        node = Node(
            name,
            f"mpx-{self.tag}-{name}",
            instance,
            self.logs / f"{name}-imds.log",
            self.logs / f"{name}-imds-asked.log",
        )
        subprocess.run(["ip", "netns", "add", node.netns], check=True)
        self.nodes.append(node)
        for command in (
            ["ip", "-n", node.netns, "link", "set", "lo", "up"],
            ["ip", "-n", node.netns, "addr", "add", f"{NODE_IMDS}/32", "dev", "lo"],
        ):
            subprocess.run(command, check=True)
        argv = [
            *("nsenter", f"--net={node.path}", "--"),
            *(sys.executable, "-m", "metaproxy.testing.ec2_node", "--listen", f"{NODE_IMDS}:80"),
            *("--instance-id", instance.instance_id, "--instance-type", instance.instance_type),
            *("--region", instance.region, "--zone", instance.zone, "--zone-id", instance.zone_id),
            *("--local-ipv4", instance.local_ipv4, "--log", str(node.asked_log)),
        ]
        with node.imds_log.open("ab") as log:
            node.imds = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while "node IMDS for" not in node.imds_log.read_text(errors="replace"):
            output = node.imds_log.read_text(errors="replace")[-2000:]
            assert node.imds.poll() is None, f"the IMDS of node {name} exited:\n{output}"
            assert time.monotonic() < deadline, f"the IMDS of node {name} not ready:\n{output}"
            await asyncio.sleep(0.05)
        return node

    def _link(self, pod: Pod, node: Node) -> None:
        """A veth from the pod's eth0 to the node, the pod's default route through it."""
        if self._uplinks is None:
            self._uplinks = free_subnets(1)[0].subnets(new_prefix=30)
        subnet = next(self._uplinks)
        gateway, address = (subnet.network_address + n for n in (1, 2))
        node_end = f"mpx{self.tag}p{node.links}"  # in the node's namespace only
        node.links += 1
        node_ip, pod_ip = ["ip", "-n", node.netns], ["ip", "-n", pod.netns]
        veth = [*node_ip, "link", "add", node_end, "type", "veth", "peer", "name", UPLINK]
        for command in (
            [*veth, "netns", pod.netns],
            [*node_ip, "addr", "add", f"{gateway}/30", "dev", node_end],
            [*node_ip, "link", "set", node_end, "up"],
            [*pod_ip, "addr", "add", f"{address}/30", "dev", UPLINK],
            [*pod_ip, "link", "set", UPLINK, "up"],
            [*pod_ip, "route", "add", "default", "via", str(gateway)],
        ):
            subprocess.run(command, check=True)

    def _start_sidecar(self, pod: Pod) -> None:
        spec = container(pod.spec, SIDECAR_NAME)
        context = spec["securityContext"]
        assert (context["runAsUser"], context["capabilities"]) == (SIDECAR_UID, {"drop": ["ALL"]})
        prefix, base_env = unprivileged_python()
        if prefix[0] == "setpriv":  # as its securityContext says: no capability, no escalation
            prefix = [*prefix[:-1], "--no-new-privs", "--bounding-set=-all", prefix[-1]]
        argv = [*pod.launcher(spec), *prefix, "-m", "metaproxy", *spec["args"]]
        env = {**base_env, **self.sidecar_env(pod)}
        with pod.sidecar_log.open("ab") as log:
            pod.sidecar = subprocess.Popen(
                argv, env=env, cwd=pod.directory, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    async def _wait_ready(self, pod: Pod, timeout: float = 30.0) -> None:
        assert pod.sidecar is not None
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, http.client.HTTPException):
                if (await pod.get(pod.admin_port, "/readyz"))[0] == 200:
                    return
            log = pod.sidecar_log.read_text(errors="replace")[-3000:]
            assert pod.sidecar.poll() is None, f"sidecar of {pod.name} exited:\n{log}"
            assert time.monotonic() < deadline, f"sidecar of {pod.name} not ready:\n{log}"
            await asyncio.sleep(0.1)

    def sidecar_pid(self, pod: Pod) -> int | None:
        """The sidecar's own process (the launcher's last exec), or None if it is gone."""
        assert pod.sidecar is not None
        for pid in _descendants(pod.sidecar.pid):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if argv[-3:-1] == [b"metaproxy", b"sidecar"]:
                    return pid
        return None

    async def aclose(self) -> None:
        for pod in self.pods:
            if pod.relay is not None:
                await pod.relay.aclose()
            if pod.sidecar is not None and pod.sidecar.poll() is None:
                pod.sidecar.terminate()
                try:
                    await asyncio.to_thread(pod.sidecar.wait, 15)
                except subprocess.TimeoutExpired:
                    pod.sidecar.kill()
                    await asyncio.to_thread(pod.sidecar.wait)
            with contextlib.suppress(AssertionError, subprocess.SubprocessError):
                if pod.cni_attached:
                    self._metaproxy(pod, "DEL")
                self._loopback(pod, "DEL")
            subprocess.run(["ip", "netns", "del", pod.netns], check=False, capture_output=True)
        self.pods.clear()
        for node in self.nodes:  # after their pods: a pod's netns takes its veth with it
            if node.imds is not None and node.imds.poll() is None:
                node.imds.terminate()
                try:
                    await asyncio.to_thread(node.imds.wait, 15)
                except subprocess.TimeoutExpired:
                    node.imds.kill()
                    await asyncio.to_thread(node.imds.wait)
            subprocess.run(["ip", "netns", "del", node.netns], check=False, capture_output=True)
        self.nodes.clear()
        shutil.rmtree(self.cni_bin, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        parent = pending.pop()
        found.append(parent)
        children = Path(f"/proc/{parent}/task/{parent}/children")
        with contextlib.suppress(OSError):
            pending += [int(child) for child in children.read_text().split()]
    return found


def process_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (Uid, NoNewPrivs, CapBnd, …)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def root_mount_options(pid: int) -> set[str]:
    """The options of `/` as the process sees it (its mount namespace's copy)."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return set(fields[5].split(","))
    raise LookupError(f"no / in the mount namespace of {pid}")


def lab_directory() -> Path:
    """Short, because a Unix socket's path must fit in 108 bytes and pytest's tmp_path may not."""
    return Path(tempfile.mkdtemp(prefix="mpx-lab-", dir="/tmp"))
