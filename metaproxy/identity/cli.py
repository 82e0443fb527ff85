"""`metaproxy identity keygen|issue|verify-document`: the platform's side of task identity."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metaproxy.clihelp import add_flag
from metaproxy.identity.names import MAX_TTL_SECONDS, MIN_TTL_SECONDS

DEFAULT_ISSUER = "metaproxy-platform"
DEFAULT_AUDIENCE = "metaproxy-broker"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    identity = subparsers.add_parser("identity", help="identity keys, tokens and documents")
    commands = identity.add_subparsers(dest="identity_command", required=True, metavar="ACTION")

    keygen = commands.add_parser("keygen", help="generate a signing key and its JWKS")
    add_flag(
        keygen,
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory for NAME.key (the private key, 0600) and NAME.jwks.json; "
        "existing files are replaced",
    )
    add_flag(keygen, "--name", default="identity", help="file stem of the key and the JWKS")
    add_flag(keygen, "--alg", choices=("EdDSA", "ES256"), default="EdDSA", help="signing algorithm")
    keygen.set_defaults(func=_keygen)

    issue = commands.add_parser("issue", help="issue an identity token for a task")
    add_flag(
        issue,
        "--key",
        type=Path,
        required=True,
        metavar="FILE",
        help="the platform's private signing key (PEM, from `identity keygen`)",
    )
    add_flag(issue, "--task", required=True, metavar="ID", help="the task id (`task` claim)")
    add_flag(issue, "--tenant", required=True, help="the tenant (`tenant` claim)")
    add_flag(issue, "--app", default="", help="the app within the tenant (`app` claim)")
    add_flag(
        issue,
        "--ttl",
        type=int,
        default=3600,
        metavar="SECONDS",
        unit="seconds",
        allowed=f"{MIN_TTL_SECONDS} to {MAX_TTL_SECONDS}",
        help="how long the token is valid",
    )
    add_flag(
        issue,
        "--issuer",
        default=DEFAULT_ISSUER,
        help="`iss` claim, as the broker's --trust names it",
    )
    add_flag(
        issue,
        "--audience",
        default=DEFAULT_AUDIENCE,
        help="`aud` claim, as the broker's --trust names it",
    )
    add_flag(
        issue,
        "--out",
        type=Path,
        metavar="FILE",
        help="write the token here (0600, no trailing newline); unset: print it on stdout",
    )
    issue.set_defaults(func=_issue)

    verify = commands.add_parser(
        "verify-document", help="check an instance-identity document's signature"
    )
    add_flag(
        verify,
        "--key-file",
        type=Path,
        required=True,
        metavar="JWKS_OR_PEM",
        help="the broker's document public key: a JWKS or a PEM public key",
    )
    add_flag(
        verify,
        "--document",
        type=Path,
        required=True,
        metavar="FILE",
        help="the document as IMDS served it (/latest/dynamic/instance-identity/document)",
    )
    add_flag(
        verify,
        "--signature",
        type=Path,
        required=True,
        metavar="FILE",
        help="its base64 signature (/latest/dynamic/instance-identity/signature)",
    )
    verify.set_defaults(func=_verify_document)


def _keygen(args: argparse.Namespace) -> int:
    from metaproxy.identity.keys import generate_keypair, load_private_key

    key_path, jwks_path = generate_keypair(args.out, args.name, args.alg)
    _, kid, alg = load_private_key(key_path)
    print(f"private key: {key_path}\nJWKS:        {jwks_path}\nkid:         {kid} ({alg})")
    return 0


def _issue(args: argparse.Namespace) -> int:
    from metaproxy.config import check_readable
    from metaproxy.errors import BadRequest, ConfigError, StartError
    from metaproxy.fsutil import write_atomically
    from metaproxy.identity.issue import issue_token

    check_readable("--key", args.key)  # a missing key is a run-time failure naming the flag
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
    except ConfigError as exc:  # only the key raises it: a file that is not a signing key
        raise StartError(f"--key: {exc.detail}") from None
    if args.out is None:
        print(token)
    else:
        # Token-file readers (the sidecar, SDKs' web-identity providers) use the whole file
        # as the token, so no trailing newline; the rename means they never see half of it.
        write_atomically(args.out, token.encode("ascii"), 0o600)
    return 0


def _verify_document(args: argparse.Namespace) -> int:
    from metaproxy.config import check_readable
    from metaproxy.errors import StartError
    from metaproxy.identity.document import verify_document

    for flag, path in (("--key-file", args.key_file), ("--document", args.document),
                       ("--signature", args.signature)):  # fmt: skip
        check_readable(flag, path)
    try:
        # Bytes decoded without newline translation: the signature covers the exact text.
        document = args.document.read_bytes().decode("utf-8")
        signature = args.signature.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise StartError(
            "--document/--signature: not text (a UTF-8 document, a base64 signature)"
        ) from None
    if verify_document(args.key_file, document, signature):
        print("valid")
        return 0
    print("INVALID signature", file=sys.stderr)
    return 1
