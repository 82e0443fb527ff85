"""Our entry in the node's CNI network configuration: finding the file the runtime uses,
reading it as a configuration list, and putting our entry in or taking it out.

The file is the lexicographically first `*.conflist`, `*.conf` or `*.json` of the conf dir,
the one containerd and CRI-O use. A single-plugin `.conf` becomes a `.conflist`, as libcni's
`ConfListFromConf` and istio-cni do. Everything else in the file stays as it was; a file that
cannot be edited safely (not JSON, duplicate keys, a cniVersion the plugin does not speak)
raises `Unusable` and is left alone.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from metaproxy.podnet.cni import SUPPORTED_VERSIONS

PLUGIN_TYPE = "metaproxy"  # the `type` a runtime looks up in its CNI bin dir
CONFIG_SUFFIXES = (".conf", ".conflist", ".json")  # what libcni's ConfFiles reads


class Unusable(Exception):
    """A configuration file this installer must not edit; `str()` says why in one line."""


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


def is_ours(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def chained(document: dict[str, Any], entry: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The list with our entry (appended if absent, replaced if different) and what changed;
    "" when it already had it."""
    plugins: list[Any] = document["plugins"]
    mine = [i for i, plugin in enumerate(plugins) if is_ours(plugin)]
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
    return {**document, "plugins": [p for p in document["plugins"] if not is_ours(p)]}


def encode(document: dict[str, Any]) -> bytes:
    # allow_nan=False: a number JSON cannot hold (1e999 parses as inf) fails instead of being
    # written as `Infinity`, which no runtime would parse.
    try:
        text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise Unusable(str(exc)) from None
    return text.encode() + b"\n"


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
