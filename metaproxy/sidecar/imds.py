"""The EC2 instance metadata API, as SDKs see it on 169.254.169.254.

Details SDKs depend on (botocore `utils.IMDSFetcher`, `credentials.InstanceMetadataProvider`,
`@smithy/credential-provider-imds`, aws-config's `imds`):
- token PUT: 400 only for a bad TTL; SDKs fall back to IMDSv1 on 403/404/405, give up on 400;
- the role listing body is used whole as the role name, so no trailing newline;
- directory listings end entries with `/`, leaf paths also answer with a trailing slash
  (botocore reads `placement/availability-zone/`);
- everything is `text/plain`, errors are AWS's XHTML pages, and `Server: EC2ws`.

The headers are EC2's, as recorded on real instances (smithy-rs's `http-traffic.json` and `curl -v`
captures; tests/test_imds_wire.py replays them): every answer to a request that carried a token
has the token's *remaining* TTL (`X-Aws-Ec2-Metadata-Token-Ttl-Seconds`, which
aws-node-termination-handler re-reads), every metadata answer `Accept-Ranges: none` and a
`Last-Modified`, errors neither. One deliberate difference: EC2 closes every connection; the
sidecar keeps them alive, because its fair share tells a pod's clients apart by connection
(`fairness`) — a client that asks for `Connection: close` gets it.

Paths the operator allows from the node (`--host-metadata-allow`: placement, spot, events, the
`network/` tree…) are asked of the node's IMDS first (`host_metadata`, cached and coalesced) and
answered from the task's view when the node has no answer; everything else comes from the task's
view or is 404. While the task stops, `lifecycle` adds EC2's termination notices to the view.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from metaproxy.net.connguard import canned_response
from metaproxy.sidecar.broker_client import Grant
from metaproxy.sidecar.face import Face, RateClass
from metaproxy.sidecar.imds_view import (
    MAX_KEPT_ANSWERS,
    ImdsView,
    listing,
    text,
)
from metaproxy.sidecar.tokens import parse_ttl
from metaproxy.sidecar.wire.messages import Request, Response

if TYPE_CHECKING:
    from metaproxy.sidecar.host_metadata import HostMetadata
    from metaproxy.sidecar.state import SidecarState

TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a path, not a secret
TOKEN_HEADER = "x-aws-ec2-metadata-token"  # noqa: S105 - a header name (lower case, as parsed)
TTL_HEADER = "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"  # EC2's spelling on the wire
_TTL_REQUEST = TTL_HEADER.lower()
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
    """EC2's XHTML error page, byte for byte (its 404 is 339 bytes: two tabs and a space open the
    DOCTYPE's second line)."""
    title = _ERROR_TITLES.get(status, f"{status}")
    return (
        '<?xml version="1.0" encoding="iso-8859-1"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
        '\t\t "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
        f" <head>\n  <title>{title}</title>\n </head>\n"
        f" <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
    ).encode()


_ERROR_BODIES = {status: _error_body(status) for status in _ERROR_TITLES}


def aws_error(status: int, headers: dict[str, str] | None = None) -> Response:
    body = _ERROR_BODIES.get(status) or _error_body(status)
    return Response(status, body, "text/html", tuple((headers or {}).items()))


def not_allowed(allow: str) -> Response:
    """EC2's 405, as a real instance answers a GET of the token path: nginx's words, no body."""
    return Response(405, b"", "text/plain", (("Allow", allow),), reason="Not Allowed")


_TOKEN_NOT_ALLOWED = not_allowed("OPTIONS, PUT")
_METADATA_NOT_ALLOWED = not_allowed("GET, HEAD")


_TTL_LINE = b"X-Aws-Ec2-Metadata-Token-Ttl-Seconds: %d\r\n"
_UNAUTHORIZED = aws_error(401)


def ttl_line(seconds: int) -> bytes:
    """The header EC2 puts on every answer to a request with a token: its remaining TTL."""
    return _TTL_LINE % seconds


def handle(  # noqa: PLR0911 - one return per refusal
    state: SidecarState, request: Request
) -> Response | Awaitable[Response]:
    kept = request.kept
    if kept is not None:
        # This request was answered from the view before (`_kept_answer`): the same answer
        # while the grant, its view, the token's countdown second and the credentials' serving
        # stand as they stood then.
        grant, view, token_until, serve_until, answer, line = kept
        kept_answer: Response = answer
        if (
            state.keeper.grant is grant
            and state.imds_view.value is view
            and state.tokens.monotonic() < token_until
            and state.keeper.monotonic() < serve_until
        ):
            request.extra_head = line
            return kept_answer
        request.kept = None
    path = request.path
    if path == TOKEN_PATH:
        return _token(request, state)
    if "/api/token" in path and _VERSIONED_TOKEN.match(path):
        return aws_error(403)  # AWS only serves tokens at /latest/api/token
    if request.method not in ("GET", "HEAD"):
        return _METADATA_NOT_ALLOWED
    token = request.headers.get(TOKEN_HEADER)
    token_until = math.inf
    if token is not None:
        if TOKEN_HEADER in request.duplicate_headers:
            return _UNAUTHORIZED
        left, token_until = state.tokens.remaining_until(token)
        if left is None:
            return _UNAUTHORIZED
        # `ttl_line`, inlined; a repeated request keeps it for the second (`_kept_answer`).
        request.extra_head = _TTL_LINE % left
    elif state.config.imds_v1 != "allow":
        return _UNAUTHORIZED
    return _kept_answer(state, request, token_until) or _metadata(state, path)


def _token(request: Request, state: SidecarState) -> Response:
    if request.method != "PUT":
        return _TOKEN_NOT_ALLOWED
    # A forwarded request came through a proxy; AWS refuses those so SSRF can't mint tokens.
    if "x-forwarded-for" in request.headers:
        return aws_error(403)
    ttl = parse_ttl(request.headers.get(_TTL_REQUEST))
    if ttl is None:
        return aws_error(400)
    return Response(
        200, state.tokens.mint(ttl).encode("ascii"), "text/plain", ((TTL_HEADER, str(ttl)),)
    )


def _kept_answer(state: SidecarState, request: Request, token_until: float) -> Response | None:
    """The current view's answer to the request's path if it was asked before (and, for a
    credential document, if it may still be served as it is): a repeated request is one
    lookup, not a walk of the tree. Noted on the request (`handle`) with how long it stands."""
    keeper = state.keeper
    # Usually there is one to serve: then it is the current one too.
    grant, serve_until = keeper.serving_until()
    serving = grant is not None
    if grant is None:
        grant = keeper.current()
        if grant is None:
            return None
    view = state.imds_view(grant)
    kept = view.answers.get(request.path)
    if kept is None or (kept[1] and not serving):
        return None
    if serving:
        request.kept = (grant, view, token_until, serve_until, kept[0], request.extra_head)
    return kept[0]


def _metadata(state: SidecarState, path: str) -> Response | Awaitable[Response]:
    parts = [p for p in path.split("/") if p]
    if not parts:
        return text("\n".join(VERSIONS), state.started)
    if parts[0] not in _VERSION_SET:
        return aws_error(404)
    rest = parts[1:]
    if not rest:
        return text("dynamic\nmeta-data", state.started)  # EC2 lists these without a slash
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


_MISSING = object()


def _walk(tree: dict[str, Any], rest: list[str]) -> Any:
    node: Any = tree
    for name in rest:
        if not (isinstance(node, dict) and name in node):
            return _MISSING
        node = node[name]
    return node


def _lookup(state: SidecarState, grant: Grant, rest: list[str]) -> Response | Awaitable[Response]:
    view = state.imds_view(grant)
    if rest[:3] == EXTENDED:
        return _extended(view, rest[3:])
    host = state.host_metadata
    if host is not None and not _wants_credentials(rest):
        subpath = "/".join(rest)
        if host.permits(subpath):
            return _from_host(host, view, rest, subpath)
        if host.allows_below(subpath):
            return _merged_listing(host, view, rest, subpath)
    return _from_view(view, rest)


def _from_view(view: ImdsView, rest: list[str]) -> Response:
    node = _walk(view.tree, rest)
    if node is _MISSING:
        return aws_error(404)
    if node is None:  # the one role's credential document
        return view.credentials
    return view.text(listing(node) if isinstance(node, dict) else node)


async def _from_host(host: HostMetadata, view: ImdsView, rest: list[str], subpath: str) -> Response:
    """The node's answer for a field the operator gave it (its zone, its network, its spot
    notice), else the task's own."""
    body = await host(subpath)
    return view.text(body) if body is not None else _from_view(view, rest)


async def _merged_listing(
    host: HostMetadata, view: ImdsView, rest: list[str], subpath: str
) -> Response:
    """A directory holding fields from both: the task's entries and the node's allowed ones."""
    node = _walk(view.tree, rest)
    entries = await host.entries(subpath)
    if isinstance(node, dict):
        entries = sorted({*listing(node).split("\n"), *entries})
    elif node is not _MISSING or not entries:
        return _from_view(view, rest)
    return view.text(listing(entries))


def _keep(
    view: ImdsView, path: str, answer: Response | Awaitable[Response], rest: list[str]
) -> Response | Awaitable[Response]:
    """Keep a found answer of the view for the next request of `path` (never one the node's
    answers may change: those are awaited through the host cache every time)."""
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
        return view.text(view.grant.role_name)
    if below == [view.grant.role_name]:
        return view.extended
    return aws_error(404)


def _wants_credentials(rest: list[str]) -> bool:
    return len(rest) == 4 and rest[:3] in (CREDENTIALS, EXTENDED)


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
    server="EC2ws",
    error_page=aws_error,
    # 503, not the 429 EC2 is reported to send: aws-sdk-go-v2, the Rust SDK and the C++ SDK's
    # IMDS clients retry 5xx and give up on a 429 (see container_creds.throttled).
    too_many=lambda retry: aws_error(503, {"Retry-After": str(retry)}),
    refused=aws_error(403),
    over_connection_cap=canned_response(
        503, "Service Unavailable", _error_body(503), "text/html", retry_after=1
    ),
)
