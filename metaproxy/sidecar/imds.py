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
from collections.abc import Awaitable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from metaproxy.clock import iso_z
from metaproxy.connguard import canned_response
from metaproxy.sidecar.broker_client import Grant
from metaproxy.sidecar.face import Face, RateClass
from metaproxy.sidecar.http1 import Request, Response
from metaproxy.sidecar.tokens import parse_ttl

if TYPE_CHECKING:
    from metaproxy.sidecar.host_metadata import HostMetadata
    from metaproxy.sidecar.state import SidecarState

TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a path, not a secret
TOKEN_HEADER = "x-aws-ec2-metadata-token"  # noqa: S105 - a header name (lower case, as parsed)
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
_VERSIONED_TOKEN = re.compile(r"^/[^/]+/api/token/?$")
VERSIONS = (
    "1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15", "2008-02-01",
    "2008-09-01", "2009-04-04", "2011-01-01", "2011-05-01", "2012-01-12", "2014-02-25",
    "2014-11-05", "2015-10-20", "2016-04-19", "2016-06-30", "2016-09-02", "2018-03-28",
    "2018-08-17", "2018-09-24", "2019-10-01", "2020-10-27", "2021-01-03", "2021-03-23",
    "2021-07-15", "2022-09-24", "2024-04-11", "latest",
)  # fmt: skip
_VERSION_SET = frozenset(VERSIONS)
CREDENTIALS = ["meta-data", "iam", "security-credentials"]
# Java v2, Rust, Ruby, PHP and JS SDKs ask here first for the document with AccountId, and fall
# back to `security-credentials/` on a 404.
EXTENDED = ["meta-data", "iam", "security-credentials-extended"]

_ERROR_TITLES = {
    400: "400 - Bad Request",
    401: "401 - Unauthorized",
    403: "403 - Forbidden",
    404: "404 - Not Found",
    405: "405 - Method Not Allowed",
    408: "408 - Request Timeout",
    413: "413 - Request Entity Too Large",
    414: "414 - Request-URI Too Large",
    429: "429 - Too Many Requests",
    431: "431 - Request Header Fields Too Large",
    500: "500 - Internal Server Error",
    503: "503 - Service Unavailable",
}


def _error_body(status: int) -> bytes:
    title = _ERROR_TITLES.get(status, f"{status}")
    return (
        '<?xml version="1.0" encoding="iso-8859-1"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
        '\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
        f" <head>\n  <title>{title}</title>\n </head>\n"
        f" <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
    ).encode()


_ERROR_BODIES = {status: _error_body(status) for status in _ERROR_TITLES}


def aws_error(status: int, headers: dict[str, str] | None = None) -> Response:
    body = _ERROR_BODIES.get(status) or _error_body(status)
    return Response(status, body, "text/html", tuple((headers or {}).items()))


def text(body: str, **headers: str) -> Response:
    # Plain `text/plain` as EC2 sends it (no `; charset=utf-8`).
    return Response(200, body.encode(), "text/plain", tuple(headers.items()))


def _aws_json(document: dict[str, str]) -> str:
    """JSON the way EC2 prints it: two-space indent, `"Key" : "value"`."""
    return json.dumps(document, indent=2, separators=(",", " : "))


def credentials_document(grant: Grant, *, extended: bool = False) -> str:
    """The role's credential document; `extended` (`security-credentials-extended/ROLE`, which
    current SDKs ask first) adds the account id the credentials belong to."""
    creds = grant.credentials
    document = {
        "Code": "Success",
        "LastUpdated": iso_z(grant.issued_at),
        "Type": "AWS-HMAC",
        "AccessKeyId": creds.access_key_id,
        "SecretAccessKey": creds.secret_access_key,
        "Token": creds.session_token,
        "Expiration": iso_z(creds.expiration),
    }
    if extended:
        document["AccountId"] = grant.account_id
    return _aws_json(document)


def metadata_tree(grant: Grant) -> dict[str, Any]:
    """The task-scoped view. Dict = directory, str = leaf, None = the credential document."""
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
            "security-credentials": {grant.role_name: None},
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


MAX_KEPT_ANSWERS = 512  # per grant; a client inventing paths (`//latest///`) only stops adding


@dataclass(frozen=True, slots=True)
class ImdsView:
    """One grant as IMDS shows it; `SidecarState.imds_view` keeps the current one."""

    grant: Grant
    tree: dict[str, Any]
    credentials: Response
    extended: Response
    # Request path → its answer from this view, and whether it is a credential document (served
    # only with 15 minutes left): a repeated request is then one lookup, not a walk of the tree.
    answers: dict[str, tuple[Response, bool]] = field(default_factory=dict)


def render_view(grant: Grant) -> ImdsView:
    return ImdsView(
        grant,
        metadata_tree(grant),
        text(credentials_document(grant)),
        text(credentials_document(grant, extended=True)),
    )


def handle(state: SidecarState, request: Request) -> Response | Awaitable[Response]:
    path = request.path
    if path == TOKEN_PATH:
        return _token(request, state)
    if "/api/token" in path and _VERSIONED_TOKEN.match(path):
        return aws_error(403)  # AWS only serves tokens at /latest/api/token
    if request.method not in ("GET", "HEAD"):
        return aws_error(405, {"Allow": "GET, HEAD"})
    token = request.headers.get(TOKEN_HEADER)
    if token is not None:
        if TOKEN_HEADER in request.duplicate_headers or not state.tokens.valid(token):
            return aws_error(401)
    elif state.config.imds_v1 != "allow":
        return aws_error(401)
    return _kept_answer(state, path) or _metadata(state, path)


def _token(request: Request, state: SidecarState) -> Response:
    if request.method != "PUT":
        return aws_error(405, {"Allow": "PUT"})
    # A forwarded request came through a proxy; AWS refuses those so SSRF can't mint tokens.
    if "x-forwarded-for" in request.headers:
        return aws_error(403)
    ttl = parse_ttl(request.headers.get(TTL_HEADER.lower()))
    if ttl is None:
        return aws_error(400)
    return text(state.tokens.mint(ttl), **{TTL_HEADER: str(ttl)})


def _kept_answer(state: SidecarState, path: str) -> Response | None:
    """The current view's answer to `path` if it was asked before (and, for a credential
    document, if it may still be served as it is)."""
    grant = state.keeper.current()
    if grant is None:
        return None
    kept = state.imds_view(grant).answers.get(path)
    if kept is None or (kept[1] and state.keeper.serving() is not grant):
        return None
    return kept[0]


def _metadata(state: SidecarState, path: str) -> Response | Awaitable[Response]:
    parts = [p for p in path.split("/") if p]
    if not parts:
        return text("\n".join(VERSIONS))
    if parts[0] not in _VERSION_SET:
        return aws_error(404)
    rest = parts[1:]
    if not rest:
        return text("dynamic\nmeta-data")  # EC2 lists these two without a trailing slash
    if _wants_credentials(rest):
        grant = state.keeper.serving()
        if grant is None:  # inside the 15-minute window, or none yet: wait briefly for fresh
            return _after_refresh(state, rest)
    else:
        grant = state.keeper.current()
    if grant is None:
        # No valid credentials (still starting, broker down past expiry, or revoked): say so
        # rather than serve anything stale.
        return aws_error(503)
    return _keep(state.imds_view(grant), path, _lookup(state, grant, rest), rest)


async def _after_refresh(state: SidecarState, rest: list[str]) -> Response:
    grant = await state.keeper.fresh(wait=0.5)
    if grant is None:
        return aws_error(503)
    answer = _lookup(state, grant, rest)
    return answer if isinstance(answer, Response) else await answer


def _lookup(state: SidecarState, grant: Grant, rest: list[str]) -> Response | Awaitable[Response]:
    view = state.imds_view(grant)
    if rest[:3] == EXTENDED:
        return _extended(view, rest[3:])
    node: Any = view.tree
    for name in rest:
        if not (isinstance(node, dict) and name in node):
            return _host_passthrough(state, "/".join(rest))
        node = node[name]
    if node is None:  # the one role's credential document
        return view.credentials
    return text(listing(node) if isinstance(node, dict) else node)


def _keep(
    view: ImdsView, path: str, answer: Response | Awaitable[Response], rest: list[str]
) -> Response | Awaitable[Response]:
    """Keep a found answer of the view for the next request of `path` (never the host's)."""
    if (
        isinstance(answer, Response)
        and answer.status == 200
        and len(view.answers) < MAX_KEPT_ANSWERS
    ):
        view.answers[path] = (answer, _wants_credentials(rest))
    return answer


def _extended(view: ImdsView, below: list[str]) -> Response:
    """`iam/security-credentials-extended/` and `.../ROLE`, as current EC2 serves them. Left
    out of the `iam/` listing, which SDKs that do not know the path read as before; never
    forwarded to the host, whose role it would name."""
    if not below:
        return text(view.grant.role_name)
    if below == [view.grant.role_name]:
        return view.extended
    return aws_error(404)


def _wants_credentials(rest: list[str]) -> bool:
    return len(rest) == 4 and rest[:3] in (CREDENTIALS, EXTENDED)


def _host_passthrough(state: SidecarState, subpath: str) -> Response | Awaitable[Response]:
    """Anything outside the task's view: the host's answer if allow-listed (and never a denied
    path, checked here and again inside the fetcher), else 404 as EC2 answers unknown paths."""
    host = state.host_metadata
    if host is None or not host.permits(subpath):
        return aws_error(404)
    return _fetch_from_host(host, subpath)


async def _fetch_from_host(host: HostMetadata, subpath: str) -> Response:
    body = await host(subpath)
    return text(body) if body is not None else aws_error(404)


TOKEN = RateClass("token", attrgetter("token_rps"))
CREDENTIAL_DOCUMENT = RateClass("credentials", attrgetter("credentials_rps"))
METADATA = RateClass("metadata", attrgetter("metadata_rps"))


def rate_class(path: str) -> RateClass:
    if path == TOKEN_PATH:
        return TOKEN
    if "/iam/security-credentials/" in path and not path.endswith("/"):
        return CREDENTIAL_DOCUMENT
    return METADATA


FACE = Face(
    name="imds",
    handle=handle,
    rate_class=rate_class,
    error_page=aws_error,
    too_many=lambda retry: aws_error(429, {"Retry-After": str(retry)}),
    refused=aws_error(403),
    over_connection_cap=canned_response(429, "Too Many Requests", _error_body(429), "text/html"),
)
