"""What the image suite (this directory's test modules) needs before it runs.

The suite is `make image-test`'s alone (`pytest -m image`): building the images takes minutes
on a fresh machine, which `make test` has no room for. It needs root, network namespaces,
iptables, podman, runc and mmdebstrap, and for the pods kubectl with kustomize 5 (it renders
the overlay they play): without them it skips and says why, except in CI (CI=true), where
`make image-deps` has installed them (kubectl comes with the machine) and a skip would hide a
failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cluster.images import Images, build_all
from tests.cluster.podman import Podman, missing_tools
from tests.manifests import kustomize_problem
from tests.test_netns import netns_unavailable


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs everything not deselected; this suite is `make image-test`'s. Skipped
    at collection, so that no session fixture (the image build) runs for a skipped test."""
    if "image" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="the image and pod suite runs with `make image-test` (-m image)")
    for item in items:
        if item.get_closest_marker("image") is not None:
            item.add_marker(skip)


def unavailable(reason: str) -> None:
    """A skip outside CI (printed), a failure in CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"the image suite cannot run in CI: {reason}")
    print(f"skipping: {reason}")
    pytest.skip(reason)


def require_image_lab() -> None:
    """Root, namespaces and the container tools."""
    reason = netns_unavailable()
    missing = missing_tools()
    if reason is None and missing:
        reason = f"{', '.join(missing)} not installed (make image-deps)"
    if reason is not None:
        unavailable(reason)


@pytest.fixture(scope="session")
def podman() -> Podman:
    require_image_lab()
    return Podman.for_cache()


@pytest.fixture(scope="session")
def images(podman: Podman) -> Images:
    """The three images, built unless the cache has them (`make image` builds them first, so
    its output has the build times)."""
    built = build_all(podman)
    print(built.describe())
    return built


@pytest.fixture(scope="session")
def kustomize_ready() -> None:
    """kubectl able to render the overlays (kustomize 5, kubectl 1.27 or later)."""
    problem = kustomize_problem()
    if problem is not None:
        unavailable(problem)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pods' files: their volumes (emptyDirs, Secrets, tokens) and, once they are gone,
    their containers' logs. Under the session's temporary directory and kept, so the secret
    scan at the end reads the logs, the brokers' audit segments and Valkey's append-only file."""
    return tmp_path_factory.mktemp("pods")
