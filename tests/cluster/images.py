"""The images the pods run, built here with podman and tagged by what went into them.

- **The base.** The Dockerfile's `ARG BASE` (python:3.11-slim). Where no registry answers (this
  machine's case: Docker Hub does not resolve), the same from Debian's packages: `mmdebstrap`
  of bookworm with python3.11, its venv module, `python` and the CA certificates, imported as
  `localhost/metaproxy-base:3.11-bookworm-<digest>`. `METAPROXY_IMAGE_BASE` names another.
- **metaproxy**, from the Dockerfile as it is: `localhost/metaproxy:<digest>`.
- **The workloads' image**, from tests/cluster/workloads.Containerfile on the same base: the AWS
  CLI, boto3 and Redis, all from Debian (the pod test's app and its Valkey stand-in).

A digest covers the Dockerfile, the files its COPY lines name and the base image's id, so an
image is built again exactly when one of them changed; a rerun with nothing changed builds
nothing. Older tags of the same name are removed when a new one is built.

Builds use the host's network, and mount two of the host's files read-only into each RUN step
(never into a layer), where they exist: /etc/pip.conf and the CA bundle. A machine whose egress
re-signs TLS (this one) needs both for pip to reach PyPI; elsewhere they are the host's own
trust and index settings.

`python -m tests.cluster.images` (what `make image` runs) builds all three and prints their tags,
sizes and build times.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.podman import Podman, PodmanError, ulimits

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
WORKLOADS_FILE = Path(__file__).with_name("workloads.Containerfile")
DEFAULT_BASE = "docker.io/library/python:3.11-slim"  # the Dockerfile's ARG BASE, fully named
PULL_TIMEOUT = 120
BUILD_TIMEOUT = 1200
DEBIAN_SUITE = "bookworm"  # the Debian release whose python3 is 3.11
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_PACKAGES = ("python3.11", "python3.11-venv", "python-is-python3", "ca-certificates")
MMDEBSTRAP_OPTIONS = (
    "--variant=minbase",
    # Merged /usr without the `usrmerge` package, which would pull in all of Perl.
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    '--aptopt=APT::Install-Recommends "false"',
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
)
# What python:3.11-slim sets that a bare root filesystem lacks.
BASE_CHANGES = ("ENV LANG=C.UTF-8", 'CMD ["python3"]')
HOST_BUILD_FILES = (Path("/etc/pip.conf"), Path("/etc/ssl/certs/ca-certificates.crt"))
_COPY = re.compile(r"^COPY\s+(?!--from)(.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Built:
    tag: str
    seconds: float  # 0 when the cache had it
    size: int  # bytes, uncompressed

    def describe(self) -> str:
        how = f"built in {self.seconds:.0f} s" if self.seconds else "cached"
        return f"{self.tag}: {self.size / 1e6:.0f} MB, {how}"


def _digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(hashlib.sha256(part).digest())
    return hasher.hexdigest()[:16]


def copied_sources(dockerfile: Path) -> list[Path]:
    """The context paths the Dockerfile's COPY lines name (not those copied between stages)."""
    sources: list[Path] = []
    for line in _COPY.findall(dockerfile.read_text()):
        *names, _destination = line.split()
        sources += [dockerfile.parent / name for name in names]
    return sources


def tree_bytes(paths: list[Path]) -> bytes:
    """Each file's path and content, in order; bytecode caches left out, as .dockerignore does."""
    files: list[Path] = []
    for path in paths:
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    parts = [
        str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes()
        for f in files
        if "__pycache__" not in f.parts and f.suffix != ".pyc"
    ]
    return b"\0".join(parts)


def _build_mounts() -> list[str]:
    return [f"--volume={p}:{p}:ro" for p in HOST_BUILD_FILES if p.exists()]


def _log_file(podman: Podman, name: str) -> Path:
    directory = podman.root.parent / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{name}.log"


def _run_logged(argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    with log.open("w") as out:
        done = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=BUILD_TIMEOUT, check=False
        )
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise PodmanError(f"{argv[0]} exited {done.returncode} (log: {log}):\n{tail}")


def _prune_older(podman: Podman, repository: str, keep: str) -> None:
    """Untag the repository's other tags, then remove every image no tag names: those and the
    builder stages, so the cache holds one build of each image, not one per change."""
    listed = json.loads(podman.out("images", "--format=json", f"--filter=reference={repository}"))
    for image in listed:
        for name in image.get("Names") or []:
            if name != keep:
                podman.run("untag", image["Id"], name, check=False)
    podman.run("image", "prune", "--force", check=False, timeout=300)


def debian_base(podman: Podman) -> Built:
    """python3.11 from Debian as a base image, made with mmdebstrap and imported."""
    key = _digest(DEBIAN_SUITE.encode(), " ".join(DEBIAN_PACKAGES + MMDEBSTRAP_OPTIONS).encode())
    tag = f"localhost/metaproxy-base:3.11-{DEBIAN_SUITE}-{key}"
    if podman.image_exists(tag):
        return Built(tag, 0.0, podman.image_size(tag))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mpx-base-") as work:
        tarball = Path(work) / "rootfs.tar"
        _run_logged(
            [
                "mmdebstrap",
                *MMDEBSTRAP_OPTIONS,
                f"--include={','.join(DEBIAN_PACKAGES)}",
                DEBIAN_SUITE,
                str(tarball),
                DEBIAN_MIRROR,
            ],
            _log_file(podman, "mmdebstrap"),
        )
        changes = [f"--change={change}" for change in BASE_CHANGES]
        podman.run("import", *changes, str(tarball), tag, timeout=600)
    _prune_older(podman, "localhost/metaproxy-base", tag)
    return Built(tag, time.monotonic() - started, podman.image_size(tag))


def base_image(podman: Podman) -> Built:
    """The Dockerfile's default base when it can be had, Debian's equivalent otherwise."""
    named = os.environ.get("METAPROXY_IMAGE_BASE")
    if named:
        return Built(named, 0.0, podman.image_size(named))
    if podman.image_exists(DEFAULT_BASE):
        return Built(DEFAULT_BASE, 0.0, podman.image_size(DEFAULT_BASE))
    pulled = podman.run("pull", "--quiet", DEFAULT_BASE, check=False, timeout=PULL_TIMEOUT)
    if pulled.returncode == 0:
        return Built(DEFAULT_BASE, 0.0, podman.image_size(DEFAULT_BASE))
    print(f"{DEFAULT_BASE} cannot be pulled ({pulled.stderr.strip()[-160:]}): Debian's instead")
    return debian_base(podman)


def build(
    podman: Podman, repository: str, containerfile: Path, context: Path, base: Built
) -> Built:
    """`podman build` of `containerfile` on `base`, unless the digest's tag exists already."""
    base_id = podman.inspect("image", base.tag)["Id"]
    sources = copied_sources(containerfile)
    ignore = context / ".dockerignore"
    key = _digest(
        containerfile.read_bytes(),
        ignore.read_bytes() if ignore.exists() else b"",
        tree_bytes(sources),
        base_id.encode(),
    )
    tag = f"{repository}:{key}"
    if podman.image_exists(tag):
        return Built(tag, 0.0, podman.image_size(tag))
    started = time.monotonic()
    argv = podman.argv(
        "build",
        "--network=host",
        "--pull=never",
        *(f"--ulimit={u}" for u in ulimits()),
        *_build_mounts(),
        f"--build-arg=BASE={base.tag}",
        f"--file={containerfile}",
        f"--tag={tag}",
        str(context),
    )
    _run_logged(argv, _log_file(podman, repository.rsplit("/", 1)[-1]), env=podman.env())
    _prune_older(podman, repository, tag)
    return Built(tag, time.monotonic() - started, podman.image_size(tag))


@dataclass(frozen=True)
class Images:
    base: Built
    metaproxy: Built
    workloads: Built

    def describe(self) -> str:
        return "\n".join(
            f"{what}: {built.describe()}"
            for what, built in (
                ("base", self.base),
                ("metaproxy", self.metaproxy),
                ("workloads", self.workloads),
            )
        )


def build_all(podman: Podman) -> Images:
    base = base_image(podman)
    metaproxy = build(podman, "localhost/metaproxy", DOCKERFILE, REPO, base)
    workloads = build(
        podman, "localhost/metaproxy-workloads", WORKLOADS_FILE, WORKLOADS_FILE.parent, base
    )
    return Images(base, metaproxy, workloads)


def main() -> int:
    podman = Podman.for_cache()
    print(f"podman storage: {podman.root} ({podman.driver})")
    try:
        images = build_all(podman)
    except PodmanError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(images.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
