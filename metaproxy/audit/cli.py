"""`metaproxy audit keygen|verify|query|tail`. Imports the real work (and boto3) lazily."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = subparsers.add_parser("audit", help="verify and query the tamper-evident audit log")
    commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    keygen = commands.add_parser("keygen", help="create the Ed25519 checkpoint signing key")
    keygen.add_argument("--out", type=Path, required=True, help="directory for the key pair")
    keygen.set_defaults(func=_keygen)

    verify = commands.add_parser("verify", help="check chain, checkpoints and signatures")
    verify.add_argument("target", help="log directory or s3://bucket/prefix")
    verify.add_argument("--public-key", type=Path, help="PEM public key of the signing key")
    verify.add_argument("--anchor", type=Path, help="a checkpoint file kept outside the log")
    _add_s3_options(verify)
    verify.set_defaults(func=_verify)

    query = commands.add_parser("query", help="find records by task, tenant, role, key, time")
    query.add_argument("target", help="log directory or s3://bucket/prefix")
    query.add_argument("--task", default="")
    query.add_argument("--tenant", default="")
    query.add_argument("--role", default="", help="role ARN or role name")
    query.add_argument("--access-key-id", default="")
    query.add_argument("--event", default="")
    query.add_argument("--since", default="", help="ISO 8601, e.g. 2026-01-02T14:00Z")
    query.add_argument("--until", default="", help="ISO 8601")
    query.add_argument("--at", default="", help="credentials valid at this ISO 8601 time")
    query.add_argument("--json", action="store_true", help="one JSON record per line")
    _add_s3_options(query)
    query.set_defaults(func=_query)

    tail = commands.add_parser("tail", help="print the newest records")
    tail.add_argument("directory", type=Path)
    tail.add_argument("-n", "--lines", type=int, default=10)
    tail.add_argument("--follow", action="store_true", help="keep printing new records")
    tail.set_defaults(func=_tail)


def _add_s3_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint", default="", help="S3 endpoint URL (e.g. a local one)")
    parser.add_argument("--region", default="us-east-1")


def s3_client_factory(endpoint: str, region: str) -> Callable[[], Any]:
    def make_client() -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or None, region_name=region)

    return make_client


def _keygen(args: argparse.Namespace) -> int:
    from metaproxy.audit.checkpoint import write_keypair

    private, public = write_keypair(args.out)
    print(f"wrote {private} (keep secret, mode 0600) and {public}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from metaproxy.audit.verify import verify_dir, verify_s3

    target: str = args.target
    if target.startswith("s3://"):
        factory = s3_client_factory(args.s3_endpoint, args.region)
        report = verify_s3(target, args.public_key, factory, anchor=args.anchor)
    elif Path(target).is_dir():
        report = verify_dir(Path(target), args.public_key, anchor=args.anchor)
    else:
        print(f"metaproxy audit verify: {target} is not a directory", file=sys.stderr)
        return 2
    for note in report.notes:
        print(f"note: {note}")
    if report.ok:
        print(
            f"OK: {report.records} records, {report.checkpoints} checkpoints "
            f"({'signed' if report.signed else 'unsigned'}), last seq {report.last_seq}, "
            f"head {report.head}"
        )
        return 0
    print(f"FAILED: {len(report.problems)} problem(s); first bad: {report.first_bad}")
    for problem in report.problems:
        print(f"  {problem}")
    return 1


def _query(args: argparse.Namespace) -> int:
    from metaproxy.audit.query import QueryFilter, format_table, parse_time, query_dir, query_s3

    try:
        where = QueryFilter(
            task=args.task,
            tenant=args.tenant,
            role=args.role,
            access_key_id=args.access_key_id,
            event=args.event,
            since=parse_time(args.since) if args.since else None,
            until=parse_time(args.until) if args.until else None,
            at=parse_time(args.at) if args.at else None,
        )
    except ValueError as exc:
        print(f"metaproxy audit query: {exc}", file=sys.stderr)
        return 2
    target: str = args.target
    if target.startswith("s3://"):
        records = query_s3(target, where, s3_client_factory(args.s3_endpoint, args.region))
    elif Path(target).is_dir():
        records = query_dir(Path(target), where)
    else:
        print(f"metaproxy audit query: {target} is not a directory", file=sys.stderr)
        return 2
    if args.json:
        for record in records:
            print(json.dumps(record, sort_keys=True))
    else:
        print(format_table(records))
    return 0


def _tail(args: argparse.Namespace) -> int:
    from metaproxy.audit.chain import sorted_segments

    directory: Path = args.directory
    if not directory.is_dir():
        print(f"metaproxy audit tail: {directory} is not a directory", file=sys.stderr)
        return 2
    segments = sorted_segments(directory)
    recent: list[bytes] = []
    for _, path in reversed(segments):
        recent = path.read_bytes().splitlines() + recent
        if len(recent) >= args.lines:
            break
    for line in recent[-args.lines :] if args.lines > 0 else []:
        print(line.decode("utf-8", "replace"), flush=True)
    if not args.follow:
        return 0
    # Poll: segments are append-only and rotation creates files with higher names.
    current = segments[-1][1] if segments else None
    position = current.stat().st_size if current else 0
    while True:
        for _, path in sorted_segments(directory):
            if current is None or path.name > current.name:
                if current is not None:
                    _print_from(current, position)  # the rest of the segment just closed
                current, position = path, 0
        if current is not None:
            position = _print_from(current, position)
        time.sleep(0.5)


def _print_from(path: Path, position: int) -> int:
    """Print complete lines after `position`; returns the offset after the last one printed."""
    with path.open("rb") as file:
        file.seek(position)
        data = file.read()
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        print(line.decode("utf-8", "replace"), flush=True)
    return position + end
