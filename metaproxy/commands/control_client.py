"""Calling a broker's control API from the command line: over HTTPS (verified against
`--broker-ca-file`, or plain HTTP to loopback only) with the bearer token from
`--control-token-file`, in one request with a deadline, never following a redirect. Every
failure is a `ControlError` of one line, with the broker's own message when it sent one, and
never the token."""

from __future__ import annotations

import argparse
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

MAX_ANSWER_BYTES = 256 * 1024


class ControlError(Exception):
    """One line for the operator: what failed and why."""


def call_control(
    args: argparse.Namespace, method: str, path: str, body: dict[str, str] | None
) -> dict[str, Any]:
    url: str = args.control_url.rstrip("/")
    _check_url(url)
    try:
        token = args.control_token_file.read_text().strip()
    except OSError as exc:
        raise ControlError(
            f"--control-token-file {args.control_token_file}: {exc.strerror}"
        ) from None
    context = None
    if url.startswith("https://"):
        if args.broker_ca_file is not None and not str(args.broker_ca_file).strip(". "):
            raise ControlError("--broker-ca-file: empty; name the CA bundle, or leave it out")
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
    # Never follow a redirect: it would carry the bearer token to wherever it points.
    opener = urllib.request.build_opener(
        _NoRedirects(), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(request, timeout=args.timeout) as response:
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


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx is raised as an HTTPError: "broker refused: HTTP 30x"


def _check_url(url: str) -> None:
    """https, or http to a loopback address only: the token must not cross a network in clear
    (the broker refuses a control listener off loopback without TLS for the same reason)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "https" and parsed.hostname:
        return
    if parsed.scheme == "http" and parsed.hostname in ("127.0.0.1", "::1", "localhost"):
        return
    raise ControlError(
        f"--control-url {url!r} must be https:// (http:// only to 127.0.0.1, ::1 or localhost)"
    )


def _message(raw: bytes) -> str:
    try:
        return str(json.loads(raw).get("message", ""))[:200]
    except (ValueError, AttributeError):
        return ""
