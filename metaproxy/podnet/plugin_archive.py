"""The CNI plugin as one executable file: `#!python`, then a zip of the modules
`metaproxy.podnet.cni` imports (standard library only), run by the node's own `python3`.

Its `__main__` is written in syntax every Python parses, so that an interpreter too old for the
plugin answers with the spec's error object instead of a SyntaxError, and only for the pods that
need the plugin. The same sources give the same bytes (fixed member times, checked hash-based
bytecode), so an unchanged plugin is never rewritten on the node.
"""

from __future__ import annotations

import importlib.util
import io
import json
import marshal
import stat
import string
import zipapp
import zipfile
from collections.abc import Iterator
from pathlib import Path

from metaproxy.errors import StartError
from metaproxy.podnet import LINK_LOCAL_ANNOTATION, LINK_LOCAL_CNI
from metaproxy.podnet.cni import ANNOTATIONS_CAPABILITY, MAX_CONFIG_BYTES

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
