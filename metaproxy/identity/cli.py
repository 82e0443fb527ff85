"""`metaproxy identity keygen|issue|verify-document`: the platform's side of task identity."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_ISSUER = "metaproxy-platform"
DEFAULT_AUDIENCE = "metaproxy-broker"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    identity = subparsers.add_parser("identity", help="identity keys, tokens and documents")
    commands = identity.add_subparsers(dest="identity_command", required=True, metavar="ACTION")

    keygen = commands.add_parser("keygen", help="generate a signing key and its JWKS")
    keygen.add_argument("--out", type=Path, required=True, metavar="DIR")
    keygen.add_argument("--name", default="identity", help="file stem (default: identity)")
    keygen.add_argument("--alg", choices=("EdDSA", "ES256"), default="EdDSA")
    keygen.set_defaults(func=_keygen)

    issue = commands.add_parser("issue", help="issue an identity token for a task")
    issue.add_argument("--key", type=Path, required=True)
    issue.add_argument("--task", required=True, metavar="ID")
    issue.add_argument("--tenant", required=True)
    issue.add_argument("--app", default="")
    issue.add_argument("--ttl", type=int, default=3600, metavar="SECONDS")
    issue.add_argument("--issuer", default=DEFAULT_ISSUER)
    issue.add_argument("--audience", default=DEFAULT_AUDIENCE)
    issue.add_argument(
        "--out", type=Path, metavar="FILE", help="write the token here (0600) instead of stdout"
    )
    issue.set_defaults(func=_issue)

    verify = commands.add_parser(
        "verify-document", help="check an instance-identity document's signature"
    )
    verify.add_argument("--key-file", type=Path, required=True, metavar="JWKS_OR_PEM")
    verify.add_argument("--document", type=Path, required=True, metavar="FILE")
    verify.add_argument("--signature", type=Path, required=True, metavar="FILE")
    verify.set_defaults(func=_verify_document)


def _keygen(args: argparse.Namespace) -> int:
    from metaproxy.identity.keys import generate_keypair, load_private_key

    key_path, jwks_path = generate_keypair(args.out, args.name, args.alg)
    _, kid, alg = load_private_key(key_path)
    print(f"private key: {key_path}\nJWKS:        {jwks_path}\nkid:         {kid} ({alg})")
    return 0


def _issue(args: argparse.Namespace) -> int:
    from metaproxy.errors import BadRequest
    from metaproxy.fsutil import write_atomically
    from metaproxy.identity.issue import issue_token

    try:
        token = issue_token(
            args.key,
            issuer=args.issuer,
            audience=args.audience,
            task=args.task,
            tenant=args.tenant,
            app=args.app,
            ttl=args.ttl,
        )
    except BadRequest as exc:
        print(f"metaproxy identity issue: {exc.detail}", file=sys.stderr)
        return 2
    if args.out is None:
        print(token)
    else:
        # Token-file readers (the sidecar, SDKs' web-identity providers) use the whole file
        # as the token, so no trailing newline; the rename means they never see half of it.
        write_atomically(args.out, token.encode("ascii"), 0o600)
    return 0


def _verify_document(args: argparse.Namespace) -> int:
    from metaproxy.errors import ConfigError
    from metaproxy.identity.document import verify_document

    try:
        # Bytes decoded without newline translation: the signature covers the exact text.
        document = args.document.read_bytes().decode("utf-8")
        signature = args.signature.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read document or signature: {type(exc).__name__}") from None
    if verify_document(args.key_file, document, signature):
        print("valid")
        return 0
    print("INVALID signature", file=sys.stderr)
    return 1
