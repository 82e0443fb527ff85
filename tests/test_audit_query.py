"""Queries and the `metaproxy audit` commands answer the security team's questions."""

from __future__ import annotations

import argparse
import asyncio
import json
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from metaproxy.audit import cli as audit_cli
from metaproxy.audit.query import QueryFilter, parse_time, query_dir, role_matches
from metaproxy.audit.record import make_record
from metaproxy.audit.writer import AuditLog
from metaproxy.testing.clocks import ManualClock

APP = "arn:aws:iam::123456789012:role/services/app"
DB = "arn:aws:iam::123456789012:role/db"


class SteppedClock(ManualClock):
    """Wall time the test sets; monotonic time that moves a little at every look."""

    def __init__(self, start: datetime) -> None:
        super().__init__(start)
        self.ticks = 0.0

    def monotonic(self) -> float:
        self.ticks += 0.001
        return self.ticks


def grant(minute: int, task: str, role: str, key: str, event: str = "issued") -> dict[str, object]:
    issued_at = datetime(2026, 3, 4, 14, minute, tzinfo=UTC)
    return make_record(
        event,
        request_id=f"req-{task}-{minute}",
        task=task,
        tenant="acme" if role == APP else "billing",
        role_arn=role,
        session_name=f"acme-{task}",
        source_identity=f"acme/{task}",
        access_key_id=key,
        expiration=(issued_at + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        status=200 if event == "issued" else 403,
    )


@pytest.fixture
async def log_dir(tmp_path: Path) -> Path:
    """Four grants and a denial between 14:00 and 14:05 on 2026-03-04."""
    clock = SteppedClock(datetime(2026, 3, 4, 14, 0, tzinfo=UTC))
    log = AuditLog(tmp_path / "log", log_id="b", clock=clock, write_timeout=5)
    await log.start()
    for minute, task, role, key, event in [
        (0, "web-1", APP, "ASIAWEB1", "issued"),
        (1, "web-2", APP, "ASIAWEB2", "issued"),
        (2, "etl-1", DB, "ASIAETL1", "issued"),
        (3, "evil-1", APP, "", "denied"),
        (5, "web-3", APP, "ASIAWEB3", "issued"),
    ]:
        clock.moment = datetime(2026, 3, 4, 14, minute, tzinfo=UTC)
        await log.append(grant(minute, task, role, key, event))
    await log.aclose()
    return tmp_path / "log"


async def test_access_key_id_finds_the_one_task(log_dir: Path) -> None:
    """--access-key-id returns the single record, and so the task, that received the key."""
    found = query_dir(log_dir, QueryFilter(access_key_id="ASIAETL1"))
    assert [(r["task"], r["role_arn"], r["event"]) for r in found] == [("etl-1", DB, "issued")]


async def test_role_in_a_time_range_lists_every_task(log_dir: Path) -> None:
    """--role by name with --since/--until lists each task that got (or was denied) the role."""
    where = QueryFilter(
        role="app", since=parse_time("2026-03-04T14:00Z"), until=parse_time("2026-03-04T14:04")
    )
    assert [r["task"] for r in query_dir(log_dir, where)] == ["web-1", "web-2", "evil-1"]
    issued = QueryFilter(role=APP, event="issued")
    assert [r["task"] for r in query_dir(log_dir, issued)] == ["web-1", "web-2", "web-3"]


async def test_who_had_the_role_at_a_moment(log_dir: Path) -> None:
    """--at lists credentials valid then: granted before, expiring after; denials excluded."""
    at = QueryFilter(role="app", at=parse_time("2026-03-04T14:02:00+00:00"))
    assert [r["task"] for r in query_dir(log_dir, at)] == ["web-1", "web-2"]
    later = QueryFilter(role="app", at=parse_time("2026-03-04T15:00:30Z"))
    assert [r["task"] for r in query_dir(log_dir, later)] == ["web-2", "web-3"]


def test_role_matching_is_exact() -> None:
    """A name matches the ARN's last path element only; an ARN must match whole."""
    assert role_matches("app", APP)
    assert role_matches(APP, APP)
    assert not role_matches("ap", APP)
    assert not role_matches("arn:aws:iam::123456789012:role/app", APP)
    assert not role_matches("app", "")


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="metaproxy")
    audit_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


async def test_cli_query_prints_json_lines_and_a_table(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`audit query --json` prints one record per line; the table has a header and a row."""
    assert run_cli(["audit", "query", str(log_dir), "--access-key-id", "ASIAWEB2", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["task"] for line in lines] == ["web-2"]
    assert run_cli(["audit", "query", str(log_dir), "--task", "web-3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["seq", "time", "event"]
    assert "ASIAWEB3" in table[1] and len(table) == 2
    assert run_cli(["audit", "query", str(log_dir), "--since", "yesterday"]) == 2


async def test_cli_keygen_verify_and_tail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keygen writes a 0600 key; verify prints OK or each problem (exit 1); tail prints the end."""
    assert run_cli(["audit", "keygen", "--out", str(tmp_path / "keys")]) == 0
    key = tmp_path / "keys" / "audit-signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    log = AuditLog(tmp_path / "log", log_id="b", signing_key=key, write_timeout=5)
    await log.start()
    for minute in range(4):
        await log.append(grant(minute, f"t{minute}", APP, f"ASIAT{minute}"))
    await log.aclose()
    public = str(tmp_path / "keys" / "audit-signing.pub")
    capsys.readouterr()
    assert run_cli(["audit", "verify", str(tmp_path / "log"), "--public-key", public]) == 0
    assert capsys.readouterr().out.startswith("OK: 4 records, 1 checkpoints (signed)")

    assert run_cli(["audit", "tail", str(tmp_path / "log"), "-n", "2"]) == 0
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()] == [3, 4]

    segment = next((tmp_path / "log").glob("segment-*.jsonl"))
    segment.write_bytes(segment.read_bytes().replace(b'"task":"t2"', b'"task":"t9"'))
    assert run_cli(["audit", "verify", str(tmp_path / "log"), "--public-key", public]) == 1
    out = capsys.readouterr().out
    assert "first bad: segment-000000000001.jsonl line 3 (seq 3)" in out
    assert "hash does not match" in out


FOLLOW_SCRIPT = """
import argparse, sys
from metaproxy.audit import cli
parser = argparse.ArgumentParser()
cli.register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


async def test_cli_tail_follow_prints_new_records_across_rotation(tmp_path: Path) -> None:
    """`audit tail --follow` prints records appended later, including in new segments."""
    log = AuditLog(tmp_path, log_id="b", segment_max_bytes=600, write_timeout=5)
    await log.start()
    # A full first segment: later records go to new ones, so the end of this one, where the
    # follower starts, stays put however late it gets there.
    while sum(p.stat().st_size for p in tmp_path.glob("segment-*.jsonl")) < 600:
        await log.append(grant(0, "before", APP, "ASIA0"))
    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FOLLOW_SCRIPT,
        "audit",
        "tail",
        str(tmp_path),
        "-n",
        "1",
        "--follow",
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert follower.stdout is not None
        # The last record, printed once it has started and found the end.
        async with asyncio.timeout(30):
            assert json.loads(await follower.stdout.readline())["task"] == "before"
        for minute in range(1, 6):
            await log.append(grant(minute, f"t{minute}", APP, f"ASIA{minute}"))
        assert len(list(tmp_path.glob("segment-*.jsonl"))) > 2
        seen: list[str] = []
        async with asyncio.timeout(10):
            while len(seen) < 5:
                seen.append(json.loads(await follower.stdout.readline())["task"])
        assert seen == ["t1", "t2", "t3", "t4", "t5"]
    finally:
        follower.kill()
        await follower.wait()
        await log.aclose()


def test_tail_and_query_escape_stored_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A task name holding CSI (U+009B), ESC or a bidi override reaches the terminal escaped."""
    from metaproxy.audit.record import make_record
    from metaproxy.audit.writer import AuditLog

    hostile = "t\u009b2J\x1b[31m\u202eevil"

    async def write() -> None:
        log = AuditLog(tmp_path / "log", log_id="t")
        await log.start()
        await log.append(make_record("issued", request_id="r1", task=hostile, tenant="acme"))
        await log.aclose()

    asyncio.run(write())
    assert run_cli(["audit", "tail", str(tmp_path / "log")]) == 0
    assert run_cli(["audit", "query", str(tmp_path / "log"), "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    assert all(char not in out for char in "\u009b\x1b\u202e")
    assert "\\x9b2J" in out
