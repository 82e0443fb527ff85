"""The image from the Dockerfile, built with podman and run as a user runs it: `podman run
--read-only --cap-drop=all IMAGE`, no user given, no command given. Marker `image`: `make
image-test` (tests/cluster/conftest.py says why and what it needs)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.cluster.images import Images
from tests.cluster.podman import Podman
from tests.podlab import process_status, root_mount_options

pytestmark = [pytest.mark.image, pytest.mark.timeout(1500)]

IMAGE_USER = "10001:10001"
SIZE_LIMIT = 400e6  # bytes; python:3.11-slim is about 130 MB of it
ADMIN = "http://127.0.0.1:9901"
# What the container is asked from inside (its network is its own: --network none).
ASK_ADMIN = f"""
import json, urllib.request, urllib.error
answers = {{}}
for path in ("/healthz", "/readyz", "/metrics"):
    try:
        with urllib.request.urlopen("{ADMIN}" + path, timeout=2) as answer:
            answers[path] = [answer.status, answer.read().decode()[:300]]
    except urllib.error.HTTPError as error:
        answers[path] = [error.code, error.read().decode()[:300]]
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def default_command(podman: Podman, images: Images) -> Iterator[str]:
    """The image with its default command, as `podman run -d --read-only --cap-drop=all`."""
    name = f"mpx-default-{time.monotonic_ns()}"
    podman.run(
        *("run", "--detach", f"--name={name}", "--network=none", "--read-only"),
        *("--read-only-tmpfs=false", "--cap-drop=all", images.metaproxy.tag),
    )
    yield name
    podman.run("rm", "--force", "--time=2", name, check=False)


def admin_answers(podman: Podman, container: str) -> dict[str, list[object]]:
    deadline = time.monotonic() + 30
    while True:
        done = podman.run("exec", container, "python", "-c", ASK_ADMIN, check=False)
        if done.returncode == 0:
            answers: dict[str, list[object]] = json.loads(done.stdout)
            return answers
        if time.monotonic() > deadline:
            raise AssertionError(f"admin port never answered: {done.stderr[-500:]}")
        time.sleep(0.5)


def test_the_image_is_built_from_the_dockerfile_and_its_size_is_reported(
    images: Images,
) -> None:
    """The image builds (on Debian's python3.11 where no registry answers) and stays small."""
    print(images.describe())
    assert images.metaproxy.size < SIZE_LIMIT, images.describe()


def test_the_image_runs_as_uid_10001_by_itself(podman: Podman, images: Images) -> None:
    """USER is numeric 10001:10001, so Kubernetes' runAsNonRoot can verify it from the image."""
    config = podman.inspect("image", images.metaproxy.tag)["Config"]
    assert config["User"] == IMAGE_USER
    assert config["Entrypoint"] == ["metaproxy"]


def test_the_default_command_answers_on_its_admin_port_and_says_what_it_needs(
    podman: Podman, default_command: str
) -> None:
    """With nothing given, the sidecar serves /healthz, /readyz and /metrics on 9901, and the
    two health answers name the missing identity token."""
    answers = admin_answers(podman, default_command)
    assert answers["/metrics"][0] == 200
    for path in ("/healthz", "/readyz"):
        status, text = answers[path]
        assert status == 503
        assert "identity token file unusable: /var/run/metaproxy/identity.jwt" in str(text)


def test_the_default_command_runs_unprivileged_on_a_read_only_root(
    podman: Podman, default_command: str
) -> None:
    """Its process is uid and gid 10001 with no capability, and its root is mounted read-only."""
    pid = int(podman.inspect("container", default_command)["State"]["Pid"])
    status = process_status(pid)
    assert status["Uid"].split() == ["10001"] * 4
    assert status["Gid"].split() == ["10001"] * 4
    assert int(status["CapEff"], 16) == 0
    assert int(status["CapPrm"], 16) == 0
    assert "ro" in root_mount_options(pid)
    written = podman.run("exec", default_command, "touch", "/probe", check=False)
    assert written.returncode != 0
    assert "Read-only file system" in written.stderr


def test_every_metaproxy_module_imports_with_the_images_python(
    podman: Podman, images: Images
) -> None:
    """The venv's wheels match the base's Python: every module of the package imports (the
    broker's boto3 and the compiled httptools, uvloop, hiredis and cryptography included)."""
    # `__main__` modules run their command when imported: they are the entry points, not
    # libraries.
    code = (
        "import pkgutil, importlib, metaproxy, sys;"
        "names = [m.name for m in pkgutil.walk_packages(metaproxy.__path__, 'metaproxy.')"
        " if not m.name.endswith('__main__')];"
        "[importlib.import_module(n) for n in names];"
        "print(sys.version_info[:2], len(names))"
    )
    done = podman.run(
        *("run", "--rm", "--network=none", "--read-only", "--cap-drop=all"),
        *("--entrypoint=python", images.metaproxy.tag, "-c", code),
    )
    assert done.stdout.startswith("(3, 11)"), done.stdout + done.stderr
