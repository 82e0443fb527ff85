"""`metaproxy-cni`: a chained CNI plugin that gives selected pods the metadata addresses.

The container runtime runs it after the pod's interface plugin (bridge, Calico, Cilium, …), by
its `type` name from CNI_PATH, with the parameters in CNI_* variables and the plugin's network
configuration on stdin (CNI spec 1.1, containernetworking/cni SPEC.md). For a selected pod, ADD
puts the task addresses on the pod's `lo` and redirects their port 80 to the sidecar's loopback
ports (`addresses.prepare`), DEL removes both, CHECK reports what is missing. Every other pod
passes through untouched: its `prevResult` is the answer.

Which pods: those annotated `metaproxy.io/link-local: cni` (the webhook does that for the pods it
injects a sidecar into). The runtime hands the annotations over in
`runtimeConfig["io.kubernetes.cri.pod-annotations"]` when the plugin's configuration declares
that capability (containerd and CRI-O both do). `"pods": "all"` selects every pod.

The plugin keeps no state, so STATUS and GC have nothing to do. Every failure is the spec's error
object on stdout with a non-zero exit, and one line on stderr (which runtimes keep); never a
traceback. The CNI_* variables are the protocol's parameters, not configuration: they are read
here, not in metaproxy.config.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from metaproxy.podnet import (
    CONTAINER_PORT,
    IMDS_PORT,
    LINK_LOCAL_ANNOTATION,
    LINK_LOCAL_CNI,
    MAX_PORT,
)

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION = SUPPORTED_VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
# Kubernetes caps a pod's annotations at 256 KiB; prevResult is small. Anything far larger is not
# a network configuration.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# The spec's well-known error codes, and ours (100 and above).
INCOMPATIBLE_VERSION = 1
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
SETUP_FAILED = 100
CHECK_FAILED = 101
NAMESPACE_UNUSABLE = 102
INTERNAL_ERROR = 199
# The spec's grammar for container ids and network names; its rules for interface names.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_IFNAME_MAX = 15
_ARG_KEY = re.compile(r"[A-Za-z0-9_\-]+")


class CniError(Exception):
    """An answer for the runtime: the spec's error object (`code`, `msg`, `details`)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def _fail(code: int, msg: str, details: str = "") -> NoReturn:
    raise CniError(code, msg, details)


@dataclass(frozen=True, slots=True)
class Request:
    """The runtime's parameters (CNI_*), validated."""

    command: str
    container_id: str = ""
    netns: Path | None = None
    ifname: str = ""
    pod: str = ""  # namespace/name from CNI_ARGS (K8S_POD_*), for the log only

    def label(self) -> str:
        parts = [self.command, self.container_id[:12]]
        if self.pod:
            parts.append(f"pod={self.pod}")
        if self.netns is not None:
            parts.append(f"netns={self.netns}")
        return " ".join(p for p in parts if p)


@dataclass(frozen=True, slots=True)
class NetConf:
    """The plugin's configuration from stdin, validated."""

    cni_version: str
    name: str
    pods: Literal["annotated", "all"] = "annotated"
    node_metadata: bool = False
    imds_port: int = IMDS_PORT
    container_port: int = CONTAINER_PORT
    prev_result: dict[str, Any] | None = None
    annotations: dict[str, str] | None = None  # None: the runtime passed none


def version_key(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def parse_request(environ: Mapping[str, str]) -> Request:
    command = environ.get("CNI_COMMAND", "")
    if not command:
        _fail(INVALID_ENVIRONMENT, "CNI_COMMAND is not set (the container runtime runs this)")
    if command not in COMMANDS:
        _fail(INVALID_ENVIRONMENT, f"unknown CNI_COMMAND {command[:20]!r}", ", ".join(COMMANDS))
    if command not in ("ADD", "DEL", "CHECK"):
        return Request(command)
    container_id = environ.get("CNI_CONTAINERID", "")
    if not _ID.fullmatch(container_id):
        _fail(INVALID_ENVIRONMENT, "CNI_CONTAINERID is missing or not a valid container id")
    ifname = environ.get("CNI_IFNAME", "")
    bad_ifname = ifname in ("", ".", "..") or len(ifname) > _IFNAME_MAX
    if bad_ifname or any(c in "/:" or c.isspace() for c in ifname):
        _fail(INVALID_ENVIRONMENT, "CNI_IFNAME is missing or not a valid interface name")
    netns = environ.get("CNI_NETNS", "")
    if not netns and command != "DEL":
        _fail(INVALID_ENVIRONMENT, f"CNI_NETNS is required for {command}")
    if netns and (not netns.startswith("/") or "\0" in netns):
        _fail(INVALID_ENVIRONMENT, "CNI_NETNS must be an absolute path")
    args = _cni_args(environ.get("CNI_ARGS", ""))
    pod = "/".join(args[k] for k in ("K8S_POD_NAMESPACE", "K8S_POD_NAME") if args.get(k))
    return Request(command, container_id, Path(netns) if netns else None, ifname, pod)


def _cni_args(text: str) -> dict[str, str]:
    """`FOO=BAR;ABC=123` → {"FOO": "BAR", "ABC": "123"}."""
    args = {}
    for pair in filter(None, text.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not _ARG_KEY.fullmatch(key):
            _fail(INVALID_ENVIRONMENT, "CNI_ARGS must be KEY=VALUE pairs separated by ;")
        args[key] = value
    return args


def _decode(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_CONFIG_BYTES:
        _fail(DECODING_FAILURE, f"network configuration larger than {MAX_CONFIG_BYTES} bytes")
    try:
        conf = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        _fail(DECODING_FAILURE, "network configuration on stdin is not JSON", str(exc))
    if not isinstance(conf, dict):
        _fail(DECODING_FAILURE, "network configuration on stdin is not a JSON object")
    return conf


_JSON_NAMES: dict[type, str] = {str: "string", bool: "boolean", dict: "object", int: "integer"}


def _field(conf: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    """`conf[key]` if it has JSON type `kind`; `default` when absent or null."""
    value = conf.get(key)
    if value is None:
        return default
    # JSON's true is a Python int too: not a port.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _fail(INVALID_CONFIG, f"{key} must be a JSON {_JSON_NAMES[kind]}")
    return value


def _port(conf: Mapping[str, Any], key: str, default: int) -> int:
    port: int = _field(conf, key, int, default)
    if not 1 <= port <= MAX_PORT:
        _fail(INVALID_CONFIG, f"{key} must be a TCP port, 1 to {MAX_PORT}, not {port}")
    return port


def parse_config(raw: bytes) -> NetConf:
    conf = _decode(raw)
    version = conf.get("cniVersion")
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        _fail(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} is not supported",
            "supported: " + ", ".join(SUPPORTED_VERSIONS),
        )
    name = _field(conf, "name", str, "")
    if not _ID.fullmatch(name):
        _fail(INVALID_CONFIG, "name must be a network name (letters, digits, _ . -)")
    pods = _field(conf, "pods", str, "annotated")
    if pods not in ("annotated", "all"):
        _fail(INVALID_CONFIG, f"pods must be annotated or all, not {pods[:40]!r}")
    runtime = _field(conf, "runtimeConfig", dict, {})
    annotations = _field(runtime, ANNOTATIONS_CAPABILITY, dict, None)
    if annotations is not None and not all(isinstance(v, str) for v in annotations.values()):
        _fail(INVALID_CONFIG, f"runtimeConfig.{ANNOTATIONS_CAPABILITY} values must be strings")
    return NetConf(
        cni_version=version,
        name=name,
        pods=pods,
        node_metadata=_field(conf, "nodeMetadata", bool, False),
        imds_port=_port(conf, "imdsPort", IMDS_PORT),
        container_port=_port(conf, "containerPort", CONTAINER_PORT),
        prev_result=_field(conf, "prevResult", dict, None),
        annotations=annotations,
    )


def selected(conf: NetConf) -> tuple[bool, str]:
    """Whether the plugin acts on this pod, and why (for the log)."""
    if conf.pods == "all":
        return True, "pods: all"
    if conf.annotations is None:
        return False, f"no pod annotations: declare the {ANNOTATIONS_CAPABILITY} capability"
    if conf.annotations.get(LINK_LOCAL_ANNOTATION) == LINK_LOCAL_CNI:
        return True, f"{LINK_LOCAL_ANNOTATION}={LINK_LOCAL_CNI}"
    return False, f"not annotated {LINK_LOCAL_ANNOTATION}={LINK_LOCAL_CNI}"


def handle(request: Request, conf: NetConf) -> tuple[str, str]:
    """Carry out ADD, DEL or CHECK: (stdout, the log line)."""
    from metaproxy.podnet import addresses
    from metaproxy.podnet.namespace import NamespaceGone

    chosen, why = selected(conf)
    previous = conf.prev_result if conf.prev_result is not None else _empty(conf)
    result = json.dumps(previous) if request.command == "ADD" else ""
    if not chosen:
        return result, f"untouched ({why})"
    uplink = request.ifname if conf.node_metadata else None
    ports = {"imds_port": conf.imds_port, "container_port": conf.container_port}
    try:
        if request.command == "ADD":
            assert request.netns is not None  # parse_request requires it
            return result, addresses.prepare(request.netns, uplink=uplink, **ports).summary()
        if request.command == "DEL":
            released = addresses.release(request.netns) if request.netns else addresses.Released()
            return result, released.summary()
        problems = addresses.check(request.netns, uplink=uplink, **ports)
    except NamespaceGone as exc:
        _fail(NAMESPACE_UNUSABLE, "the pod's network namespace is gone", str(exc))
    except OSError as exc:
        _fail(SETUP_FAILED, f"{request.command} failed", str(exc))
    if problems:
        _fail(CHECK_FAILED, "link-local addresses or redirect not in place", "; ".join(problems))
    return result, "in place"


def _empty(conf: NetConf) -> dict[str, Any]:
    """The result when this plugin is first in its chain (nothing before it made one)."""
    return {"cniVersion": conf.cni_version, "interfaces": [], "ips": [], "dns": {}}


def _version_answer(raw: bytes) -> str:
    """VERSION: the input's cniVersion (as the spec says) when it names one, else ours."""
    try:
        asked = json.loads(raw).get("cniVersion") if raw.strip() else None
    except (ValueError, AttributeError):
        asked = None
    ok = isinstance(asked, str) and re.fullmatch(r"\d+\.\d+\.\d+", asked)
    version = asked if ok else CURRENT_VERSION
    return json.dumps({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})


def run(environ: Mapping[str, str], stdin: bytes) -> tuple[int, str, str]:
    """One invocation: (exit status, stdout, the stderr line)."""
    version = CURRENT_VERSION
    request = Request(environ.get("CNI_COMMAND", "")[:20] or "?")
    try:
        request = parse_request(environ)
        if request.command == "VERSION":
            return 0, _version_answer(stdin), ""
        conf = parse_config(stdin)
        version = conf.cni_version
        needs = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}.get(request.command)
        if needs and version_key(version) < version_key(needs):
            _fail(INCOMPATIBLE_VERSION, f"{request.command} needs cniVersion {needs} or later")
        if request.command in ("STATUS", "GC"):
            return 0, "", ""  # no daemon to be ready, no state to collect
        out, done = handle(request, conf)
        return 0, out, f"{request.label()}: {done}"
    except CniError as exc:
        error = {"cniVersion": version, "code": exc.code, "msg": exc.msg, "details": exc.details}
        line = f"{request.label()}: error {exc.code}: {exc.msg}"
        return 1, json.dumps(error), line + (f": {exc.details}" if exc.details else "")


def main() -> int:
    """The console script: what the runtime executes (no arguments)."""
    import os

    try:
        command = os.environ.get("CNI_COMMAND", "")
        skip_stdin = command == "VERSION" and sys.stdin.isatty()
        stdin = b"" if skip_stdin else sys.stdin.buffer.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        status, out, line = _error(IO_FAILURE, "cannot read the network configuration", exc)
    else:
        try:
            status, out, line = run(os.environ, stdin)
        except Exception as exc:  # the runtime gets an error object, never a traceback
            status, out, line = _error(INTERNAL_ERROR, "internal error", exc)
    if out:
        print(out)
    if line:
        print(f"metaproxy-cni {line}", file=sys.stderr)
    return status


def _error(code: int, msg: str, exc: BaseException) -> tuple[int, str, str]:
    details = f"{type(exc).__name__}: {exc}"
    error = {"cniVersion": CURRENT_VERSION, "code": code, "msg": msg, "details": details}
    return 1, json.dumps(error), f"error {code}: {msg}: {details}"


if __name__ == "__main__":
    raise SystemExit(main())
