"""The CNI plugin as one executable file: `#!python`, then a zip of the modules
`metaproxy.podnet.cni` imports (standard library only), run by the node's own `python3`.

Its `__main__` (`plugin_main.py`) is written in syntax every Python parses. The same sources
give the same bytes (fixed member times, checked hash-based bytecode), so an unchanged plugin
is never rewritten on the node.
"""

from __future__ import annotations

import importlib.util
import io
import marshal
import stat
import zipapp
import zipfile
from collections.abc import Iterator
from pathlib import Path

from metaproxy.errors import StartError
from metaproxy.podnet.plugin_main import main_source

# Linux reads at most 127 bytes of a `#!` line before 5.1 (BINPRM_BUF_SIZE was 128).
MAX_SHEBANG_BYTES = 127
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
