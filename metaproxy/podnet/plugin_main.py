"""The CNI plugin's `__main__`: a guard that runs before we know the node's Python can run the
plugin, kept in syntax that Python 2.7 and every 3.x parse.

An interpreter too old for the plugin answers with the CNI spec's error object instead of a
SyntaxError, and only for the pods that need the plugin (their ADD and CHECK); every other pod
passes through as the plugin itself would pass it, DEL succeeds (nothing was set up), and
STATUS succeeds, so one old node does not stop all pods on it.
"""

from __future__ import annotations

import json
import string

from metaproxy.podnet import LINK_LOCAL_ANNOTATION, LINK_LOCAL_CNI
from metaproxy.podnet.cni import ANNOTATIONS_CAPABILITY, MAX_CONFIG_BYTES

MINIMUM_PYTHON = (3, 11)  # metaproxy's requires-python; the plugin uses typing.Self
TOO_OLD = 103  # the plugin's error code for "this interpreter cannot run the plugin"

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


def main_source() -> str:
    return _MAIN.substitute(
        minimum=repr(MINIMUM_PYTHON),
        too_old=TOO_OLD,
        capability=json.dumps(ANNOTATIONS_CAPABILITY),
        annotation=json.dumps(LINK_LOCAL_ANNOTATION),
        selected=json.dumps(LINK_LOCAL_CNI),
        max_bytes=MAX_CONFIG_BYTES + 1,
    )
