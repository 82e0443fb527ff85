"""Calling a broker's control API from the command line: over HTTPS (verified against
`--broker-ca-file`) with the bearer token from `--control-token-file`, in one request with a
deadline. Every failure is a `ControlError` of one line, with the broker's own message when it
sent one, and never the token."""

from __future__ import annotations

import argparse
import json
from typing import Any

MAX_ANSWER_BYTES = 256 * 1024


class ControlError(Exception):
    """One line for the operator: what failed and why."""


def call_control(
    args: argparse.Namespace, method: str, path: str, body: dict[str, str] | None
) -> dict[str, Any]:
    import ssl
    import urllib.error
    import urllib.request

    url: str = args.control_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ControlError(f"--control-url {url!r} must be an http(s) URL")
    try:
        token = args.control_token_file.read_text().strip()
    except OSError as exc:
        raise ControlError(
            f"--control-token-file {args.control_token_file}: {exc.strerror}"
        ) from None
    context = None
    if url.startswith("https://"):
        try:
            context = ssl.create_default_context(
                cafile=str(args.broker_ca_file) if args.broker_ca_file else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ControlError(f"--broker-ca-file {args.broker_ca_file}: {exc}") from None
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method=method,
    )
    try:
        with urllib.request.urlopen(  # noqa: S310
            request, timeout=args.timeout, context=context
        ) as response:
            answer: Any = json.loads(response.read(MAX_ANSWER_BYTES))
    except urllib.error.HTTPError as exc:
        raise ControlError(f"broker refused: HTTP {exc.code} {_message(exc.read(4096))}") from None
    except urllib.error.URLError as exc:
        raise ControlError(f"cannot reach {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise ControlError(f"{url}: {exc}") from None
    if not isinstance(answer, dict):
        raise ControlError("broker answered with something other than a JSON object")
    return answer


def _message(raw: bytes) -> str:
    try:
        return str(json.loads(raw).get("message", ""))[:200]
    except (ValueError, AttributeError):
        return ""
