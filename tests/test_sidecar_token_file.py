"""The authorization token file: the task can write to its directory, so nothing planted there
(a link, a FIFO, a huge file) makes the sidecar read or write anything but its own file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from metaproxy.config import build_config
from metaproxy.errors import ConfigError
from metaproxy.sidecar.config import SidecarConfig
from metaproxy.sidecar.container_creds import load_or_create_token


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_new_token_file_is_0600_without_newline(tmp_path: Path) -> None:
    """A token the sidecar makes is written 0600, exactly the token."""
    path = tmp_path / "auth" / "token"
    token = load_or_create_token(path)
    assert path.read_text() == token
    assert mode_of(path) == 0o600


def test_planted_link_is_replaced_not_followed(tmp_path: Path) -> None:
    """A link to a root-only file is neither read nor written through: the link is replaced by
    a new 0600 file with a fresh token and the target is untouched."""
    secret = tmp_path / "shadow"
    secret.write_text("root-only-secret-value-0123456789")
    secret.chmod(0o600)
    path = tmp_path / "token"
    path.symlink_to(secret)
    token = load_or_create_token(path)
    assert token != "root-only-secret-value-0123456789"
    assert not path.is_symlink()
    assert path.read_text() == token
    assert mode_of(path) == 0o600
    assert secret.read_text() == "root-only-secret-value-0123456789"
    assert mode_of(secret) == 0o600


def test_planted_fifo_does_not_block_and_is_replaced(tmp_path: Path) -> None:
    """A FIFO where the token should be is not opened for a read that would wait forever."""
    path = tmp_path / "token"
    os.mkfifo(path)
    token = load_or_create_token(path)
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert path.read_text() == token


def test_platform_token_with_a_loose_mode_is_rewritten_tight(tmp_path: Path) -> None:
    """A platform-written token is kept, but a 0644 file becomes 0600."""
    path = tmp_path / "token"
    path.write_text("platform-chosen-token-0123456789")
    path.chmod(0o644)
    assert load_or_create_token(path) == "platform-chosen-token-0123456789"
    assert mode_of(path) == 0o600


def test_configured_mode_is_used(tmp_path: Path) -> None:
    """--authorization-token-mode 0640 lets the app's group read the file (Kubernetes fsGroup)."""
    config = build_config(SidecarConfig, environ={"METAPROXY_AUTHORIZATION_TOKEN_MODE": "0640"})
    path = tmp_path / "token"
    load_or_create_token(path, int(config.authorization_token_mode, 8))
    assert mode_of(path) == 0o640


@pytest.mark.parametrize("mode", ["0666", "0755", "777", "rw-r--r--", "06000"])
def test_modes_that_others_could_write_or_run_are_refused(mode: str) -> None:
    """A mode beyond 0644 is a configuration error, not a world-writable token."""
    with pytest.raises(ConfigError, match="authorization-token-mode"):
        build_config(SidecarConfig, environ={"METAPROXY_AUTHORIZATION_TOKEN_MODE": mode})


def test_directory_that_is_a_link_is_refused(tmp_path: Path) -> None:
    """The token's directory planted as a link (to /etc, say) is refused, nothing written."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "auth").symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        load_or_create_token(tmp_path / "auth" / "token")
    assert list(target.iterdir()) == []
