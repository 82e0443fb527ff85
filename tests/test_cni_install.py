"""`metaproxy link-local install-cni` puts the CNI plugin on a node and keeps it chained into the
node's primary network configuration; `uninstall-cni` takes it out (docs/link-local.md,
"Installing the plugin").

The installer runs as the DaemonSet runs it, as its own process, on temporary dirs standing in
for the node's /opt/cni/bin and /etc/cni/net.d. The plugin it writes is then run as a runtime
runs it: executed by its `#!` line with Debian's /usr/bin/python3 and nothing but PATH and the
CNI_* variables, on namespaces made with `ip netns add`.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metaproxy.podnet import CONTAINER_PORT, IMDS_PORT, LINK_LOCAL_ANNOTATION, LINK_LOCAL_CNI
from metaproxy.podnet.plugin_archive import PLUGIN_MODULES
from metaproxy.podnet.plugin_main import TOO_OLD, main_source
from tests.support import REPO, cannot_run, require_tool
from tests.test_cni import (
    CAPABILITY,
    TASK,
    Node,
    lo_addresses,
    nat_in_place,
    require_cni,
)
from tests.test_netns import IPV6, host_network_state, our_nat, require_netns

NODE_PYTHON = Path("/usr/bin/python3")  # Debian's 3.11: the node's interpreter
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
ENTRY = {"type": "metaproxy", "capabilities": {CAPABILITY: True}, "nodeMetadata": False}
# A bridge network as a node has it, keys deliberately out of alphabetical order.
BRIDGE = {
    "name": "k8s-pod-network",
    "cniVersion": "1.0.0",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": True,
            "ipMasq": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]]},
        },
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
    ],
    "disableCheck": False,
}
CNI_POD = {LINK_LOCAL_ANNOTATION: LINK_LOCAL_CNI}


def ordered(value: Any) -> Any:
    """A JSON value with every object as its list of (key, value) pairs: equal only when the
    key order is too."""
    if isinstance(value, dict):
        return [(key, ordered(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [ordered(item) for item in value]
    return value


def with_entry(network: dict[str, Any], entry: dict[str, Any] = ENTRY) -> dict[str, Any]:
    return {**network, "plugins": [*network["plugins"], entry]}


class Host:
    """Temporary stand-ins for the node's CNI bin and conf dirs, and the installer on them."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "opt-cni-bin"
        self.conf = root / "etc-cni-net.d"
        self.ready = root / "ready"
        self.bin.mkdir()
        self.conf.mkdir()

    @property
    def plugin(self) -> Path:
        return self.bin / "metaproxy"

    def argv(self, command: str, *args: str) -> list[str]:
        dirs = [f"--cni-bin-dir={self.bin}", f"--cni-conf-dir={self.conf}"]
        return [sys.executable, "-m", "metaproxy", "link-local", command, *dirs, *args]

    def run(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command, *args), capture_output=True, text=True, cwd=REPO, check=False
        )

    def install(self, *args: str) -> list[str]:
        """`install-cni --once`, which must succeed: the messages it logged."""
        done = self.run("install-cni", "--once", *args)
        assert done.returncode == 0, done.stderr
        return messages(done.stderr)

    def probe(self) -> subprocess.CompletedProcess[str]:
        """The DaemonSet's readiness probe."""
        argv = [sys.executable, "-m", "metaproxy", "link-local", "check-install"]
        argv.append(f"--ready-file={self.ready}")
        return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, check=False)

    def watch(self, *args: str) -> subprocess.Popen[str]:
        argv = self.argv("install-cni", f"--ready-file={self.ready}", *args)
        return subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
        )

    def write(self, name: str, document: Any) -> Path:
        """As a CNI agent writes its file: whole, by rename."""
        text = document if isinstance(document, str) else json.dumps(document, indent=4) + "\n"
        path = self.conf / name
        temporary = self.conf / f".{name}.tmp"
        temporary.write_text(text)
        temporary.replace(path)
        return path

    def read(self, name: str) -> Any:
        return json.loads((self.conf / name).read_text())


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def messages(stderr: str) -> list[str]:
    """The installer's log: one JSON object per line; their messages."""
    return [json.loads(line)["message"] for line in stderr.splitlines()]


def stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_ino, info.st_mtime_ns


def wait_for(condition: Any, seconds: float, what: str) -> float:
    """Poll `condition()` until true; the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"no {what} after {seconds}s"
        time.sleep(0.02)
    return time.monotonic() - start


def stop(process: subprocess.Popen[str]) -> tuple[int, list[str]]:
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    return process.returncode, messages(err)


# --- installing, idempotently ---------------------------------------------------------------------


def test_install_writes_the_plugin_and_appends_exactly_our_entry(host: Host) -> None:
    """The zipapp lands 0755 with its #! line; the conflist gains our entry at the end and is
    otherwise the same JSON, key order included; one log line per file changed."""
    host.write("10-bridge.conflist", BRIDGE)
    logged = host.install()
    assert host.plugin.stat().st_mode & 0o777 == 0o755
    assert host.plugin.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert zipfile.is_zipfile(host.plugin)
    assert ordered(host.read("10-bridge.conflist")) == ordered(with_entry(BRIDGE))
    assert [m.split(":")[0] for m in logged] == [
        str(host.plugin),
        str(host.conf / "10-bridge.conflist"),
    ]
    assert "appended the metaproxy entry" in logged[1]
    assert sorted(p.name for p in host.conf.iterdir()) == ["10-bridge.conflist"]


def test_second_install_changes_nothing(host: Host) -> None:
    """Run again, the installer rewrites neither file (same inode, same mtime) and logs nothing."""
    host.write("10-bridge.conflist", BRIDGE)
    host.install()
    before = stamp(host.plugin), stamp(host.conf / "10-bridge.conflist")
    time.sleep(0.01)
    assert host.install() == []
    assert (stamp(host.plugin), stamp(host.conf / "10-bridge.conflist")) == before


def test_only_the_first_configuration_by_name_is_chained(host: Host) -> None:
    """The runtime uses the first *.conflist, *.conf or *.json by name; the others, and files
    with other suffixes, stay as they were."""
    first = host.write("05-cilium.conflist", BRIDGE | {"name": "cilium"})
    later = host.write("10-bridge.conflist", BRIDGE)
    other = host.write("00-backup.conflist.bak", BRIDGE)
    untouched = {p: p.read_bytes() for p in (later, other)}
    host.install()
    assert host.read(first.name) == with_entry(BRIDGE | {"name": "cilium"})
    assert {p: p.read_bytes() for p in untouched} == untouched


def test_single_plugin_conf_becomes_a_conflist(host: Host) -> None:
    """As libcni's ConfListFromConf and istio-cni do: the list takes the plugin's name and
    version, the plugin keeps all its fields, the .conf is removed; a repeat changes nothing."""
    bridge = {"cniVersion": "0.4.0", "name": "mynet", "type": "bridge", "bridge": "cni0"}
    host.write("10-mynet.conf", bridge)
    logged = host.install()
    assert sorted(p.name for p in host.conf.iterdir()) == ["10-mynet.conflist"]
    expected = {"cniVersion": "0.4.0", "name": "mynet", "plugins": [bridge, ENTRY]}
    assert ordered(host.read("10-mynet.conflist")) == ordered(expected)
    assert "converted from 10-mynet.conf" in logged[-1]
    assert host.install() == []


def test_ports_and_node_metadata_go_into_the_entry(host: Host) -> None:
    """--node-metadata and ports other than the defaults are in the entry; installing with other
    settings replaces the entry where it is, and says which fields changed."""
    host.write("10-bridge.conflist", BRIDGE)
    host.install("--node-metadata", "--imds-port=9182")
    entry = ENTRY | {"nodeMetadata": True, "imdsPort": 9182}
    assert host.read("10-bridge.conflist") == with_entry(BRIDGE, entry)
    logged = host.install(f"--imds-port={IMDS_PORT}", f"--container-port={CONTAINER_PORT}")
    assert host.read("10-bridge.conflist") == with_entry(BRIDGE)
    assert logged[-1].endswith("updated the metaproxy entry: imdsPort, nodeMetadata")


UNUSABLE = [
    pytest.param("10-bridge.conflist", b"{not json\n", "not JSON", id="not-json"),
    pytest.param(
        "10-bridge.conflist",
        b'{"cniVersion": "1.0.0", "name": "a", "name": "b", "plugins": [{"type": "bridge"}]}',
        "duplicate key 'name'",
        id="duplicate-key",
    ),
    pytest.param(
        "10-bridge.conflist",
        json.dumps(BRIDGE | {"cniVersion": "0.2.0"}).encode(),
        "cniVersion '0.2.0' is not one the plugin speaks",
        id="version-the-plugin-does-not-speak",
    ),
    pytest.param(
        "10-bridge.conflist",
        json.dumps({"cniVersion": "1.0.0", "name": "x", "type": "bridge"}).encode(),
        "a .conflist without a plugins list",
        id="conflist-without-plugins",
    ),
    pytest.param(
        "10-bridge.conf",
        json.dumps(BRIDGE).encode(),
        "a .conf without a plugin type",
        id="conf-without-type",
    ),
]


@pytest.mark.parametrize(("name", "content", "reason"), UNUSABLE)
def test_a_file_it_cannot_edit_safely_is_left_untouched(
    host: Host, name: str, content: bytes, reason: str
) -> None:
    """Not JSON, a duplicate key (rewriting would drop one), a cniVersion the plugin would fail
    every ADD with, the wrong shape: left byte for byte, one log line, exit 1, no next file."""
    path = host.conf / name
    path.write_bytes(content)
    fallback = host.write("20-other.conflist", BRIDGE)
    before = stamp(path), fallback.read_bytes()
    done = host.run("install-cni", "--once")
    assert done.returncode == 1
    assert (stamp(path), fallback.read_bytes()) == before
    assert path.read_bytes() == content
    (logged,) = messages(done.stderr)[1:]  # after the binary's line
    assert logged.startswith(f"not installed: {path}: {reason}")
    assert logged.endswith("; left untouched; retrying")
    assert "Traceback" not in done.stderr


def test_no_configuration_yet_is_not_installed(host: Host) -> None:
    """Before the pod network writes its configuration there is nothing to chain: exit 1, the
    binary is already in place for when it does."""
    done = host.run("install-cni", "--once")
    assert done.returncode == 1
    assert messages(done.stderr)[-1].startswith(f"not installed: {host.conf}: no CNI network")
    assert host.plugin.exists()


# --- the watch ----------------------------------------------------------------------------------


def test_watcher_chains_the_file_again_when_the_primary_cni_rewrites_it(host: Host) -> None:
    """The AWS VPC CNI and Calico rewrite their file on restart: the next pass (one interval)
    chains it again. A broken file is logged once over many passes and chained once repaired.
    SIGTERM: exit 0, not ready, the plugin stays in place."""
    interval = 0.3
    path = host.write("10-bridge.conflist", BRIDGE)
    chained = with_entry(BRIDGE)
    process = host.watch(f"--interval={interval}")
    try:
        wait_for(host.ready.exists, 10, "ready file")
        probe = host.probe()
        assert probe.returncode == 0, probe.stderr
        assert host.read(path.name) == chained

        host.write(path.name, BRIDGE)  # the agent writes its own version back
        took = wait_for(lambda: host.read(path.name) == chained, interval + 2, "re-chaining")
        assert took < interval + 2

        host.write(path.name, "{not a network")
        wait_for(lambda: not host.ready.exists(), interval + 2, "not ready")
        time.sleep(interval * 4)  # several passes over the same problem
        host.write(path.name, BRIDGE)
        wait_for(host.ready.exists, interval + 2, "ready again")
        assert host.read(path.name) == chained
    finally:
        status, logged = stop(process)
    assert status == 0
    assert len([m for m in logged if "not JSON" in m]) == 1
    assert not host.ready.exists()
    assert host.read(path.name) == chained
    assert host.plugin.exists()
    probe = host.probe()
    assert probe.returncode == 1
    assert probe.stderr.count("\n") == 1
    assert "not ready" in probe.stderr


def test_uninstall_on_exit_removes_the_entry_then_the_binary(host: Host) -> None:
    """With --uninstall-on-exit, SIGTERM takes out our entry and the binary; the file is the
    primary CNI's again, key order included."""
    path = host.write("10-bridge.conflist", BRIDGE)
    process = host.watch("--interval=0.2", "--uninstall-on-exit")
    try:
        wait_for(host.ready.exists, 10, "ready file")
    finally:
        status, logged = stop(process)
    assert status == 0
    assert ordered(host.read(path.name)) == ordered(BRIDGE)
    assert not host.plugin.exists()
    assert logged[-2:] == [
        f"{path}: removed the metaproxy entry",
        f"{host.plugin}: removed the plugin",
    ]


def test_uninstall_cni_removes_the_entry_and_the_binary(host: Host) -> None:
    """`uninstall-cni` leaves the configuration as it was before the install, and the dir as it
    was; run again, it has nothing to do."""
    host.write("10-bridge.conflist", BRIDGE)
    host.install("--node-metadata")
    done = host.run("uninstall-cni")
    assert done.returncode == 0, done.stderr
    assert ordered(host.read("10-bridge.conflist")) == ordered(BRIDGE)
    assert sorted(p.name for p in host.conf.iterdir()) == ["10-bridge.conflist"]
    assert list(host.bin.iterdir()) == []
    again = host.run("uninstall-cni")
    assert (again.returncode, again.stderr) == (0, "")


# --- ordinary mistakes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["--cni-bin-dir=/nonexistent/opt/cni/bin"], 1, "--cni-bin-dir /nonexistent"),
        (["--cni-conf-dir=/nonexistent/net.d"], 1, "--cni-conf-dir /nonexistent"),
        (["--python=python3"], 2, "--python: 'python3' must start with an absolute path"),
        (["--python=/usr/bin/" + "p" * 130], 2, "--python"),
        (["--interval=0"], 2, "--interval: '0' is not a number of seconds above 0"),
        (["--imds-port=80000"], 2, "--imds-port"),
    ],
)
def test_a_mistake_is_one_line_naming_the_flag(
    host: Host, args: list[str], status: int, says: str
) -> None:
    """A missing dir exits 1, a bad value 2, each in one line naming the flag, no traceback."""
    done = subprocess.run(
        [*host.argv("install-cni", "--once"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == status
    assert says in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    if status == 1:
        assert done.stderr.count("\n") == 1


# --- the artifact -------------------------------------------------------------------------------


def node_python() -> Path:
    if not NODE_PYTHON.exists():
        cannot_run(f"{NODE_PYTHON} is missing (the node's interpreter in these tests)")
    return NODE_PYTHON


IMPORTS = """
import json, sys
plugin, conf = sys.argv[1:]
sys.path.insert(0, plugin)
from metaproxy.podnet import cni
env = {"CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/run/netns/mpx-not-there", "CNI_IFNAME": "eth0"}
codes = {}
for command in ("ADD", "CHECK", "DEL", "VERSION", "STATUS"):
    status, out, _ = cni.run(env | {"CNI_COMMAND": command}, conf.encode())
    codes[command] = json.loads(out).get("code", 0) if out else 0
modules = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()}
print(json.dumps({"codes": codes, "modules": modules}))
"""


def test_the_plugin_needs_the_standard_library_only(host: Host) -> None:
    """Under the node's python3 with no site-packages at all (-I -S), every command of the
    plugin runs from the zipapp, down to the lazily imported namespace code (ADD on a gone
    namespace: error 102); every module it loads is either the standard library's or ours from
    the archive, and the archive holds exactly what it loads."""
    python = node_python()
    host.write("10-bridge.conflist", BRIDGE)
    host.install()
    conf = {"cniVersion": "1.1.0", "name": "net", "runtimeConfig": {CAPABILITY: CNI_POD}}
    argv = [str(python), "-I", "-S", "-c", IMPORTS, str(host.plugin), json.dumps(conf)]
    done = subprocess.run(argv, capture_output=True, text=True, env={}, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["codes"] == {"ADD": 102, "CHECK": 102, "DEL": 0, "VERSION": 0, "STATUS": 0}
    ours = {name: path for name, path in report["modules"].items() if name.startswith("metaproxy")}
    assert sorted(ours) == sorted(PLUGIN_MODULES)
    assert all(path.startswith(f"{host.plugin}/") for path in ours.values())
    others = {name.partition(".")[0] for name in report["modules"]} - {"metaproxy", "__main__"}
    assert others <= sys.stdlib_module_names, others - sys.stdlib_module_names
    with zipfile.ZipFile(host.plugin) as archive:
        sources = {n for n in archive.namelist() if n.endswith(".py")} - {"__main__.py"}
    assert len(sources) == len(PLUGIN_MODULES)


def test_main_is_written_in_syntax_old_interpreters_parse() -> None:
    """The version check must run: no f-strings, walrus, annotations or __future__ import that
    an old interpreter would stop at with a SyntaxError."""
    source = main_source()
    ast.parse(source, feature_version=(3, 4))  # refuses f-strings and := among others
    assert "__future__" not in source
    tree = ast.parse(source)
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.arg) and n.annotation]
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.returns]


# --- the version gate -----------------------------------------------------------------------------

# A stand-in for an old node interpreter: Debian's python3 running the zipapp's __main__ exactly
# as it would run it (runpy, the archive first on sys.path), with `sys.version_info` set to
# another version first. Only the version is fake; the file, its output and exit are real.
FAKE_PYTHON = """#!{python}
import collections, runpy, sys
Version = collections.namedtuple("Version", "major minor micro releaselevel serial")
sys.version_info = Version(*{version!r})
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def fake_python(where: Path, version: tuple[int, int, int, str, int]) -> Path:
    path = where / f"python{version[0]}.{version[1]}"
    path.write_text(FAKE_PYTHON.format(python=node_python(), version=version))
    path.chmod(0o755)
    return path


def older_interpreter() -> str | None:
    """A real Python older than 3.11 on this machine (PyPy 3.9 is in Debian 12), if any."""
    for name in ("pypy3", *(f"python3.{minor}" for minor in range(10, 5, -1)), "python2.7"):
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def cni_run(
    plugin: Path, command: str, annotations: dict[str, str], prev: dict[str, Any] | None = None
) -> tuple[int, Any, str]:
    """The plugin executed directly (its #! line picks the interpreter), with a runtime's
    environment and nothing else."""
    conf: dict[str, Any] = {"cniVersion": "1.0.0", "name": "net", "type": "metaproxy"}
    conf["runtimeConfig"] = {CAPABILITY: annotations}
    if prev is not None:
        conf["prevResult"] = prev
    env = {
        "PATH": CLEAN_PATH,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/run/netns/mpx-not-there",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
    }
    done = subprocess.run(
        [str(plugin)], input=json.dumps(conf), env=env, capture_output=True, text=True, check=False
    )
    return done.returncode, json.loads(done.stdout or "null"), done.stderr


PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []}


def assert_refuses_only_marked_pods(plugin: Path, interpreter: str, version: str) -> None:
    status, error, err = cni_run(plugin, "ADD", CNI_POD, PREV)
    assert status == 1
    assert set(error) == {"cniVersion", "code", "msg", "details"}
    assert (error["cniVersion"], error["code"]) == ("1.0.0", TOO_OLD)
    assert error["msg"] == (
        f"metaproxy-cni needs Python 3.11 or later; {interpreter} is Python {version}"
    )
    assert "--python" in error["details"]
    assert "--link-local=init-container" in error["details"]
    assert (err.count("\n"), "Traceback" in err) == (1, False)
    assert cni_run(plugin, "CHECK", CNI_POD, PREV)[:2] == (1, error)
    # Every other pod passes through as the plugin itself passes it; DEL and STATUS succeed.
    assert cni_run(plugin, "ADD", {}, PREV)[:2] == (0, PREV)
    assert cni_run(plugin, "ADD", {})[:2] == (
        0,
        {"cniVersion": "1.0.0", "interfaces": [], "ips": [], "dns": {}},
    )
    for command in ("DEL", "STATUS", "GC"):
        assert cni_run(plugin, command, CNI_POD)[:2] == (0, None)


def test_an_interpreter_too_old_refuses_marked_pods_with_the_cni_error(
    host: Host, tmp_path: Path
) -> None:
    """Run by a Python 3.9 (Debian's python3 told it is 3.9), the plugin answers a marked pod's
    ADD and CHECK with error 103 naming the interpreter and both ways out, lets every other pod
    through, and lets DEL and STATUS succeed; told 3.11, the same stand-in runs the plugin."""
    old = fake_python(tmp_path, (3, 9, 18, "final", 0))
    host.write("10-bridge.conflist", BRIDGE)
    host.install(f"--python={old}")
    assert_refuses_only_marked_pods(host.plugin, str(node_python()), "3.9")

    current = fake_python(tmp_path, (3, 11, 2, "final", 0))
    host.install(f"--python={current}")
    status, answer, err = cni_run(host.plugin, "ADD", {}, PREV)
    assert (status, answer) == (0, PREV), err
    assert "untouched (not annotated" in err


def test_a_real_older_interpreter_gets_the_cni_error(host: Host) -> None:
    """The same with a real interpreter older than 3.11 (PyPy 3.9 where installed): it parses
    `__main__` and answers with the error instead of a SyntaxError or an ImportError."""
    interpreter = older_interpreter()
    if interpreter is None:
        cannot_run("no Python older than 3.11 installed (Debian: pypy3; make system-deps)")
    found = subprocess.run(
        [interpreter, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    host.write("10-bridge.conflist", BRIDGE)
    host.install(f"--python={interpreter}")
    assert_refuses_only_marked_pods(host.plugin, interpreter, found)


# --- as root: no capability, and the plugin as a runtime runs it -------------------------------


def require_root() -> None:
    if os.geteuid() != 0:
        cannot_run("needs root")
    require_tool("setpriv", "util-linux")


@pytest.mark.netns
def test_root_without_any_capability_installs_into_root_owned_dirs(host: Host) -> None:
    """As the DaemonSet runs it (uid 0, every capability dropped), the installer writes the
    root-owned 0755 dirs and 0644 files of a node: their owner needs no capability. A dir it
    may not write (0555, which root without CAP_DAC_OVERRIDE cannot) is one line naming it."""
    require_root()
    for directory in (host.bin, host.conf):
        directory.chmod(0o755)
    path = host.write("10-bridge.conflist", BRIDGE)
    path.chmod(0o644)
    no_capabilities = ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all"]
    argv = [*no_capabilities, *host.argv("install-cni", "--once")]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    assert host.read(path.name) == with_entry(BRIDGE)
    assert path.stat().st_mode & 0o777 == 0o644
    host.conf.chmod(0o555)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, check=False)
    finally:
        host.conf.chmod(0o755)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"metaproxy link-local install-cni: --cni-conf-dir {host.conf}: not writable "
        "(mount it read-write; run as root)"
    )


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    """A node namespace whose runtime runs plugins with PATH and the CNI_* variables only; the
    host's network is as it was afterwards."""
    require_cni()
    node_python()
    node = Node(tmp_path / "node")
    node.work.mkdir()
    before = host_network_state(node.tag)
    # Node.invoke hands its plugins exactly PATH and CNI_*: with this PATH, the environment
    # of `env -i PATH=... CNI_...=...`, and no way into the venv.
    monkeypatch.setenv("PATH", CLEAN_PATH)
    try:
        node.start()
        yield node
    finally:
        node.teardown()
    assert host_network_state(node.tag) == before


@pytest.mark.netns
def test_the_installed_plugin_works_as_a_real_cni_plugin(node: Node, host: Host) -> None:
    """The installer's zipapp, in the node's CNI bin dir and chained into the bridge network by
    the installer, run by its #! line with Debian's python3 as the runtime runs it: after
    loopback, ADD passes the bridge's result on and puts the addresses and the NAT chain in
    the pod; CHECK passes; DEL removes them."""
    require_netns()
    bridge_network = node.network()
    bridge_network["plugins"] = bridge_network["plugins"][:1]
    host.write("10-bridge.conflist", bridge_network)
    installer = subprocess.run(
        [
            *host.argv("install-cni", "--once", f"--python={NODE_PYTHON}"),
            f"--cni-bin-dir={node.work / 'cni-bin'}",  # replaces the shim Node.start wrote
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert installer.returncode == 0, installer.stderr
    plugin = node.work / "cni-bin" / "metaproxy"
    assert plugin.read_bytes().startswith(f"#!{NODE_PYTHON}\n".encode())
    network = host.read("10-bridge.conflist")
    assert network["plugins"][-1] == ENTRY

    pod = node.pod("web", **CNI_POD)
    bridge_result, ours = node.attach(pod, network)
    assert ours == bridge_result
    assert lo_addresses(pod.netns) >= TASK
    assert nat_in_place(pod.netns)
    node.run("CHECK", pod, network)
    node.detach(pod, network)
    assert not lo_addresses(pod.netns) & TASK
    assert (our_nat(pod.netns), our_nat(pod.netns, 6) if IPV6 else []) == ([], [])
