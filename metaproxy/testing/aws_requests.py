"""Reading an AWS request as the fault proxy receives it: which access key signed it, and which
STS action it calls. Nothing secret is read out: no signature, no session token."""

from __future__ import annotations

import re
from urllib.parse import parse_qs

from aiohttp import web

_SIGNED_BY = re.compile(r"Credential=([A-Za-z0-9]+)/")
_SIGNED_V2 = re.compile(r"AWS ([A-Za-z0-9]+):")


def signing_key(request: web.Request) -> str:
    """The access key id that signed `request` (SigV4 or S3's SigV2, in the Authorization header
    or the query of a presigned URL), or ""."""
    authorization = request.headers.get("Authorization", "")
    if signed_by := _SIGNED_BY.search(authorization) or _SIGNED_V2.match(authorization):
        return signed_by.group(1)
    query = request.query
    return query.get("X-Amz-Credential", "").partition("/")[0] or query.get("AWSAccessKeyId", "")


def sts_action(request: web.Request, body: bytes | None) -> str | None:
    """The STS action of a query-protocol call: from the query string or the form body."""
    if action := request.query.get("Action"):
        return action
    if not body:
        return None
    if "x-www-form-urlencoded" not in request.headers.get("Content-Type", ""):
        return None
    values = parse_qs(body.decode("utf-8", "replace")).get("Action")
    return values[0] if values else None
