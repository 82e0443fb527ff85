"""Every setting explains itself from one source: the config dataclasses' field documentation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from metaproxy.broker.config import BrokerConfig
from metaproxy.cli import build_parser
from metaproxy.commands.configdoc import config_classes, render
from metaproxy.config import build_config, field_docs
from metaproxy.errors import ConfigError
from metaproxy.sidecar.config import SidecarConfig
from tests.support import REPO

CONFIG_CLASSES = config_classes()
COMMANDS = sorted(CONFIG_CLASSES)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_documented(command: str) -> None:
    """Each field has a meaning; fields with a number of something name its unit."""
    for d in field_docs(CONFIG_CLASSES[command]):
        assert d.help, d.name
        if d.metavar in ("N", "SECONDS", "NUMBER"):
            assert d.unit, f"{command} {d.flag} is a number without a unit"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_meaning_unit_default_and_allowed_values(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`metaproxy COMMAND --help` carries every field's meaning, unit, default and choices."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    # argparse wraps lines at spaces and after hyphens
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    for d in field_docs(CONFIG_CLASSES[command]):
        assert d.flag in text
        assert " ".join(d.help.split()) in text, d.flag
        assert f"Default: {d.default}." in text, d.flag
        assert f"Env: {d.env}." in text, d.flag
        if d.unit:
            assert f"Unit: {d.unit}." in text, d.flag
        if d.allowed:
            assert f"Allowed: {' '.join(d.allowed.split())}." in text, d.flag


def test_help_examples() -> None:
    """Spot checks that the rendered text reads as a person would want it."""
    sidecar = {d.name: d for d in field_docs(SidecarConfig)}
    assert sidecar["drain_seconds"].unit == "seconds"
    assert sidecar["drain_seconds"].default == "10.0"
    assert sidecar["imds_v1"].allowed == "allow, refuse"
    broker = {d.name: d for d in field_docs(BrokerConfig)}
    assert broker["max_body_bytes"].unit == "bytes"
    assert broker["trusted_issuers"].flag == "--trust"


def test_configuration_page_is_up_to_date() -> None:
    """docs/configuration.md is what `python -m metaproxy.commands.configdoc` writes today."""
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == render(), (
        "docs/configuration.md is out of date: "
        "run `.venv/bin/python -m metaproxy.commands.configdoc > docs/configuration.md`"
    )


def test_an_undocumented_field_is_refused() -> None:
    """A field added without doc(...) fails loudly instead of showing an empty --help."""

    @dataclasses.dataclass(frozen=True)
    class Bare:
        thing: int = 1

    with pytest.raises(TypeError, match=r"Bare\.thing has no doc"):
        field_docs(Bare)


def test_flag_beats_environment_beats_default() -> None:
    """One name three ways, with the documented precedence."""
    parser = build_parser()
    env = {"METAPROXY_DRAIN_SECONDS": "3", "METAPROXY_HEADER_TIMEOUT": "2"}
    args = parser.parse_args(["sidecar", "--drain-seconds", "4"])
    config = build_config(SidecarConfig, args, env)
    assert (config.drain_seconds, config.header_timeout, config.broker_timeout) == (4.0, 2.0, 5.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["broker", "--drain-seconds", "soon"], "--drain-seconds: 'soon' is not a number"),
        (["broker", "--workers-max", "1.5"], "--workers-max: '1.5' is not a whole number"),
        (["broker", "--log-format", "xml"], "--log-format: 'xml' is not one of auto, json, text"),
        (["broker", "--listen", "localhost"], "--listen: 'localhost' must be HOST:PORT"),
        (["broker", "--socket", "/tmp/b.sock", "--listen", "127.0.0.1:1"], "--socket and --listen"),
        (["broker", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["sidecar", "--refresh-fraction", "0.95"], "--refresh-fraction: must be between"),
        (["sidecar", "--imds-listen", "a:b"], "--imds-listen: 'a:b' must be HOST:PORT"),
        (["broker", "--sts-timeout", "-1"], "--sts-timeout: must not be negative"),
    ],
)
def test_bad_values_name_their_flag(argv: list[str], message: str) -> None:
    """A bad value is refused with a message that names the flag."""
    args = build_parser().parse_args(argv)
    cls = CONFIG_CLASSES[argv[0]]
    with pytest.raises(ConfigError) as info:
        build_config(cls, args, {})
    assert message in info.value.detail


def test_generator_writes_the_page(tmp_path: Path) -> None:
    """The page has one section per server and one row per field, then every other command's
    flags with their help text."""
    page = render()
    for command, cls in CONFIG_CLASSES.items():
        assert f"## `metaproxy {command}`" in page
        for d in field_docs(cls):
            assert f"`{d.env}`" in page
    assert "### `metaproxy identity issue`" in page
    assert "| `--ttl SECONDS` | how long the token is valid. Unit: seconds." in page
    assert "| `--ready-file PATH` |" in page
