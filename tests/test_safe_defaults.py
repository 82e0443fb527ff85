"""Safe defaults, as `--help` states them: the broker refuses plain HTTP off loopback unless told
a TLS terminator is in front; the sidecar starts no container endpoint without a token an app
can read. Each test reads the help text, then checks the behaviour it describes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.config import BrokerConfig
from metaproxy.cli import build_parser
from metaproxy.clihelp import expanded_help, walk
from metaproxy.config import build_config
from metaproxy.errors import ConfigError
from tests.conftest import SidecarFactory
from tests.support import Pki, run_command


def help_of(command: str, flag: str) -> str:
    """The flag's help as `metaproxy COMMAND --help` prints it, on one line."""
    for parser in walk(build_parser()):
        if parser.prog == f"metaproxy {command}":
            for action in parser._actions:
                if flag in action.option_strings:
                    return " ".join(expanded_help(parser, action).split())
    raise AssertionError(f"metaproxy {command} has no {flag}")


def broker_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["broker", *argv])


async def test_the_broker_refuses_plain_http_off_loopback_as_its_help_says(tmp_path: Path) -> None:
    """`--listen` off loopback without TLS: exit 2, one line naming --behind-tls-terminator;
    with that flag, or TLS, or on loopback, the configuration stands."""
    assert "off loopback it needs --tls-cert and --tls-key, or --behind-tls-terminator" in (
        help_of("broker", "--listen")
    )
    assert "a TLS proxy in front of the broker" in help_of("broker", "--behind-tls-terminator")
    rc, out, err = await run_command(
        sys.executable,
        *("-m", "metaproxy", "broker", "--listen", "0.0.0.0:0", "--policies-dir", "policies"),
        env=dict(os.environ),
        timeout=30,
    )
    assert rc == 2, out + err
    assert err.strip().count("\n") == 0, err
    assert "--behind-tls-terminator" in err and "0.0.0.0:0 is off loopback" in err
    for argv in (["--listen", "10.0.0.5:8443"], ["--listen", "[::]:8443"]):
        with pytest.raises(ConfigError, match="--behind-tls-terminator"):
            build_config(BrokerConfig, broker_args(*argv), {})
    told = build_config(
        BrokerConfig,
        broker_args("--listen", "0.0.0.0:8443"),
        {"METAPROXY_BEHIND_TLS_TERMINATOR": "true"},
    )
    assert told.behind_tls_terminator
    assert build_config(BrokerConfig, broker_args("--listen", "[::1]:8443"), {}).listen


async def test_the_sidecar_starts_no_container_endpoint_without_a_token_source_as_its_help_says(
    start_sidecar: SidecarFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """No --authorization-token-file and no --container-credentials-path: IMDS is served, the
    container endpoint is not, and the log says which flags would start it."""
    unset = (
        "Unset, and no --container-credentials-path: the container-credentials API is not started"
    )
    assert unset in help_of("sidecar", "--authorization-token-file")
    assert "without one it is not started, and the sidecar logs why" in help_of(
        "sidecar", "--container-listen"
    )
    with caplog.at_level(logging.ERROR, logger="metaproxy"):
        sidecar = await start_sidecar("acme", "no-token-source", authorization_token_file=None)
    assert sidecar.container_urls == []
    assert "not serving container credentials on 127.0.0.1:0: no token the app can read" in (
        caplog.text
    )
    async with aiohttp.ClientSession() as session:
        ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
        async with session.put(sidecar.imds_url + "/latest/api/token", headers=ttl) as answer:
            token = await answer.text()
        roles = sidecar.imds_url + "/latest/meta-data/iam/security-credentials/"
        async with session.get(roles, headers={"X-aws-ec2-metadata-token": token}) as answer:
            assert answer.status == 200


async def test_a_secret_credentials_path_alone_is_a_token_source(
    start_sidecar: SidecarFactory, pki: Pki
) -> None:
    """--container-credentials-path without a token file: the container endpoint is served
    and answers at the secret path."""
    secret = "/v2/credentials/" + "k" * 32
    sidecar = await start_sidecar(
        "acme", "secret-path", authorization_token_file=None, container_credentials_path=secret
    )
    assert len(sidecar.container_urls) == 1
    async with (
        aiohttp.ClientSession() as session,
        session.get(sidecar.container_url + secret) as answer,
    ):
        assert answer.status == 200
        assert (await answer.json())["AccessKeyId"].startswith("ASIA")
