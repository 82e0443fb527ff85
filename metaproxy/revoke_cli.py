"""`metaproxy revoke --task ID | --tenant NAME --broker-admin URL`.

The broker's admin API records the revocation (it survives restarts), drops the cached
credentials and refuses further requests (403, audited `denied`). Credentials issued *before*
the revocation stay valid at AWS until they expire, so this command also prints the IAM deny
statement that cuts them off: attach it as an inline policy to the roles it lists. See
docs/revocation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# Session tags the sample policies set on every session (`[session] tags`); they become
# principal tags of the assumed-role session, so IAM can tell tasks and tenants apart.
TASK_TAG = "task"
TENANT_TAG = "tenant"
MAX_ANSWER_BYTES = 64 * 1024


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "revoke",
        help="revoke a task's or a tenant's credentials and print the IAM deny that ends them",
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--task", help="the task id (the identity token's task)")
    who.add_argument("--tenant", help="the tenant name (its policy file's stem)")
    parser.add_argument(
        "--broker-admin",
        required=True,
        metavar="URL",
        help="the broker's admin address, e.g. http://127.0.0.1:9902",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object: the broker's answer + policy"
    )
    parser.set_defaults(func=_run)


def deny_policy(kind: str, name: str, revoked_at: str) -> dict[str, Any]:
    """An IAM policy denying everything to sessions of `kind`/`name` issued before `revoked_at`.

    `aws:TokenIssueTime` is when STS issued the session's credentials: sessions issued later
    (none will be, the broker refuses them) are not affected, and neither are other tasks or
    tenants sharing the role, because the deny is scoped by the session's principal tag.
    """
    tag = TASK_TAG if kind == "task" else TENANT_TAG
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": f"MetaproxyRevoke{kind.title()}",
                "Effect": "Deny",
                "Action": "*",
                "Resource": "*",
                "Condition": {
                    "DateLessThan": {"aws:TokenIssueTime": revoked_at},
                    "StringEquals": {f"aws:PrincipalTag/{tag}": name},
                },
            }
        ],
    }


def post_revoke(admin_url: str, kind: str, name: str, timeout: float) -> dict[str, Any]:
    """POST /v1/revoke; raises OSError (unreachable) or ValueError (refused, bad answer)."""
    import urllib.error
    import urllib.request

    if not admin_url.startswith(("http://", "https://")):
        raise ValueError(f"--broker-admin {admin_url!r} must be an http(s) URL")
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        admin_url.rstrip("/") + "/v1/revoke",
        data=json.dumps({kind: name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            body: Any = json.loads(response.read(MAX_ANSWER_BYTES))
    except urllib.error.HTTPError as exc:
        raise ValueError(f"broker refused: HTTP {exc.code} {_message(exc.read(4096))}") from None
    if not isinstance(body, dict) or not isinstance(body.get("revoked"), dict):
        raise ValueError("broker answered without a revocation record")
    return body


def _message(raw: bytes) -> str:
    try:
        return str(json.loads(raw).get("message", ""))[:200]
    except (ValueError, AttributeError):
        return ""


def _run(args: argparse.Namespace) -> int:
    kind, name = ("task", args.task) if args.task is not None else ("tenant", args.tenant)
    if not name or len(name) > 256 or not name.isprintable():
        print(f"metaproxy revoke: --{kind} must be 1-256 printable characters", file=sys.stderr)
        return 2
    try:
        answer = post_revoke(args.broker_admin, kind, name, args.timeout)
    except (OSError, ValueError) as exc:
        print(f"metaproxy revoke: {exc}", file=sys.stderr)
        return 1
    revoked_at = str(answer["revoked"].get("at", ""))
    roles = [str(role) for role in answer.get("roles", [])]
    policy = deny_policy(kind, name, revoked_at)
    if args.json:
        print(json.dumps({**answer, "deny_policy": policy}, indent=2))
        return 0
    print(
        f"revoked {kind} {name} at {revoked_at}: the broker refuses it from now on "
        f"({answer.get('dropped', 0)} cached credential sets dropped)."
    )
    print(
        "\nSessions issued before that time stay valid at AWS until they expire. To end them,"
        f"\nattach this inline policy to every role the {kind} could assume:\n"
    )
    print(json.dumps(policy, indent=2))
    if roles:
        print("\nRoles it had or may assume:")
        for arn in roles:
            role_name = arn.rsplit("/", 1)[-1]
            print(
                f"  aws iam put-role-policy --role-name {role_name} "
                f"--policy-name metaproxy-revoke-{kind}-{_safe(name)} "
                "--policy-document file://deny.json"
            )
    return 0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "+=,.@_-" else "-" for c in name)[:64]
