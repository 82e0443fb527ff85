"""A task in its own network namespace gets its tenant's role from 169.254.169.254, unconfigured.

Topology of the end-to-end test (everything is created by the test and removed in `finally`):

    host ── broker (in this process) on a Unix socket ── sidecars reach it by path, any netns
    host ── moto (STS) on 10.200.A.1, the acme veth's host address, nowhere else
    netns acme:   lo 169.254.169.254/32 169.254.170.2/32 169.254.170.23/32  veth 10.200.A.2/30
    netns globex: lo 169.254.169.254/32 169.254.170.2/32 169.254.170.23/32  veth 10.200.B.2/30,
                  10.200.A.1/32 via B.1

Each namespace's nat table redirects port 80 of those addresses to its sidecar on 127.0.0.1:8182
(IMDS) and :8181 (container credentials). The host answers a packet for any of its own addresses
on any interface, so globex reaches moto through its own veth with a /32 route and no
forwarding; no namespace has a default route.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.cli import main
from tests.support import REPO, Pki, broker_config, cannot_run, issue, require_tool, run_command

ROUTE_KEYS = ("type", "dst", "gateway", "dev", "table", "protocol", "scope", "prefsrc", "metric")
CHAIN = "METAPROXY-LINK-LOCAL"  # the redirect's nat chain, in task namespaces only
IPV6 = Path("/proc/sys/net/ipv6").is_dir()
WHO_AM_I = """
import json, sys, boto3
session = boto3.Session()
credentials = session.get_credentials()
sts = session.client("sts", endpoint_url=sys.argv[1], region_name="us-east-1")
print(json.dumps({"method": credentials.method, "identity": sts.get_caller_identity()}))
"""


def ip_json(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def our_nat(netns: str | None, version: int = 4) -> list[str]:
    """The lines of a namespace's (None: the host's) nat table that mention our chain."""
    command = ["iptables" if version == 4 else "ip6tables", "-t", "nat", "-S"]
    argv = command if netns is None else ["ip", "netns", "exec", netns, *command]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if CHAIN in line]


def listening(netns: str) -> set[str]:
    """The namespace's listening TCP sockets, as `ss` names them (`127.0.0.1:8182`)."""
    argv = ["ip", "netns", "exec", netns, "ss", "-Hltn"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines()}


def host_network_state(tag: str) -> dict[str, Any]:
    """Links, addresses, routes, named namespaces and our nat chain (which belongs in task
    namespaces only); lifetimes and counters left out. Objects that other test runs name (`mpx…`
    without this run's `tag`) are left out too: other suites make and remove theirs meanwhile."""

    def kept(name: str) -> bool:
        return not name.startswith("mpx") or tag in name

    links = [link for link in ip_json("addr") if kept(link["ifname"])]
    routes = ip_json("route", "show", "table", "all") + ip_json(
        "-6", "route", "show", "table", "all"
    )
    return {
        "links": sorted(link["ifname"] for link in links),
        "addresses": sorted(
            (link["ifname"], a["family"], a["local"], a["prefixlen"])
            for link in links
            for a in link.get("addr_info", [])
        ),
        "routes": sorted(
            tuple((k, str(route[k])) for k in ROUTE_KEYS if k in route)
            for route in routes
            if kept(route.get("dev", ""))
        ),
        "netns": sorted(ns["name"] for ns in ip_json("netns", "list") if kept(ns["name"])),
        "nat": (our_nat(None) if shutil.which("iptables") else [])
        + (our_nat(None, 6) if shutil.which("ip6tables") and IPV6 else []),
    }


def netns_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    # The redirect's binaries, where `podnet.redirect` finds them.
    if (
        shutil.which("iptables-restore", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
        is None
    ):
        return "iptables is not installed"
    probe = f"mpx-probe-{secrets.token_hex(3)}"
    added = subprocess.run(
        ["ip", "netns", "add", probe], check=False, capture_output=True, text=True
    )
    if added.returncode != 0:
        return f"`ip netns add` failed: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


def require_netns() -> None:
    """Skip where namespaces are unavailable, but never in CI: CI runs as root on purpose."""
    reason = netns_unavailable()
    if reason is not None:
        cannot_run(reason)


def free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    """/30s in 10.200.0.0/16 that no host route overlaps, so the test shadows nothing. Under
    xdist each worker draws from its own third octets: two workers reading the routes at the
    same moment would otherwise be free to pick the same /30."""
    taken = [
        ipaddress.ip_network(route["dst"], strict=False)
        for route in ip_json("-4", "route", "show", "table", "all")
        if route["dst"] != "default"
    ]
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    octets = [n for n in random.sample(range(1, 255), 254) if n % workers == worker % workers]
    subnets = [ipaddress.IPv4Network(f"10.200.{n}.0/30") for n in octets]
    free = [s for s in subnets if not any(s.overlaps(t) for t in taken)]
    return free[:count]


@dataclass
class TaskNamespace:
    tenant: str
    netns: str
    host_link: str
    subnet: ipaddress.IPv4Network

    @property
    def host_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def netns_ip(self) -> str:
        return str(self.subnet.network_address + 2)


@dataclass
class NetnsLab:
    """Namespaces and veth pairs this test made; `teardown` deletes exactly those."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    created: list[TaskNamespace] = field(default_factory=list)

    def add(self, tenant: str, subnet: ipaddress.IPv4Network) -> TaskNamespace:
        index = len(self.created)
        ns = TaskNamespace(tenant, f"mpx-{self.tag}-{tenant}", f"mpx{self.tag}h{index}", subnet)
        netns_link = f"mpx{self.tag}n{index}"
        subprocess.run(["ip", "netns", "add", ns.netns], check=True)
        self.created.append(ns)
        for command in (
            [
                "ip",
                "link",
                "add",
                ns.host_link,
                "type",
                "veth",
                "peer",
                netns_link,
                "netns",
                ns.netns,
            ],
            ["ip", "addr", "add", f"{ns.host_ip}/30", "dev", ns.host_link],
            ["ip", "link", "set", ns.host_link, "up"],
            ["ip", "-n", ns.netns, "addr", "add", f"{ns.netns_ip}/30", "dev", netns_link],
            ["ip", "-n", ns.netns, "link", "set", netns_link, "up"],
        ):
            subprocess.run(command, check=True)
        return ns

    def route_to(self, ns: TaskNamespace, host_address: str) -> None:
        subprocess.run(
            ["ip", "-n", ns.netns, "route", "add", f"{host_address}/32", "via", ns.host_ip],
            check=True,
        )

    def teardown(self) -> None:
        for ns in self.created:
            # Deleting the namespace deletes its veth end, and with it the host end.
            subprocess.run(["ip", "link", "del", ns.host_link], check=False, capture_output=True)
            subprocess.run(["ip", "netns", "del", ns.netns], check=False, capture_output=True)


@contextlib.contextmanager
def moto_on(host: str, log_file: Path) -> Iterator[str]:
    """moto's server bound to one host address (IPv4 or IPv6) only; yields its URL."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    url = f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/", timeout=1):
                    break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert process.poll() is None, log_file.read_text()[-2000:]
                assert time.monotonic() < deadline, "moto did not start"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def unconfigured_env(home: Path) -> dict[str, str]:
    """No AWS_* at all and an empty HOME: root's ~/.aws must not leak into the task."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "METAPROXY_")) and "proxy" not in k.lower()
    }
    env["HOME"] = str(home)
    return env


def sidecar_args(
    tmp_path: Path, pki: Pki, broker_socket: Path, tenant: str, task: str
) -> list[str]:
    token_file = tmp_path / f"{tenant}.jwt"
    token_file.write_text(issue(pki, task, tenant))
    return [
        f"--broker-socket={broker_socket}",
        f"--identity-token-file={token_file}",
        f"--authorization-token-file={tmp_path / f'{tenant}.auth'}",
        "--drain-seconds=2",
        "--log-format=text",
    ]


async def readyz_over_socket(admin_socket: Path) -> int:
    """What the platform does from the host: the admin socket is a path, not an address."""
    connector = aiohttp.UnixConnector(path=str(admin_socket))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get("http://sidecar/readyz") as response,
    ):
        return response.status


def process_running(pid: int) -> bool:
    """A zombie has exited: the sidecar's new parent (init) reaps it in its own time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def lo_addresses(netns: str) -> list[str]:
    links = ip_json("-n", netns, "addr", "show", "dev", "lo")
    return [a["local"] for link in links for a in link.get("addr_info", [])]


@dataclass
class Platform:
    """Runs `metaproxy netns …` as a container platform would: real processes, from the host."""

    run_dir: Path
    env: dict[str, str]
    attached: list[str] = field(default_factory=list)

    def netns_argv(self, action: str, netns: str, *extra: str) -> list[str]:
        return [
            *(sys.executable, "-m", "metaproxy", "netns", action),
            *("--netns", netns, "--runtime-dir", str(self.run_dir), *extra),
        ]

    async def attach_and_wait(
        self, netns: str, sidecar: list[str], *options: str
    ) -> tuple[int, str, str]:
        argv = self.netns_argv("attach", netns, "--wait-ready", *options, "--", *sidecar)
        rc, out, err = await run_command(*argv, env=self.env, cwd=REPO)
        if rc == 0:
            self.attached.append(netns)
        return rc, out, err

    async def attach_in_foreground(
        self, netns: str, sidecar: list[str], log: Path
    ) -> asyncio.subprocess.Process:
        """Without --wait-ready attach becomes the sidecar; readiness is polled from the host."""
        with log.open("ab") as output:
            process = await asyncio.create_subprocess_exec(
                *self.netns_argv("attach", netns, "--", *sidecar),
                env=self.env,
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )
        self.attached.append(netns)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                if await readyz_over_socket(self.run_dir / netns / "admin.sock") == 200:
                    return process
            assert process.returncode is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            await asyncio.sleep(0.1)

    async def detach(self, netns: str) -> tuple[int, str, str]:
        result = await run_command(*self.netns_argv("detach", netns), env=self.env, cwd=REPO)
        self.attached.remove(netns)
        return result

    def detach_all(self) -> None:
        for netns in self.attached:
            subprocess.run(self.netns_argv("detach", netns), check=False, env=self.env, cwd=REPO)


async def who_am_i(netns: str, sts_url: str, env: dict[str, str]) -> dict[str, Any]:
    """boto3 inside the namespace, with no AWS_* variable and an empty HOME."""
    assert not [k for k in env if k.startswith("AWS_")]
    argv = ("ip", "netns", "exec", netns, sys.executable, "-c", WHO_AM_I, sts_url)
    rc, out, err = await run_command(*argv, env=env)
    assert rc == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.netns
@pytest.mark.slow  # started first: see tests/conftest.py
async def test_each_tenant_namespace_gets_its_own_role_with_no_configuration(
    tmp_path: Path, pki: Pki, policies_dir: Path
) -> None:
    """boto3 with no AWS_* in acme's and globex's namespaces sees each tenant's own role."""
    require_netns()
    lab = NetnsLab()
    before = host_network_state(lab.tag)
    await _two_tenants_in_their_own_namespaces(tmp_path, pki, policies_dir, lab)
    assert host_network_state(lab.tag) == before


async def _two_tenants_in_their_own_namespaces(
    tmp_path: Path, pki: Pki, policies_dir: Path, lab: NetnsLab
) -> None:
    # Short: a Unix socket path must fit in 108 bytes, and pytest's tmp_path may not.
    run_dir = Path(tempfile.mkdtemp(prefix="mpx-", dir="/tmp"))
    broker_socket = run_dir / "broker.sock"
    home = tmp_path / "home"
    home.mkdir()
    platform = Platform(run_dir, unconfigured_env(home))
    try:
        acme, globex = (
            lab.add(tenant, subnet)
            for tenant, subnet in zip(("acme", "globex"), free_subnets(2), strict=True)
        )
        lab.route_to(globex, acme.host_ip)
        with moto_on(acme.host_ip, tmp_path / "moto.log") as sts_url:
            # A Unix socket has no TLS: the 0700 directory it lives in is its access control.
            config = broker_config(tmp_path, pki, sts_url, policies_dir, socket=broker_socket)
            broker = await BrokerServer.start(replace(config, tls_cert=None, tls_key=None))
            try:
                acme_sidecar = sidecar_args(tmp_path, pki, broker_socket, "acme", "t-1")
                rc, out, err = await platform.attach_and_wait(acme.netns, acme_sidecar)
                assert rc == 0, err
                acme_pid = json.loads(out)["pid"]
                assert await readyz_over_socket(run_dir / acme.netns / "admin.sock") == 200
                expected = {"169.254.169.254", "169.254.170.2", "169.254.170.23"}
                assert expected <= set(lo_addresses(acme.netns))
                # The sidecar holds loopback ports only; the nat chain sends port 80 there.
                loopback = {"127.0.0.1:8182", "127.0.0.1:8181"}
                if IPV6:
                    loopback |= {"[::1]:8182", "[::1]:8181"}
                assert listening(acme.netns) == loopback
                assert f"-A OUTPUT -o lo -j {CHAIN}" in our_nat(acme.netns)
                assert len(our_nat(acme.netns)) == 5  # -N, the jump, three redirects
                rc, _, err = await platform.attach_and_wait(acme.netns, acme_sidecar)
                assert rc == 1
                assert "already attached" in err

                globex_sidecar = sidecar_args(tmp_path, pki, broker_socket, "globex", "t-1")
                globex_process = await platform.attach_in_foreground(
                    globex.netns, globex_sidecar, tmp_path / "globex-sidecar.log"
                )

                acme_seen = await who_am_i(acme.netns, sts_url, platform.env)
                globex_seen = await who_am_i(globex.netns, sts_url, platform.env)
                assert acme_seen["method"] == globex_seen["method"] == "iam-role"  # IMDS only
                assert (acme_seen["identity"]["Arn"], globex_seen["identity"]["Arn"]) == (
                    "arn:aws:sts::111111111111:assumed-role/acme-app/acme.t-1",
                    "arn:aws:sts::222222222222:assumed-role/globex-app/globex.t-1",
                )

                rc, out, err = await platform.detach(acme.netns)
                assert rc == 0, err
                assert json.loads(out)["stopped_pid"] == acme_pid
                assert not process_running(acme_pid)
                rc, out, err = await platform.detach(globex.netns)
                assert rc == 0, err
                assert json.loads(out)["stopped_pid"] == globex_process.pid  # attach exec'd
                assert await asyncio.wait_for(globex_process.wait(), 10) == 0  # drained, clean
                for ns in (acme, globex):
                    assert not [a for a in lo_addresses(ns.netns) if a.startswith("169.254.")]
                    assert our_nat(ns.netns) == []
                    assert not (run_dir / ns.netns / "admin.sock").exists()
            finally:
                platform.detach_all()
                await broker.aclose()
    finally:
        lab.teardown()
        shutil.rmtree(run_dir, ignore_errors=True)


def sidecars_of(run_dir: Path) -> list[int]:
    """Pids of live sidecars whose admin socket is under `run_dir`."""
    marker = f"--admin-listen=unix:{run_dir}/".encode()
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            pid = int(cmdline.parent.name)
            if marker in cmdline.read_bytes() and process_running(pid):
                pids.append(pid)
    return pids


@pytest.mark.netns
async def test_attach_that_never_gets_ready_leaves_nothing_behind(tmp_path: Path, pki: Pki) -> None:
    """With no broker, attach --wait-ready fails in time and undoes everything it did."""
    require_netns()
    lab = NetnsLab()
    run_dir = Path(tempfile.mkdtemp(prefix="mpx-", dir="/tmp"))
    (tmp_path / "home").mkdir()
    platform = Platform(run_dir, unconfigured_env(tmp_path / "home"))
    try:
        ns = lab.add("acme", free_subnets(1)[0])
        sidecar = sidecar_args(tmp_path, pki, run_dir / "no-broker.sock", "acme", "t-1")
        rc, _, err = await platform.attach_and_wait(ns.netns, sidecar, "--ready-timeout=2")
        assert rc == 1
        assert "not ready" in err
        assert not [a for a in lo_addresses(ns.netns) if a.startswith("169.254.")]
        assert our_nat(ns.netns) == []
        assert sorted(p.name for p in (run_dir / ns.netns).iterdir()) == ["sidecar.log"]
        assert sidecars_of(run_dir) == []

        rc, _, err = await platform.attach_and_wait(f"mpx-{lab.tag}-missing", sidecar)
        assert rc == 1
        assert "no network namespace" in err
    finally:
        platform.detach_all()
        lab.teardown()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "x" * 65, "acme;reboot"])
def test_attach_refuses_a_namespace_name_that_is_not_a_plain_name(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name that could escape /run/netns or the runtime dir is refused with exit status 2."""
    assert main(["netns", "attach", "--netns", name]) == 2
    assert "--netns" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "reason"),
    [
        ("--imds-listen=127.0.0.1:80", "--imds-listen is set by netns attach"),
        ("--admin-listen", "--admin-listen is set by netns attach"),
        ("--ready-file", "--ready-file is set by netns attach"),
        ("--", "only one -- is allowed"),
    ],
)
def test_attach_refuses_sidecar_arguments_it_owns(
    flag: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Listen addresses and the ready file are attach's to set, not the caller's."""
    argv = ["netns", "attach", "--netns", "acme", "--runtime-dir", str(tmp_path), "--", flag]
    assert main([*argv, "x"]) == 2
    assert reason in capsys.readouterr().err


async def test_attach_without_root_says_it_needs_root() -> None:
    """An unprivileged caller gets exit status 1 and a one-line reason, before anything changes."""
    argv = [sys.executable, "-m", "metaproxy", "netns", "attach", "--netns", "acme"]
    if os.geteuid() == 0:
        argv = [
            require_tool("setpriv", "util-linux"),
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            *argv,
        ]
    rc, _, err = await run_command(*argv, env=dict(os.environ), cwd=REPO)
    assert rc == 1
    assert "needs root" in err


def test_detach_twice_succeeds(tmp_path: Path) -> None:
    """Detach removes the address, the jump and the chain; a second run, with them already
    gone, exits 0."""
    require_netns()
    name = f"mpx-detach-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            ["ip", "-n", name, "addr", "add", "169.254.169.254/32", "dev", "lo"], check=True
        )
        iptables = ["ip", "netns", "exec", name, "iptables", "-t", "nat"]
        subprocess.run([*iptables, "-N", CHAIN], check=True)
        subprocess.run([*iptables, "-A", "OUTPUT", "-o", "lo", "-j", CHAIN], check=True)
        argv = [sys.executable, "-m", "metaproxy", "netns", "detach", "--netns", name]
        argv += ["--runtime-dir", str(tmp_path)]
        for _ in range(2):
            result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO)
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout) == {"netns": name, "stopped_pid": None}
        shown = subprocess.run(
            ["ip", "-n", name, "addr", "show", "dev", "lo"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "169.254.169.254" not in shown.stdout
        assert our_nat(name) == []
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


# --- IPv6 ------------------------------------------------------------------------------------


def v6_lab(lab: NetnsLab, tenant: str) -> tuple[str, str]:
    """A namespace whose only network is IPv6 (a veth with a ULA /64, no IPv4 address); returns
    (namespace, the host end's address)."""
    prefix = f"fd00:200:{secrets.randbelow(0xFFFF):x}"
    host, inside = f"{prefix}::1", f"{prefix}::2"
    index = len(lab.created)
    ns = TaskNamespace(
        tenant,
        f"mpx-{lab.tag}-{tenant}",
        f"mpx{lab.tag}h{index}",
        ipaddress.IPv4Network("192.0.2.0/30"),  # unused: nothing of it is configured
    )
    netns_link = f"mpx{lab.tag}n{index}"
    subprocess.run(["ip", "netns", "add", ns.netns], check=True)
    lab.created.append(ns)
    for command in (
        ["ip", "link", "add", ns.host_link, "type", "veth", "peer", netns_link, "netns", ns.netns],
        # nodad: usable at once rather than tentative for the seconds duplicate detection takes.
        ["ip", "addr", "add", f"{host}/64", "dev", ns.host_link, "nodad"],
        ["ip", "link", "set", ns.host_link, "up"],
        ["ip", "-n", ns.netns, "addr", "add", f"{inside}/64", "dev", netns_link, "nodad"],
        ["ip", "-n", ns.netns, "link", "set", netns_link, "up"],
    ):
        subprocess.run(command, check=True)
    return ns.netns, host


async def boto3_in(netns: str, sts_url: str, env: dict[str, str]) -> dict[str, Any]:
    """boto3 inside the namespace, with the environment given."""
    argv = ("ip", "netns", "exec", netns, sys.executable, "-c", WHO_AM_I, sts_url)
    rc, out, err = await run_command(*argv, env=env)
    assert rc == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.netns
@pytest.mark.slow  # started first: see tests/conftest.py
async def test_ipv6_only_namespace_gets_credentials_at_fd00_ec2(
    tmp_path: Path, pki: Pki, policies_dir: Path
) -> None:
    """In a namespace whose network is IPv6 only and whose IPv4 metadata addresses are gone,
    boto3 gets the tenant's role through [fd00:ec2::254] (IMDS, endpoint mode IPv6) and through
    http://[fd00:ec2::23]/ (container credentials)."""
    require_netns()
    lab = NetnsLab()
    run_dir = Path(tempfile.mkdtemp(prefix="mpx-", dir="/tmp"))
    broker_socket = run_dir / "broker.sock"
    home = tmp_path / "home"
    home.mkdir()
    platform = Platform(run_dir, unconfigured_env(home))
    try:
        netns, host = v6_lab(lab, "acme")
        with moto_on(host, tmp_path / "moto.log") as sts_url:
            config = broker_config(tmp_path, pki, sts_url, policies_dir, socket=broker_socket)
            broker = await BrokerServer.start(replace(config, tls_cert=None, tls_key=None))
            try:
                args = sidecar_args(tmp_path, pki, broker_socket, "acme", "v6")
                rc, _, err = await platform.attach_and_wait(netns, args)
                assert rc == 0, err
                assert {"fd00:ec2::254", "fd00:ec2::23"} <= set(lo_addresses(netns))
                assert {"[::1]:8182", "[::1]:8181"} <= listening(netns)
                assert len(our_nat(netns, 6)) == 4  # -N, the jump, two redirects
                # Only the IPv6 endpoints are left to answer.
                for address in ("169.254.169.254/32", "169.254.170.2/32", "169.254.170.23/32"):
                    subprocess.run(
                        ["ip", "-n", netns, "addr", "del", address, "dev", "lo"], check=True
                    )
                expected = "arn:aws:sts::111111111111:assumed-role/acme-app/acme.v6"

                imds_env = {**platform.env, "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"}
                seen = await boto3_in(netns, sts_url, imds_env)
                assert (seen["method"], seen["identity"]["Arn"]) == ("iam-role", expected)

                container_env = {
                    **platform.env,
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://[fd00:ec2::23]/v1/credentials",
                    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(tmp_path / "acme.auth"),
                }
                seen = await boto3_in(netns, sts_url, container_env)
                assert (seen["method"], seen["identity"]["Arn"]) == ("container-role", expected)

                rc, _, err = await platform.detach(netns)
                assert rc == 0, err
                assert not [a for a in lo_addresses(netns) if a.startswith("fd00:ec2:")]
                assert our_nat(netns, 6) == []
            finally:
                platform.detach_all()
                await broker.aclose()
    finally:
        lab.teardown()
        shutil.rmtree(run_dir, ignore_errors=True)
