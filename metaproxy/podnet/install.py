"""`metaproxy link-local install-cni`: the CNI plugin on a node, chained into its network
configuration, as istio-cni's install-cni does it from a DaemonSet.

Two things go onto the node, through the DaemonSet's hostPath mounts:

- the plugin, as `<bin dir>/metaproxy`: a zipapp of the modules `metaproxy.podnet.cni` imports
  (standard library only), run by the node's own `python3`. Its `__main__` is written in syntax
  every Python parses, so that an interpreter too old for the plugin answers with the spec's
  error object instead of a SyntaxError, and only for the pods that need the plugin;
- our entry at the end of `plugins` in the node's primary network configuration: the
  lexicographically first `*.conflist`, `*.conf` or `*.json` of the conf dir, the one
  containerd and CRI-O use. A single-plugin `.conf` becomes a `.conflist`, as libcni's
  `ConfListFromConf` and istio-cni do. Everything else in the file stays as it was.

The binary goes in before the entry and comes out after it: a runtime that sees the entry
without the binary fails every pod on the node. Files are replaced by rename, so the runtime
never reads half of one, and only when their content changes. A file that cannot be edited
safely (not JSON, duplicate keys, a cniVersion the plugin does not speak) is left alone, logged
once, and retried on the next pass; the primary CNI's own agent (the AWS VPC CNI, Calico)
rewrites its file when it restarts, and the next pass chains it again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import marshal
import os
import signal
import stat
import string
import zipapp
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaproxy.errors import StartError
from metaproxy.fsutil import write_atomically
from metaproxy.podnet import CONTAINER_PORT, IMDS_PORT, LINK_LOCAL_ANNOTATION, LINK_LOCAL_CNI
from metaproxy.podnet.cni import ANNOTATIONS_CAPABILITY, MAX_CONFIG_BYTES, SUPPORTED_VERSIONS

log = logging.getLogger("metaproxy.podnet.install")

PLUGIN_TYPE = "metaproxy"  # the `type` a runtime looks up in its CNI bin dir
CONFIG_SUFFIXES = (".conf", ".conflist", ".json")  # what libcni's ConfFiles reads
# Linux reads at most 127 bytes of a `#!` line before 5.1 (BINPRM_BUF_SIZE was 128).
MAX_SHEBANG_BYTES = 127
MINIMUM_PYTHON = (3, 11)  # metaproxy's requires-python; the plugin uses typing.Self
TOO_OLD = 103  # the plugin's error code for "this interpreter cannot run the plugin"
# What the plugin imports, at the top and lazily in `handle`; tests/test_cni_install.py runs the
# plugin from the zipapp under `python3 -I -S` to prove this is all it needs.
PLUGIN_MODULES = (
    "metaproxy",
    "metaproxy.clihelp",
    "metaproxy.config",
    "metaproxy.errors",
    "metaproxy.podnet",
    "metaproxy.podnet.addresses",
    "metaproxy.podnet.cni",
    "metaproxy.podnet.namespace",
    "metaproxy.podnet.netlink",
    "metaproxy.podnet.redirect",
)
# A fixed timestamp for every archive member: the same sources give the same bytes, so an
# unchanged plugin is never rewritten.
_EPOCH = (1980, 1, 1, 0, 0, 0)

# Python 2.7 and every 3.x must parse this: it runs before we know the interpreter can run the
# plugin. An interpreter that cannot fails only the pods that need the plugin (their ADD and
# CHECK); every other pod passes through as the plugin itself would pass it, DEL succeeds
# (nothing was set up), and STATUS succeeds, so one old node does not stop all pods on it.
_MAIN = string.Template('''\
# metaproxy-cni, the chained CNI plugin (metaproxy.podnet.cni), as written by
# `metaproxy link-local install-cni`. Kept in syntax that Python 2.7 and 3.x all parse.
import json
import os
import sys

MINIMUM = $minimum
TOO_OLD = $too_old
CAPABILITY = $capability
ANNOTATION = $annotation
SELECTED = $selected
MAX_BYTES = $max_bytes


def too_old(version_info):
    return tuple(version_info[:2]) < MINIMUM


def selected(conf):
    """The plugin's own rule (metaproxy.podnet.cni.selected)."""
    if conf.get("pods") == "all":
        return True
    runtime = conf.get("runtimeConfig")
    annotations = runtime.get(CAPABILITY) if isinstance(runtime, dict) else None
    return isinstance(annotations, dict) and annotations.get(ANNOTATION) == SELECTED


def refuse():
    command = os.environ.get("CNI_COMMAND", "")
    conf = {}
    try:
        if not sys.stdin.isatty():
            conf = json.loads(sys.stdin.read(MAX_BYTES))
    except Exception:
        pass
    if not isinstance(conf, dict):
        conf = {}
    version = conf.get("cniVersion") or "1.1.0"
    chosen = selected(conf)
    if command in ("DEL", "STATUS", "GC") or (command in ("ADD", "CHECK") and not chosen):
        if command == "ADD":
            previous = conf.get("prevResult")
            if previous is None:
                previous = {"cniVersion": version, "interfaces": [], "ips": [], "dns": {}}
            sys.stdout.write(json.dumps(previous) + "\\n")
        sys.stderr.write("metaproxy-cni %s: untouched (Python %d.%d cannot run the plugin)\\n"
                         % (command, sys.version_info[0], sys.version_info[1]))
        return 0
    msg = "metaproxy-cni needs Python %d.%d or later; %s is Python %d.%d" % (
        MINIMUM[0], MINIMUM[1], sys.executable or "python3",
        sys.version_info[0], sys.version_info[1])
    details = ("install Python %d.%d or later on the node and run metaproxy link-local "
               "install-cni --python /path/to/it, or inject the init container instead "
               "(the webhook's --link-local=init-container)" % MINIMUM)
    error = {"cniVersion": version, "code": TOO_OLD, "msg": msg, "details": details}
    sys.stdout.write(json.dumps(error) + "\\n")
    sys.stderr.write("metaproxy-cni %s: error %d: %s: %s\\n" % (command, TOO_OLD, msg, details))
    return 1


if too_old(sys.version_info):
    sys.exit(refuse())

from metaproxy.podnet.cni import main  # noqa: E402

sys.exit(main())
''')


@dataclass(frozen=True, slots=True)
class Settings:
    """Where the plugin goes and how it is configured; built once from the flags (whose
    defaults are in metaproxy.podnet.cli)."""

    bin_dir: Path
    conf_dir: Path
    python: str
    node_metadata: bool = False
    imds_port: int = IMDS_PORT
    container_port: int = CONTAINER_PORT

    @property
    def binary(self) -> Path:
        return self.bin_dir / PLUGIN_TYPE

    def entry(self) -> dict[str, Any]:
        """Our element of `plugins`; the ports only when they are not the plugin's defaults."""
        entry: dict[str, Any] = {
            "type": PLUGIN_TYPE,
            "capabilities": {ANNOTATIONS_CAPABILITY: True},
            "nodeMetadata": self.node_metadata,
        }
        if self.imds_port != IMDS_PORT:
            entry["imdsPort"] = self.imds_port
        if self.container_port != CONTAINER_PORT:
            entry["containerPort"] = self.container_port
        return entry


class Unusable(Exception):
    """A configuration file this installer must not edit; `str()` says why in one line."""


# --- the plugin ---------------------------------------------------------------------------------


def shebang_problem(python: str) -> str | None:
    """Why `python` cannot go on a `#!` line, or None."""
    if not python.startswith("/"):
        return "must start with an absolute path (a runtime runs the plugin without a shell)"
    if any(c in python for c in "\n\r\0"):
        return "must be one line"
    if len(python.split()) > 2:
        return "may have one argument at most (Linux passes the rest as one word)"
    if len(b"#!" + python.encode()) > MAX_SHEBANG_BYTES:
        return f"makes a #! line longer than the kernel reads ({MAX_SHEBANG_BYTES} bytes)"
    return None


def main_source() -> str:
    return _MAIN.substitute(
        minimum=repr(MINIMUM_PYTHON),
        too_old=TOO_OLD,
        capability=json.dumps(ANNOTATIONS_CAPABILITY),
        annotation=json.dumps(LINK_LOCAL_ANNOTATION),
        selected=json.dumps(LINK_LOCAL_CNI),
        max_bytes=MAX_CONFIG_BYTES + 1,
    )


def _member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def _sources() -> Iterator[tuple[str, bytes]]:
    for module in PLUGIN_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            raise StartError(f"{module}: no source to put in the plugin")
        path = module.replace(".", "/")
        path += "/__init__.py" if spec.submodule_search_locations is not None else ".py"
        yield path, Path(spec.origin).read_bytes()


def _bytecode(path: str, source: bytes) -> bytes:
    """A checked hash-based .pyc (PEP 552) for this interpreter's version. zipimport takes it
    when the node's Python has the same magic number, and compiles the source otherwise: a
    runtime starts the plugin twice per pod, and compiling is a fifth of each start (13 of 67
    ms). No timestamp: zipimport would compare it with the member's DOS time in the node's
    local time zone. optimize=0 whatever flags the installer runs with: the plugin's asserts
    stay."""
    code = compile(source, path, "exec", dont_inherit=True, optimize=0)
    flags = 0b11  # hash-based, checked against the source beside it
    header = importlib.util.MAGIC_NUMBER + flags.to_bytes(4, "little")
    return header + importlib.util.source_hash(source) + marshal.dumps(code)


def plugin_archive(python: str) -> bytes:
    """The executable: `#!python`, then a zip of `__main__.py` and the plugin's modules.
    Stored, not deflated: an interpreter built without zlib can still import from it."""
    members = io.BytesIO()
    with zipfile.ZipFile(members, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(_member("__main__.py"), main_source())
        for path, source in _sources():
            archive.writestr(_member(path), source)
            archive.writestr(_member(path + "c"), _bytecode(path, source))
    members.seek(0)
    executable = io.BytesIO()
    zipapp.create_archive(members, executable, interpreter=python)
    return executable.getvalue()


# --- the network configuration ------------------------------------------------------------------


def primary_config(conf_dir: Path) -> Path | None:
    """The file the runtime uses: the first, by name, with a CNI configuration's suffix."""
    names = sorted(
        entry.name
        for entry in os.scandir(conf_dir)
        if entry.name.endswith(CONFIG_SUFFIXES) and entry.is_file()
    )
    return conf_dir / names[0] if names else None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        # Rewriting would silently drop all but the last: not ours to decide.
        seen = [key for key, _ in pairs]
        raise Unusable(f"duplicate key {next(k for k in seen if seen.count(k) > 1)!r}")
    return document


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Unusable(f"not JSON ({exc})") from None


def load_list(path: Path, raw: bytes) -> dict[str, Any]:
    """The file as a configuration list, converted from a single-plugin configuration if that is
    what it holds; `Unusable` if the runtime could not use it or the plugin could not join it."""
    document = _decode(raw)
    if not isinstance(document, dict):
        raise Unusable("not a JSON object")
    if path.suffix == ".conflist":
        plugins = document.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise Unusable("a .conflist without a plugins list")
    else:
        if not isinstance(document.get("type"), str):
            raise Unusable(f"a {path.suffix} without a plugin type")
        # As libcni's ConfListFromConf: the list takes the plugin's name and version, and the
        # plugin keeps all its fields.
        header = {k: document[k] for k in ("cniVersion", "name") if k in document}
        document = {**header, "plugins": [document]}
    version = document.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        # The runtime would hand our plugin this version, and every ADD on the node would fail.
        raise Unusable(
            f"cniVersion {version!r} is not one the plugin speaks ({', '.join(SUPPORTED_VERSIONS)})"
        )
    return document


def _ours(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def chained(document: dict[str, Any], entry: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The list with our entry (appended if absent, replaced if different) and what changed;
    "" when it already had it."""
    plugins: list[Any] = document["plugins"]
    mine = [i for i, plugin in enumerate(plugins) if _ours(plugin)]
    if not mine:
        return {**document, "plugins": [*plugins, entry]}, "appended the metaproxy entry"
    if plugins[mine[0]] == entry:
        return document, ""
    before = plugins[mine[0]]
    changed = sorted(k for k in {*before, *entry} if before.get(k) != entry.get(k))
    updated = [entry if i == mine[0] else plugin for i, plugin in enumerate(plugins)]
    return {**document, "plugins": updated}, "updated the metaproxy entry: " + ", ".join(changed)


def unchained(document: dict[str, Any]) -> dict[str, Any]:
    """The list without our entries."""
    return {**document, "plugins": [p for p in document["plugins"] if not _ours(p)]}


def encode(document: dict[str, Any]) -> bytes:
    # allow_nan=False: a number JSON cannot hold (1e999 parses as inf) fails instead of being
    # written as `Infinity`, which no runtime would parse.
    try:
        text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise Unusable(str(exc)) from None
    return text.encode() + b"\n"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- one pass, and the watch --------------------------------------------------------------------


@dataclass
class Installer:
    """Install, repair or remove. Logs each change, and each problem when it first appears."""

    settings: Settings
    _archive: bytes = field(default=b"", init=False, repr=False)
    _problem: str = field(default="", init=False)
    chained_in: Path | None = field(default=None, init=False)

    def once(self) -> bool:
        """One pass: the binary, then the entry. True when both are in place."""
        try:
            self._write_binary()
            problem = self._chain()
        except OSError as exc:
            problem = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
        if problem and problem != self._problem:
            log.warning("not installed: %s; retrying", problem)
        self._problem = problem
        return not problem

    def _write_binary(self) -> None:
        if not self._archive:
            self._archive = plugin_archive(self.settings.python)
        path = self.settings.binary
        try:
            current = path.read_bytes()
        except FileNotFoundError:
            current = None
        if current == self._archive:
            return
        write_atomically(path, self._archive, mode=0o755)
        digest = hashlib.sha256(self._archive).hexdigest()[:16]
        verb = "wrote" if current is None else "replaced"
        log.info(
            "%s: %s the plugin (%d bytes, sha256 %s…, #!%s)",
            path,
            verb,
            len(self._archive),
            digest,
            self.settings.python,
        )

    def _chain(self) -> str:
        """ "" once chained, else the problem."""
        conf_dir = self.settings.conf_dir
        path = primary_config(conf_dir)
        if path is None:
            return f"{conf_dir}: no CNI network configuration yet (*.conflist, *.conf, *.json)"
        raw = path.read_bytes()
        try:
            document, change = chained(load_list(path, raw), self.settings.entry())
            data = encode(document)
        except Unusable as exc:
            return f"{path}: {exc}; left untouched"
        target = path.with_suffix(".conflist")
        if change:
            if path.read_bytes() != raw:
                # Its agent is rewriting it right now: edit what it wrote, on the next pass.
                return f"{path}: changed while being read"
            unused = target != path and target.exists()
            note = f" (replacing the unused {target.name})" if unused else ""
            write_atomically(target, data, mode=_mode(path))
            if target != path:
                # The new list first, then the old file: in between the runtime still reads the
                # old one (it sorts first), never neither.
                path.unlink()
                change += f", converted from {path.name}{note}"
            log.info("%s: %s", target, change)
        self.chained_in = target
        return ""

    def uninstall(self) -> list[Path]:
        """Our entry out of every configuration in the conf dir, then the binary; the files
        changed."""
        changed = []
        for path in sorted(self.settings.conf_dir.iterdir()):
            if not (path.suffix == ".conflist" and path.is_file()):
                continue
            try:
                document = load_list(path, path.read_bytes())
                if not any(_ours(p) for p in document["plugins"]):
                    continue
                write_atomically(path, encode(unchained(document)), mode=_mode(path))
            except Unusable:
                continue  # not a list we could have written to
            log.info("%s: removed the metaproxy entry", path)
            changed.append(path)
        binary = self.settings.binary
        if binary.exists() or binary.is_symlink():
            binary.unlink()
            log.info("%s: removed the plugin", binary)
            changed.append(binary)
        return changed


def readiness(installer: Installer) -> bytes:
    """The ready file's content: where the plugin is."""
    state = {"binary": str(installer.settings.binary), "config": str(installer.chained_in)}
    return json.dumps(state).encode() + b"\n"


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def watch(
    installer: Installer, *, interval: float, ready_file: Path, uninstall_on_exit: bool
) -> int:
    """Pass after pass, every `interval` seconds, until SIGTERM or SIGINT; the ready file exists
    while the plugin is in place. On the way out the plugin stays (a pod created while the
    DaemonSet rolls would otherwise start without its redirect) unless `uninstall_on_exit`."""
    # Blocked, then taken with sigtimedwait: no handler can run halfway through a pass, and as
    # PID 1 of its container the process still gets SIGTERM (a blocked signal is never ignored).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        while True:
            ready = installer.once()
            _mark(ready_file, readiness(installer) if ready else None)
            received = signal.sigtimedwait(STOP_SIGNALS, interval)
            if received is not None:
                log.info("%s: stopping", signal.Signals(received.si_signo).name)
                break
    finally:
        _mark(ready_file, None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if uninstall_on_exit:
        installer.uninstall()
    return 0


def _mark(ready_file: Path, content: bytes | None) -> None:
    try:
        current = ready_file.read_bytes()
    except FileNotFoundError:
        current = None
    if content == current:
        return
    if content is None:
        ready_file.unlink()
        log.info("%s: removed (not ready)", ready_file)
    else:
        write_atomically(ready_file, content, mode=0o644)
        log.info("%s: ready", ready_file)
