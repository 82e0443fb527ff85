"""`metaproxy revoke`: revoke, list and lift revocations through a broker's control API.

    metaproxy revoke --control-url URL --control-token-file FILE --broker-ca-file FILE \\
        (--tenant T [--task ID] | --list | --lift --tenant T [--task ID])

Any replica will do: the revocation is durable in the fleet's store and reaches every replica.
Credentials issued *before* the revocation stay valid at AWS until they expire, so a revoke
also prints the IAM deny statement that cuts them off (computed by the broker from the tenant's
session templates, so it matches the tag values exactly as sessions carry them): attach it as
an inline policy to the roles it lists. See docs/revocation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from metaproxy.clihelp import add_flag
from metaproxy.commands.control_client import ControlError, call_control


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "revoke",
        help="revoke, list or lift revocations of tasks and tenants (through the control API)",
        description="Revoke a task of a tenant, or a whole tenant, fleet-wide; list the "
        "revocations in force; or lift one. Prints the IAM deny that ends sessions issued "
        "before a revocation.",
    )
    what = parser.add_mutually_exclusive_group()
    add_flag(
        what,
        "--list",
        action="store_true",
        help="print the revocations in force (audited) instead of revoking",
    )
    add_flag(
        what,
        "--lift",
        action="store_true",
        help="take back the revocation of --tenant [--task] instead of revoking",
    )
    add_flag(
        parser,
        "--tenant",
        help="the tenant (its policy file's `tenant`); required to revoke or lift",
    )
    add_flag(
        parser,
        "--task",
        help="the task id within --tenant (the identity's task); "
        "without it the whole tenant is meant",
    )
    add_flag(
        parser,
        "--control-url",
        required=True,
        metavar="URL",
        help="a broker's control API, e.g. https://broker-control.metaproxy:9443",
    )
    add_flag(
        parser,
        "--control-token-file",
        required=True,
        type=Path,
        metavar="FILE",
        help="file holding the control API's bearer token",
    )
    add_flag(
        parser,
        "--broker-ca-file",
        type=Path,
        metavar="FILE",
        help="CA bundle that signed the broker's certificate (https URLs); unset: system CAs",
    )
    add_flag(
        parser,
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        unit="seconds",
        help="how long to wait for the broker's answer",
    )
    add_flag(
        parser,
        "--json",
        action="store_true",
        help="print the broker's answer as one JSON object instead of text",
    )
    parser.set_defaults(func=_run)


def _check_names(args: argparse.Namespace) -> str | None:
    if args.list:
        if args.tenant is not None or args.task is not None:
            return "--list takes no --tenant or --task"
        return None
    if not args.tenant:
        return "--tenant is required (with --task for one task)"
    for flag, value in (("--tenant", args.tenant), ("--task", args.task)):
        if value is not None and (not value or len(value) > 256 or not value.isprintable()):
            return f"{flag} must be 1-256 printable characters"
    return None


def _run(args: argparse.Namespace) -> int:
    problem = _check_names(args)
    if problem:
        print(f"metaproxy revoke: {problem}", file=sys.stderr)
        return 2
    body = (
        None if args.list else {"tenant": args.tenant, **({"task": args.task} if args.task else {})}
    )
    try:
        if args.list:
            answer = call_control(args, "GET", "/v1/revocations", None)
        elif args.lift:
            answer = call_control(args, "POST", "/v1/revocations/lift", body)
        else:
            answer = call_control(args, "POST", "/v1/revocations", body)
    except ControlError as exc:
        print(f"metaproxy revoke: {exc}", file=sys.stderr)
        return 1
    try:
        _print(args, answer)
    except BrokenPipeError:
        # `metaproxy revoke --list | head`: the reader went away; that is not our error.
        sys.stderr.close()
    return 0


def _print(args: argparse.Namespace, answer: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(answer, indent=2))
        return
    if args.list:
        entries = answer.get("revocations", [])
        for entry in entries:
            who = f"{entry['tenant']}/{entry['task']}" if entry.get("task") else entry["tenant"]
            print(f"{who}\trevoked at {entry.get('at', '')}\tby {entry.get('by', '')}")
        if not entries:
            print("no revocations in force")
        return
    if args.lift:
        lifted = answer.get("lifted", {})
        print(f"lifted the revocation of {_who(args)} (revoked at {lifted.get('at', '')}).")
        return
    revoked = answer.get("revoked", {})
    dropped = answer.get("dropped", {})
    print(
        f"revoked {_who(args)} at {revoked.get('at', '')}: every broker replica refuses it "
        f"from now on (cached credential sets dropped: {dropped.get('shared', 0)} from the "
        f"fleet's shared cache, {dropped.get('replica', 0)} on the replica asked)."
    )
    policy = answer.get("deny_policy")
    if policy is None:
        print(
            "\nNo session tag, SourceIdentity or session name of this tenant's policy names the "
            "task alone,\nso no IAM deny can end only its sessions: they stay valid until they "
            "expire."
        )
        return
    print(
        "\nSessions issued before that time stay valid at AWS until they expire. To end them,"
        "\nattach this inline policy (deny.json) to every role listed below:\n"
    )
    print(json.dumps(policy, indent=2))
    kind = "task" if args.task else "tenant"
    name = args.task or args.tenant
    for arn in answer.get("roles", []):
        role_name = str(arn).rsplit("/", 1)[-1]
        print(
            f"  aws iam put-role-policy --role-name {role_name} "
            f"--policy-name metaproxy-revoke-{kind}-{_safe(name)} "
            "--policy-document file://deny.json"
        )


def _who(args: argparse.Namespace) -> str:
    return f"task {args.task} of tenant {args.tenant}" if args.task else f"tenant {args.tenant}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "+=,.@_-" else "-" for c in name)[:64]
