"""`metaproxy audit keygen|verify|query|tail`. Imports the real work (and boto3) lazily."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metaproxy.audit.checkpoint import CHECKPOINT_EVERY_SECONDS, LIVE_TAIL_SLACK_SECONDS
from metaproxy.audit.record import EVENTS
from metaproxy.audit.ship import s3_client_factory
from metaproxy.clihelp import add_flag

TARGET_HELP = "the log: a directory, or s3://BUCKET/PREFIX where the broker ships it"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = subparsers.add_parser("audit", help="verify and query the tamper-evident audit log")
    commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    keygen = commands.add_parser("keygen", help="create the Ed25519 checkpoint signing key")
    add_flag(
        keygen,
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory for the key pair (the private key 0600)",
    )
    keygen.set_defaults(func=_keygen)

    verify = commands.add_parser("verify", help="check chain, checkpoints and signatures")
    add_flag(verify, "target", metavar="TARGET", help=TARGET_HELP)
    add_flag(
        verify,
        "--public-key",
        type=Path,
        action="append",
        metavar="FILE",
        help="PEM public key of the checkpoint signing key; repeat it for a log that spans an "
        "audit key rotation (the old key and the new); unset: signatures are not checked",
    )
    add_flag(
        verify,
        "--anchor",
        type=Path,
        metavar="FILE",
        help="a checkpoint file kept outside the log; the log must reach it (catches truncation)",
    )
    add_flag(
        verify,
        "--allow-unanchored",
        action="store_true",
        help="accept records no checkpoint covers, however old (a log written without a key); "
        "without it only a live tail passes, younger than --checkpoint-interval plus "
        f"{LIVE_TAIL_SLACK_SECONDS:g} s",
    )
    add_flag(
        verify,
        "--checkpoint-interval",
        type=float,
        default=CHECKPOINT_EVERY_SECONDS,
        metavar="SECONDS",
        unit="seconds",
        help="how often the writer checkpoints (the broker's is fixed at this default): "
        "records after the last checkpoint that are younger pass as a live tail, with a note",
    )
    _add_fleet_option(verify)
    _add_s3_options(verify)
    verify.set_defaults(func=_verify)

    query = commands.add_parser("query", help="find records by task, tenant, role, key, time")
    add_flag(query, "target", metavar="TARGET", help=TARGET_HELP)
    add_flag(query, "--task", default="", metavar="ID", help="only records of this task id")
    add_flag(query, "--tenant", default="", help="only records of this tenant")
    add_flag(query, "--role", default="", help="only records of this role (ARN or name)")
    add_flag(
        query,
        "--access-key-id",
        default="",
        metavar="AKID",
        help="only the record that issued this access key id (ASIA...)",
    )
    add_flag(
        query,
        "--event",
        default="",
        choices=EVENTS,
        metavar="EVENT",
        help="only records of this event (a misspelt one is refused, not an empty answer)",
    )
    add_flag(
        query,
        "--since",
        default="",
        metavar="TIME",
        allowed="ISO 8601, e.g. 2026-01-02T14:00Z",
        help="only records at or after this time",
    )
    add_flag(
        query,
        "--until",
        default="",
        metavar="TIME",
        allowed="ISO 8601",
        help="only records before this time",
    )
    add_flag(
        query,
        "--at",
        default="",
        metavar="TIME",
        allowed="ISO 8601",
        help="only credentials that were valid at this time",
    )
    add_flag(
        query,
        "--json",
        action="store_true",
        help="one JSON record per line instead of a table",
    )
    _add_fleet_option(query)
    _add_s3_options(query)
    query.set_defaults(func=_query)

    tail = commands.add_parser("tail", help="print the newest records")
    add_flag(tail, "target", metavar="TARGET", help=TARGET_HELP)
    add_flag(
        tail,
        "-n",
        "--lines",
        type=int,
        default=10,
        metavar="N",
        unit="records",
        help="how many of the newest records to print",
    )
    add_flag(
        tail,
        "--follow",
        action="store_true",
        help="keep printing new records as they are written, across segment rotations "
        "(a directory only: an s3:// copy holds closed segments)",
    )
    _add_fleet_option(tail)
    _add_s3_options(tail)
    tail.set_defaults(func=_tail)


def _add_fleet_option(parser: argparse.ArgumentParser) -> None:
    # Auto-detection reads a folder (or prefix) with no chain left in it as one empty chain,
    # which passes; a check of a known fleet copy should say so and get "no replica chains".
    # A folder holding both layouts is an error unless one of these says which to read.
    layout = parser.add_mutually_exclusive_group()
    add_flag(
        layout,
        "--fleet",
        dest="fleet",
        action="store_const",
        const=True,
        help="read the target as one chain per replica (<instance>/), skipping any chain at "
        "its top; detected when neither this nor --single is given",
    )
    add_flag(
        layout,
        "--single",
        dest="fleet",
        action="store_const",
        const=False,
        help="read the target as one broker's chain, skipping any replica folders in it",
    )


def _add_s3_options(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--s3-endpoint",
        default="",
        metavar="URL",
        help="S3 endpoint URL for s3:// targets (e.g. a local one); unset: AWS's",
    )
    add_flag(parser, "--region", default="us-east-1", help="AWS region for s3:// targets")


def _keygen(args: argparse.Namespace) -> int:
    from metaproxy.audit.signing_keys import write_keypair

    private, public = write_keypair(args.out)
    print(f"wrote {private} (keep secret, mode 0600) and {public}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    import tempfile

    from metaproxy.audit.s3copy import download_s3

    target: str = args.target
    if target.startswith("s3://"):
        factory = s3_client_factory(args.s3_endpoint, args.region)
        with tempfile.TemporaryDirectory(prefix="metaproxy-audit-") as tmp:
            copied = download_s3(target, factory, Path(tmp))
            code = _verify_dir(args, Path(tmp), target, shipped=True)
        if copied == 0 and code == 0:
            print(f"FAILED: 1 problem(s); first bad: {target}\n  {target}: no audit objects found")
            return 1
        return code
    if Path(target).is_dir():
        return _verify_dir(args, Path(target), target, shipped=False)
    print(f"metaproxy audit verify: {target} is not a directory", file=sys.stderr)
    return 2


def _layout(command: str, directory: Path, shown: str, fleet: bool | None) -> str | None:
    """The layout to read, or None after printing why the target is ambiguous."""
    from metaproxy.audit.layout import MixedLayout, resolve_layout

    try:
        return resolve_layout(directory, fleet)
    except MixedLayout as exc:
        message = str(exc).replace(str(directory), shown, 1)
        print(f"metaproxy audit {command}: {message}", file=sys.stderr)
        return None


def _verify_dir(args: argparse.Namespace, directory: Path, shown: str, *, shipped: bool) -> int:
    """Verify one chain or a fleet; a shipped copy may lack the segments still open."""
    from metaproxy.audit.fleet import verify_fleet_dir
    from metaproxy.audit.verify import verify_dir

    layout = _layout("verify", directory, shown, args.fleet)
    if layout is None:
        return 2
    if layout == "fleet":
        fleet = verify_fleet_dir(
            directory,
            args.public_key,
            anchor=args.anchor,
            unshipped_tail_ok=shipped,
            allow_unanchored=args.allow_unanchored,
            checkpoint_interval=args.checkpoint_interval,
        )
        ok, problems, first_bad, notes = fleet.ok, fleet.problems, fleet.first_bad, fleet.notes
        summary = (
            f"OK: {len(fleet.replicas)} replicas, {fleet.records} records, "
            f"{fleet.checkpoints} checkpoints ({'signed' if fleet.signed else 'unsigned'}), "
            f"{fleet.witnessed} witness statements"
        )
        details = [
            f"  {r.name}: last seq {r.report.last_seq}, head {r.report.head}"
            for r in fleet.replicas
        ]
    else:
        report = verify_dir(
            directory,
            args.public_key,
            anchor=args.anchor,
            unshipped_tail_ok=shipped,
            allow_unanchored=args.allow_unanchored,
            checkpoint_interval=args.checkpoint_interval,
        )
        ok, problems, first_bad, notes = report.ok, report.problems, report.first_bad, report.notes
        summary = (
            f"OK: {report.records} records, {report.checkpoints} checkpoints "
            f"({'signed' if report.signed else 'unsigned'}), last seq {report.last_seq}, "
            f"head {report.head}"
        )
        details = []
    for note in notes:
        print(f"note: {note}")
    if ok:
        print("\n".join([summary, *details]))
        return 0
    print(f"FAILED: {len(problems)} problem(s); first bad: {first_bad}")
    for problem in problems:
        print(f"  {problem}")
    return 1


def _query(args: argparse.Namespace) -> int:
    from metaproxy.audit.layout import MixedLayout
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
    try:
        if target.startswith("s3://"):
            factory = s3_client_factory(args.s3_endpoint, args.region)
            records = query_s3(target, where, factory, fleet=args.fleet)
        elif Path(target).is_dir():
            records = query_dir(Path(target), where, fleet=args.fleet)
        else:
            print(f"metaproxy audit query: {target} is not a directory", file=sys.stderr)
            return 2
    except MixedLayout as exc:
        print(f"metaproxy audit query: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for record in records:
            print(json.dumps(record, sort_keys=True))
    else:
        print(format_table(records))
    return 0


def _tail(args: argparse.Namespace) -> int:
    import tempfile

    from metaproxy.audit.s3copy import download_s3
    from metaproxy.audit.tail import tail

    target: str = args.target
    if not target.startswith("s3://"):
        directory = Path(target)
        if not directory.is_dir():
            print(f"metaproxy audit tail: {target} is not a directory", file=sys.stderr)
            return 2
        layout = _layout("tail", directory, target, args.fleet)
        if layout is None:
            return 2
        return tail(directory, args.lines, follow=args.follow, fleet=layout == "fleet")
    if args.follow:
        print(
            "metaproxy audit tail: --follow needs a directory (an s3:// copy gets closed "
            "segments only, minutes apart)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="metaproxy-audit-") as tmp:
        download_s3(target, s3_client_factory(args.s3_endpoint, args.region), Path(tmp))
        layout = _layout("tail", Path(tmp), target, args.fleet)
        if layout is None:
            return 2
        return tail(Path(tmp), args.lines, follow=False, fleet=layout == "fleet")
