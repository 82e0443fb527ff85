"""`metaproxy policy check` and `metaproxy policy explain`.

`explain --kind aws` takes the attested identity as the broker's `--aws-attest-rules` left it
(tenant, app, task, `aws:ACCOUNT`), not an ARN: policies see only those, and the mapping is the
broker's (a layer above policies), configured by its flags rather than the policy directory.

Only argparse at import time: the policy modules load when a command runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from metaproxy.clihelp import add_flag

EXIT_DENIED = 3
EXIT_USAGE = 2
PLATFORM_ISSUER = "metaproxy-platform"
KUBERNETES_ISSUER = "https://kubernetes.default.svc"
# What the broker names an attested identity's issuer: the account STS answered with.
AWS_ISSUER = re.compile(r"aws:\d{12}", re.ASCII)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = subparsers.add_parser("policy", help="validate and explain tenant policies")
    commands = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="validate a policy directory")
    add_flag(check, "directory", type=Path, metavar="DIR", help="the policy directory")
    check.add_argument(
        "--trust",
        action="append",
        metavar="ISSUER,AUDIENCE,KEYS[,KIND]",
        help="an issuer the broker trusts, as its --trust (repeatable); with more than one "
        "Kubernetes issuer every Kubernetes rule must name its own. Env: METAPROXY_TRUST",
    )
    check.set_defaults(func=_check)

    explain = commands.add_parser(
        "explain", help="show which role and scope an identity would get, and why"
    )
    add_flag(explain, "directory", type=Path, metavar="DIR", help="the policy directory")
    add_flag(
        explain,
        "--kind",
        choices=("platform", "kubernetes", "spiffe", "aws"),
        default="platform",
        help="the kind of identity token: the platform's own, a Kubernetes service account's, "
        "a SPIFFE JWT-SVID (--issuer spiffe://TRUST_DOMAIN, --app and --task as its path "
        "names them), or an AWS attestation as the broker's --aws-attest-rules map it "
        "(--issuer aws:ACCOUNT, --tenant and --app as the matching rule gives them, --task the "
        "role session's name: the ECS task ID or EC2 instance ID)",
    )
    add_flag(
        explain,
        "--tenant",
        default="",
        help="the `tenant` claim, which platform tokens must carry (aws: the rule's tenant)",
    )
    add_flag(explain, "--task", required=True, help="the task id (the token's `task` claim)")
    add_flag(
        explain,
        "--app",
        default="",
        help="the `app` claim of platform tokens (aws: the rule's app, by default the role name)",
    )
    add_flag(
        explain,
        "--role",
        default="",
        help="the role name or ARN asked for; unset: the policy's default role",
    )
    add_flag(
        explain, "--namespace", default="", help="the namespace, which kubernetes tokens must carry"
    )
    add_flag(
        explain,
        "--service-account",
        default="",
        help="the service account's name, which kubernetes tokens must carry",
    )
    add_flag(
        explain,
        "--issuer",
        default="",
        help=f"the token's issuer; unset: {PLATFORM_ISSUER} for platform tokens, "
        f"{KUBERNETES_ISSUER} for kubernetes ones; aws:ACCOUNT (required) for aws ones",
    )
    explain.set_defaults(func=_explain)


def _check(args: argparse.Namespace) -> int:
    from metaproxy.config import trusted_issuers
    from metaproxy.policy.load import PolicyError, load_policy_dir

    trusted = trusted_issuers(args.trust)
    kubernetes = [issuer.issuer for issuer in trusted if issuer.kind == "kubernetes"]
    try:
        policies = load_policy_dir(args.directory, kubernetes_issuers=kubernetes)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    print(f"ok: {len(policies.tenants)} tenants")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from metaproxy.models import Identity
    from metaproxy.policy.evaluate import evaluate
    from metaproxy.policy.load import load_policy_dir

    if args.kind == "platform" and not args.tenant:
        print(
            "metaproxy policy explain: --tenant is required for a platform identity",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.kind == "kubernetes" and not (args.namespace and args.service_account):
        print(
            "metaproxy policy explain: --namespace and --service-account are required "
            "for a kubernetes identity",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.kind == "spiffe" and not (args.issuer.startswith("spiffe://") and args.app):
        print(
            "metaproxy policy explain: --issuer spiffe://TRUST_DOMAIN and --app are required "
            "for a spiffe identity",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.kind == "aws" and not (AWS_ISSUER.fullmatch(args.issuer) and args.tenant and args.app):
        print(
            "metaproxy policy explain: --issuer aws:ACCOUNT (12 digits), --tenant and --app are "
            "required for an aws identity",
            file=sys.stderr,
        )
        return EXIT_USAGE
    identity = Identity(
        kind=args.kind,
        issuer=args.issuer or (PLATFORM_ISSUER if args.kind == "platform" else KUBERNETES_ISSUER),
        subject="policy-explain",
        task=args.task,
        tenant=args.tenant if args.kind in ("platform", "aws") else "",
        app=args.service_account if args.kind == "kubernetes" else args.app,
        namespace=args.namespace,
        service_account=args.service_account,
    )
    decision = evaluate(load_policy_dir(args.directory), identity, args.role or None)
    report: dict[str, Any] = {
        "allowed": decision.allowed,
        "tenant": decision.tenant,
        "team": decision.team,
        "rule": decision.rule,
        "reason": decision.reason,
        "role_arn": decision.role_arn,
        "policy_digest": decision.policy_digest,
        "assume_role": None,
    }
    if decision.spec is not None:
        spec = decision.spec
        # The names of STS AssumeRole's own parameters, so the output reads like the call.
        report["assume_role"] = {
            "RoleArn": spec.role_arn,
            "RoleSessionName": spec.role_session_name,
            "SourceIdentity": spec.source_identity,
            "DurationSeconds": spec.duration_seconds,
            "Tags": [{"Key": key, "Value": value} for key, value in spec.tags],
            "TransitiveTagKeys": list(spec.transitive_tag_keys),
            "Policy": spec.session_policy,
        }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if decision.allowed else EXIT_DENIED
