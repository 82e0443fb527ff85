"""The podman command line, set up the way this kind of machine allows (found by trying):

- root, `runc` (crun refuses the hybrid cgroup layout), `cgroupfs` (there is no systemd);
- resource limits no higher than the current ones: the process lacks CAP_SYS_RESOURCE, and
  podman lowers its own RLIMIT_NPROC to 32768 before it starts conmon (its /proc/PID/limits
  says so), so a container asking for more fails with "error setting rlimit type 6";
- storage `overlay` where the kernel mounts it, `vfs` otherwise (slower: every container is a
  full copy of its image), in a directory of our own, so nothing of the machine's own podman
  storage is read or changed;
- the CNI network backend (podman 4 still has it): CNI is what a Kubernetes node runs, and it
  chains metaproxy's plugin (node.py).

The storage is a cache kept between runs (`METAPROXY_IMAGE_CACHE`, default
~/.cache/metaproxy-image): images are tagged by a digest of what went into them (images.py), so a
rerun with nothing changed builds nothing, and a fresh machine builds everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

PODMAN_NPROC_CEILING = 32768  # podman's own RLIMIT_NPROC once it has started (see above)
DEBIAN_CNI_PLUGINS = Path("/usr/lib/cni")
# What `make image-deps` installs; these tests need each of them.
TOOLS = ("podman", "runc", "mmdebstrap", "nsenter", "ip")


class PodmanError(RuntimeError):
    """A podman command failed; the message holds the command and the end of its stderr."""


def cache_root() -> Path:
    configured = os.environ.get("METAPROXY_IMAGE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metaproxy-image"


def ulimits() -> list[str]:
    """`--ulimit` flags at the current limits (podman's defaults are higher and would fail)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], PODMAN_NPROC_CEILING)
    return [f"nofile={nofile}:{nofile}", f"nproc={nproc}:{nproc}"]


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def containers_conf(path: Path, network_dir: Path, plugin_dirs: list[Path]) -> Path:
    """A containers.conf for our podman: the limits above for every container (the pods' infra
    containers included), CNI with our configuration and plugin directories."""
    quoted = ", ".join(json.dumps(str(d)) for d in plugin_dirs)
    limits = ", ".join(json.dumps(u) for u in ulimits())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[containers]\n"
        f"default_ulimits = [{limits}]\n"
        "[network]\n"
        'network_backend = "cni"\n'
        f"cni_plugin_dirs = [{quoted}]\n"
        f"network_config_dir = {json.dumps(str(network_dir))}\n"
        "[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'runtime = "runc"\n'
        'events_logger = "file"\n'
    )
    return path


@dataclass(frozen=True)
class Podman:
    """One podman: its storage, its configuration and (for pods) the node it runs them in."""

    root: Path
    driver: str
    conf: Path
    netns: Path | None = None  # the node's network namespace: CNI makes its bridges there

    @classmethod
    def for_cache(cls, cache: Path | None = None) -> Podman:
        """The cache's podman, with the best storage driver this kernel allows."""
        cache = cache or cache_root()
        conf = containers_conf(cache / "containers.conf", cache / "net.d", [DEBIAN_CNI_PLUGINS])
        for driver in ("overlay", "vfs"):
            candidate = cls(cache / f"storage-{driver}", driver, conf)
            if candidate.run("info", check=False).returncode == 0:
                return candidate
        raise PodmanError(f"podman works with neither overlay nor vfs storage in {cache}")

    def in_node(self, netns: Path, conf: Path) -> Podman:
        return replace(self, netns=netns, conf=conf)

    @property
    def runroot(self) -> Path:
        # State of running containers: not worth keeping across boots, so under /run; one per
        # storage directory, as podman requires.
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return Path("/run/metaproxy-image") / digest

    def argv(self, *args: str) -> list[str]:
        podman = [
            "podman",
            *("--root", str(self.root), "--runroot", str(self.runroot)),
            *("--storage-driver", self.driver),
            *args,
        ]
        # nsenter, not `ip netns exec`: that one also remounts /sys, hiding the cgroup tree.
        return podman if self.netns is None else ["nsenter", f"--net={self.netns}", *podman]

    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def run(
        self, *args: str, check: bool = True, timeout: float = 120, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.argv(*args),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input_text,
        )
        if check and done.returncode != 0:
            raise PodmanError(
                f"podman {' '.join(args[:6])}… exited {done.returncode}: {done.stderr[-2000:]}"
            )
        return done

    def out(self, *args: str, timeout: float = 120) -> str:
        return self.run(*args, timeout=timeout).stdout.strip()

    def inspect(self, kind: str, name: str) -> dict[str, Any]:
        found = json.loads(self.out(kind, "inspect", name))
        # A list for images and containers; podman 4.3's `pod inspect` gives the object itself.
        result: dict[str, Any] = found[0] if isinstance(found, list) else found
        return result

    def image_exists(self, reference: str) -> bool:
        return self.run("image", "exists", reference, check=False).returncode == 0

    def image_size(self, reference: str) -> int:
        """Bytes of the image's layers, uncompressed (what `podman images` shows)."""
        return int(self.inspect("image", reference)["Size"])
