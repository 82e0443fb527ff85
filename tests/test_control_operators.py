"""Named control tokens: one per operator, re-read without a restart, and every revoke's audit
record (and the revocation itself) names the operator whose token asked."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from metaproxy.audit import cli as audit_cli
from metaproxy.broker.control_tokens import ControlToken, ControlTokens
from metaproxy.broker.server import BrokerServer
from metaproxy.errors import ConfigError
from tests.conftest import record_broker_secrets
from tests.support import CONTROL_TOKEN, Pki, audit_records, broker_config

ALICE = "alice-control-token-0123456789abcdef"
BOB = "bob-control-token-0123456789abcdef"


def replace_file(path: Path, text: str) -> None:
    """Written beside and renamed over, as an editor or a config tool does."""
    scratch = path.with_name(path.name + ".new")
    scratch.write_text(text)
    os.replace(scratch, path)


async def revoke(https: aiohttp.ClientSession, broker: BrokerServer, token: str, task: str) -> int:
    url = broker.control_url + "/v1/revocations"
    headers = {"Authorization": f"Bearer {token}"}
    async with https.post(url, json={"tenant": "acme", "task": task}, headers=headers) as answer:
        await answer.read()
        return answer.status


def query_table(audit_dir: Path, event: str) -> list[str]:
    """`metaproxy audit query DIR --event EVENT` as the security team reads it: the table."""
    parser = argparse.ArgumentParser(prog="metaproxy")
    audit_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", "query", str(audit_dir), "--event", event])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return out.getvalue().splitlines()


async def start_broker(
    tmp_path: Path, pki: Pki, sts_url: str, policies: Path, tokens: Path
) -> BrokerServer:
    config = broker_config(tmp_path, pki, sts_url, policies)
    return await BrokerServer.start(replace(config, control_token_file=None, control_tokens=tokens))


async def test_revocations_by_two_operators_are_audited_under_each_name(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path, https: aiohttp.ClientSession
) -> None:
    """Alice's token and Bob's each revoke a task: each audit record and each revocation names
    its operator; a refused token names none."""
    tokens = tmp_path / "control-tokens"
    tokens.write_text(f"# operators\nalice:{ALICE}\nbob: {BOB}\n")
    broker = await start_broker(tmp_path, pki, sts_url, policies_dir, tokens)
    try:
        assert await revoke(https, broker, ALICE, "by-alice") == 200
        assert await revoke(https, broker, BOB, "by-bob") == 200
        assert await revoke(https, broker, "not-a-token-of-anyone-at-all", "by-nobody") == 401
        async with https.get(
            broker.control_url + "/v1/revocations", headers={"Authorization": f"Bearer {BOB}"}
        ) as answer:
            listing = (await answer.json())["revocations"]
    finally:
        record_broker_secrets(broker)
        await broker.aclose()
    revoked = {
        r["task"]: r["operator"]
        for r in audit_records(tmp_path / "audit")
        if r["event"] == "revoked"
    }
    assert revoked == {"by-alice": "alice", "by-bob": "bob"}
    refused = [r for r in audit_records(tmp_path / "audit") if r.get("status") == 401]
    assert len(refused) == 1 and "operator" not in refused[0]
    by = {entry["task"]: entry["by"] for entry in listing}
    assert by["by-alice"].startswith("alice (127.0.0.1 via ")
    assert by["by-bob"].startswith("bob (127.0.0.1 via ")
    table = query_table(tmp_path / "audit", "revoked")
    assert table[0].split()[-2:] == ["operator", "request_id"]
    assert [line.split()[-2] for line in table[1:]] == ["alice", "bob"]
    text = b"".join(p.read_bytes() for p in (tmp_path / "audit").glob("segment-*.jsonl"))
    assert ALICE.encode() not in text and BOB.encode() not in text


async def test_a_token_removed_from_the_file_stops_working_without_a_restart(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path, https: aiohttp.ClientSession
) -> None:
    """Bob's line removed: his token is refused at once, Alice's still works; Bob back: works."""
    tokens = tmp_path / "control-tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    broker = await start_broker(tmp_path, pki, sts_url, policies_dir, tokens)
    try:
        assert await revoke(https, broker, BOB, "t1") == 200
        replace_file(tokens, f"alice:{ALICE}\n")
        assert await revoke(https, broker, BOB, "t2") == 401
        assert await revoke(https, broker, ALICE, "t3") == 200
        with tokens.open("a") as file:  # edited in place: same inode
            file.write(f"bob:{BOB}\n")
        assert await revoke(https, broker, BOB, "t4") == 200
        replace_file(tokens, f"alice:{ALICE}\nbob {BOB}\n")  # a typo: every token refused
        assert await revoke(https, broker, ALICE, "t5") == 401
    finally:
        record_broker_secrets(broker)
        await broker.aclose()


def _secret_volume(directory: Path, generation: str, tokens: dict[str, str]) -> None:
    """A Kubernetes Secret as its volume shows it: files in a timestamped folder, `..data`
    naming it (swapped atomically), and one symlink per key through `..data`."""
    folder = directory / f"..{generation}"
    folder.mkdir()
    for name, token in tokens.items():
        (folder / name).write_text(token + "\n")
    scratch = directory / "..data_tmp"
    scratch.symlink_to(folder.name)
    os.replace(scratch, directory / "..data")
    for name in tokens:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    for link in directory.iterdir():
        if link.is_symlink() and not link.name.startswith(".") and not link.exists():
            link.unlink()  # the kubelet removes keys the Secret no longer has


def test_a_mounted_secret_names_an_operator_per_key_and_follows_its_swap(tmp_path: Path) -> None:
    """A directory of files, one per operator, read through `..data`: a key dropped from the
    Secret stops matching once the kubelet swaps it in."""
    volume = tmp_path / "tokens"
    volume.mkdir()
    _secret_volume(volume, "2026_12_06_01", {"alice": ALICE, "bob": BOB})
    tokens = ControlTokens(volume, named=True)
    assert (tokens.operator(ALICE), tokens.operator(BOB)) == ("alice", "bob")
    assert tokens.operator("") is None and tokens.operator(ALICE + "x") is None
    _secret_volume(volume, "2026_12_06_02", {"alice": ALICE})
    assert tokens.operator(BOB) is None
    assert tokens.operator(ALICE) == "alice"


def test_the_single_token_file_is_the_shared_operator(tmp_path: Path) -> None:
    """--control-token-file keeps working; its one token is audited as operator `shared`."""
    path = tmp_path / "control.token"
    path.write_text(CONTROL_TOKEN + "\n")
    assert ControlToken(path).operator(CONTROL_TOKEN) == "shared"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "names no operator"),
        (f"alice {ALICE}\n", "line 1 is not NAME:TOKEN"),
        (f"alice:{ALICE}\nalice:{BOB}\n", "names alice a second time"),
        (f"alice:{ALICE}\nbob:{ALICE}\n", "bob and alice have the same token"),
        ("alice:short\n", "fewer than 16 characters"),
        (f"../alice:{ALICE}\n", "is not letters, digits"),
    ],
)
def test_a_bad_tokens_file_is_refused_at_start_naming_the_line(
    tmp_path: Path, text: str, message: str
) -> None:
    """Malformed, duplicated, shared or short tokens: a ConfigError saying which."""
    path = tmp_path / "control-tokens"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        ControlTokens(path, named=True)


async def test_both_token_sources_at_once_are_refused(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> None:
    """--control-tokens and --control-token-file together: which one counts would be a guess."""
    tokens = tmp_path / "control-tokens"
    tokens.write_text(f"alice:{ALICE}\n")
    config = replace(broker_config(tmp_path, pki, sts_url, policies_dir), control_tokens=tokens)
    with pytest.raises(ConfigError, match="not both"):
        await BrokerServer.start(config)
