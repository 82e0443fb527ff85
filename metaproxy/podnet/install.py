"""`metaproxy link-local install-cni`: the CNI plugin on a node, chained into its network
configuration, as istio-cni's install-cni does it from a DaemonSet.

Two things go onto the node, through the DaemonSet's hostPath mounts: the plugin, as
`<bin dir>/metaproxy` (`plugin_archive.py`), and our entry at the end of `plugins` in the
node's primary network configuration (`conflist.py`).

The binary goes in before the entry and comes out after it: a runtime that sees the entry
without the binary fails every pod on the node. Files are replaced by rename, so the runtime
never reads half of one, and only when their content changes. A file that cannot be edited
safely is left alone, logged once, and retried on the next pass; the primary CNI's own agent
(the AWS VPC CNI, Calico) rewrites its file when it restarts, and the next pass chains it again
(the passes' loop is `install_watch.py`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaproxy.fsutil import write_atomically
from metaproxy.podnet import CONTAINER_PORT, IMDS_PORT
from metaproxy.podnet.cni import ANNOTATIONS_CAPABILITY
from metaproxy.podnet.conflist import (
    PLUGIN_TYPE,
    Unusable,
    chained,
    encode,
    file_mode,
    is_ours,
    load_list,
    primary_config,
    unchained,
)
from metaproxy.podnet.plugin_archive import plugin_archive

log = logging.getLogger("metaproxy.podnet.install")


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
            write_atomically(target, data, mode=file_mode(path))
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
                if not any(is_ours(p) for p in document["plugins"]):
                    continue
                write_atomically(path, encode(unchained(document)), mode=file_mode(path))
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
