"""The sidecar sends its identity token to the broker: never in the clear off this host."""

from __future__ import annotations

import subprocess
import sys

import pytest

from metaproxy.config import build_config
from metaproxy.errors import ConfigError
from metaproxy.sidecar.config import SidecarConfig


@pytest.mark.parametrize(
    "url",
    [
        "https://broker.example:8443",
        "http://127.0.0.1:8443",
        "http://[::1]:8443",
        "http://localhost",
    ],
)
def test_https_or_loopback_http_is_accepted(url: str) -> None:
    """https anywhere, plain http only to a loopback address."""
    config = build_config(SidecarConfig, environ={"METAPROXY_BROKER_URL": url})
    assert config.broker_url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5:8443",
        "http://broker.example",
        "ftp://127.0.0.1",
        "ws://127.0.0.1",
        "https://",
    ],
)
def test_other_schemes_and_remote_http_are_refused(url: str) -> None:
    """Plain http to another host, other schemes and a URL without a host are refused."""
    with pytest.raises(ConfigError, match="--broker-url"):
        build_config(SidecarConfig, environ={"METAPROXY_BROKER_URL": url})


def test_a_unix_socket_needs_no_url_check() -> None:
    """With --broker-socket the URL is unused, so it is not checked."""
    environ = {"METAPROXY_BROKER_URL": "http://10.0.0.5", "METAPROXY_BROKER_SOCKET": "/run/b.sock"}
    assert build_config(SidecarConfig, environ=environ).broker_socket is not None


def test_the_command_refuses_in_one_line() -> None:
    """`metaproxy sidecar --broker-url http://10.0.0.5` exits 2 with one line naming the flag."""
    result = subprocess.run(
        [sys.executable, "-m", "metaproxy", "sidecar", "--broker-url", "http://10.0.0.5:8443"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--broker-url" in lines[0]
    assert "Traceback" not in result.stderr
