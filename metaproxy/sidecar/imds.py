"""The EC2 instance metadata API, as SDKs see it on 169.254.169.254.

Details SDKs depend on (botocore `utils.IMDSFetcher`, `credentials.InstanceMetadataProvider`,
`@smithy/credential-provider-imds`):
- token PUT: 400 only for a bad TTL; SDKs fall back to IMDSv1 on 403/404/405, give up on 400;
- the role listing body is used whole as the role name, so no trailing newline;
- directory listings end entries with `/`, leaf paths also answer with a trailing slash
  (botocore reads `placement/availability-zone/`);
- everything is `text/plain`, errors are AWS's XHTML pages, and `Server: EC2ws`.

Paths outside the task's view go to `host_metadata` (allow-list, deny-list, caps) or get 404.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from metaproxy.clock import iso_z
from metaproxy.sidecar import host_metadata
from metaproxy.sidecar.broker_client import Grant
from metaproxy.sidecar.state import STATE, SidecarState
from metaproxy.sidecar.tokens import parse_ttl

TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a path, not a secret
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 - a header name
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
_VERSIONED_TOKEN = re.compile(r"^/[^/]+/api/token/?$")
VERSIONS = (
    "1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15", "2008-02-01",
    "2008-09-01", "2009-04-04", "2011-01-01", "2011-05-01", "2012-01-12", "2014-02-25",
    "2014-11-05", "2015-10-20", "2016-04-19", "2016-06-30", "2016-09-02", "2018-03-28",
    "2018-08-17", "2018-09-24", "2019-10-01", "2020-10-27", "2021-01-03", "2021-03-23",
    "2021-07-15", "2022-09-24", "2024-04-11", "latest",
)  # fmt: skip

_ERROR_TITLES = {
    400: "400 - Bad Request",
    401: "401 - Unauthorized",
    403: "403 - Forbidden",
    404: "404 - Not Found",
    405: "405 - Method Not Allowed",
    429: "429 - Too Many Requests",
    503: "503 - Service Unavailable",
}


def aws_error(status: int, headers: dict[str, str] | None = None) -> web.Response:
    title = _ERROR_TITLES.get(status, f"{status}")
    body = (
        '<?xml version="1.0" encoding="iso-8859-1"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
        '\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
        f" <head>\n  <title>{title}</title>\n </head>\n"
        f" <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
    )
    return web.Response(status=status, text=body, content_type="text/html", headers=headers)


def text(body: str, **headers: str) -> web.Response:
    # Bytes, so the header is plain `text/plain` as EC2 sends it (no `; charset=utf-8`).
    return web.Response(body=body.encode(), content_type="text/plain", headers=headers or None)


def _aws_json(document: dict[str, str]) -> str:
    """JSON the way EC2 prints it: two-space indent, `"Key" : "value"`."""
    return json.dumps(document, indent=2, separators=(",", " : "))


def credentials_document(grant: Grant) -> str:
    creds = grant.credentials
    return _aws_json(
        {
            "Code": "Success",
            "LastUpdated": iso_z(grant.issued_at),
            "Type": "AWS-HMAC",
            "AccessKeyId": creds.access_key_id,
            "SecretAccessKey": creds.secret_access_key,
            "Token": creds.session_token,
            "Expiration": iso_z(creds.expiration),
        }
    )


def metadata_tree(grant: Grant) -> dict[str, Any]:
    """The task-scoped view. Dict = directory, str = leaf, callable-free so it is cheap."""
    m = grant.metadata
    meta_data: dict[str, Any] = {
        "ami-id": m.get("ami_id", ""),
        "hostname": m.get("hostname", ""),
        "iam": {
            "info": _aws_json(
                {
                    "Code": "Success",
                    "LastUpdated": iso_z(grant.issued_at),
                    "InstanceProfileArn": m.get("instance_profile_arn", ""),
                    "InstanceProfileId": m.get("instance_profile_id", ""),
                }
            ),
            "security-credentials": {grant.role_name: None},  # filled per request
        },
        "instance-id": m.get("instance_id", ""),
        "instance-type": m.get("instance_type", ""),
        "local-hostname": m.get("local_hostname", ""),
        "local-ipv4": m.get("local_ipv4", ""),
        "mac": m.get("mac", ""),
        "placement": {
            "availability-zone": m.get("availability_zone", ""),
            "availability-zone-id": m.get("availability_zone_id", ""),
            "region": m.get("region", ""),
        },
        "services": {"domain": "amazonaws.com", "partition": "aws"},
    }
    dynamic: dict[str, Any] = {}
    if "identity_document" in m:
        dynamic["instance-identity"] = {
            "document": m["identity_document"],
            "signature": m.get("identity_signature", ""),
        }
    return {"dynamic": dynamic, "meta-data": meta_data}


def listing(directory: dict[str, Any]) -> str:
    return "\n".join(f"{k}/" if isinstance(v, dict) else k for k, v in directory.items())


async def handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    path = request.path
    if path == TOKEN_PATH:
        return _token(request, state)
    if _VERSIONED_TOKEN.match(path):
        return aws_error(403)  # AWS only serves tokens at /latest/api/token
    if request.method not in ("GET", "HEAD"):
        return aws_error(405, {"Allow": "GET, HEAD"})
    token = request.headers.get(TOKEN_HEADER)
    if token is not None:
        if not state.tokens.valid(token):
            return aws_error(401)
    elif state.config.imds_v1 != "allow":
        return aws_error(401)
    return await _metadata(request, state, path)


def _token(request: web.Request, state: SidecarState) -> web.Response:
    if request.method != "PUT":
        return aws_error(405, {"Allow": "PUT"})
    # A forwarded request came through a proxy; AWS refuses those so SSRF can't mint tokens.
    if "X-Forwarded-For" in request.headers:
        return aws_error(403)
    ttl = parse_ttl(request.headers.get(TTL_HEADER))
    if ttl is None:
        return aws_error(400)
    return text(state.tokens.mint(ttl), **{TTL_HEADER: str(ttl)})


async def _metadata(request: web.Request, state: SidecarState, path: str) -> web.StreamResponse:
    parts = [p for p in path.split("/") if p]
    if not parts:
        return text("\n".join(VERSIONS))
    if parts[0] not in VERSIONS:
        return aws_error(404)
    rest = parts[1:]
    if not rest:
        return text("dynamic\nmeta-data")  # EC2 lists these two without a trailing slash
    if _wants_credentials(rest):
        grant = await state.keeper.fresh(wait=0.5)
    else:
        grant = state.keeper.current()
    if grant is None:
        # No valid credentials (still starting, broker down past expiry, or revoked): say so
        # rather than serve anything stale.
        return aws_error(503)
    return await _lookup(state, grant, rest)


async def _lookup(state: SidecarState, grant: Grant, rest: list[str]) -> web.StreamResponse:
    node: Any = metadata_tree(grant)
    for name in rest:
        if not (isinstance(node, dict) and name in node):
            return await _host_passthrough(state, "/".join(rest))
        node = node[name]
    if node is None:  # the one role's credential document
        return text(credentials_document(grant))
    return text(listing(node) if isinstance(node, dict) else node)


def _wants_credentials(rest: list[str]) -> bool:
    return rest[:3] == ["meta-data", "iam", "security-credentials"] and len(rest) == 4


async def _host_passthrough(state: SidecarState, subpath: str) -> web.StreamResponse:
    """Anything outside the task's view: the host's answer if allow-listed (and never a denied
    path, checked here and again inside the fetcher), else 404 as EC2 answers unknown paths."""
    if not host_metadata.permitted(subpath, state.config.host_metadata_allow):
        return aws_error(404)
    body = await state.host_metadata(subpath)
    return text(body) if body is not None else aws_error(404)
