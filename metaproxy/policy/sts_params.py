"""Turn a tenant's templates and a verified identity into STS AssumeRole parameters.

Every helper is a pure function. Task, app and tenant names come from tokens and may hold any
Unicode; STS rejects the whole call if one parameter is out of its charset or length, so each
value is made valid here rather than letting the request fail at STS for every task of a tenant.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping

from metaproxy.models import AssumeRoleSpec, Identity
from metaproxy.policy.model import RoleRule, SessionTemplates, TenantPolicy

VARIABLES = (
    "tenant",
    "team",
    "task",
    "app",
    "namespace",
    "service_account",
    # Kubernetes identities, for EKS Pod Identity's session tags (empty for platform tokens).
    "pod_name",
    "pod_uid",
    "cluster_name",
    "cluster_arn",
)
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")

NAME_MIN, NAME_MAX = 2, 64  # RoleSessionName and SourceIdentity
# ASCII only: `\w` would admit Unicode letters, which STS rejects.
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+=,.@-")

MAX_TAGS, TAG_KEY_MAX, TAG_VALUE_MAX = 50, 128, 256
_TAG_PUNCTUATION = frozenset("_.:/=+-@")
MAX_SESSION_POLICY = 2048
EXTERNAL_ID_MIN, EXTERNAL_ID_MAX = 2, 1224
EXTERNAL_ID_CHARS = NAME_CHARS | frozenset(":/")
# AWS caps a session reached by role chaining at one hour, whatever the role allows.
CHAINED_MAX_SECONDS = 3600
# The first hop of a chain only signs the second call: the shortest session STS grants.
CHAIN_FIRST_HOP_SECONDS = 900

_HASH_HEX = 8


class SessionPolicyError(ValueError):
    """A session policy that cannot be sent; `rule` names the deny."""

    rule = "session-policy-invalid"


class SessionPolicyTooLong(SessionPolicyError):
    rule = "session-policy-too-long"


class SessionPolicyUnsafeValue(SessionPolicyError):
    rule = "session-policy-unsafe-value"


def template_variables(template: str) -> list[str]:
    """The names inside `${...}`, in order, unknown ones included (load.py reports those)."""
    return _PLACEHOLDER.findall(template)


def literal_text(template: str) -> str:
    """The template without its `${...}` placeholders: the text every rendering contains."""
    return _PLACEHOLDER.sub("", template)


def render(template: str, values: Mapping[str, str]) -> str:
    """Replace each `${name}`; a name missing from `values` is a KeyError (caught at load)."""
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def template_values(tenant: TenantPolicy, identity: Identity) -> dict[str, str]:
    # Kubernetes tokens carry no app claim: the service account is the app.
    app = identity.service_account if identity.kind == "kubernetes" else identity.app
    return {
        "tenant": tenant.tenant,
        "team": tenant.team,
        "task": identity.task,
        "app": app,
        "namespace": identity.namespace,
        "service_account": identity.service_account,
        "pod_name": identity.pod_name,
        "pod_uid": identity.pod_uid,
        "cluster_name": identity.cluster_name,
        "cluster_arn": identity.cluster_arn,
    }


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]


def _fit(text: str, cleaned: str, limit: int) -> str:
    """`cleaned`, or when cleaning lost information, a prefix of it plus a hash of `text`.

    The hash keeps distinct inputs distinct: two long task ids sharing their first 55
    characters, or `tâsk` and `tësk`, must not end up with the same session name.
    """
    if cleaned == text and len(cleaned) <= limit:
        return cleaned
    suffix = "-" + _short_hash(text)
    return cleaned[: limit - len(suffix)] + suffix


def session_name(text: str) -> str:
    """A RoleSessionName matching `^[\\w+=,.@-]{2,64}$` in ASCII, for any input."""
    cleaned = "".join(ch if ch in NAME_CHARS else "-" for ch in text)
    if len(cleaned) < NAME_MIN:
        # Padding with the hash rather than a fixed filler keeps `a` and `` distinct.
        return cleaned + "-" + _short_hash(text)
    return _fit(text, cleaned, NAME_MAX)


def source_identity(text: str) -> str:
    """A SourceIdentity: the RoleSessionName rules, and never the reserved `aws:` prefix."""
    name = session_name(text)
    # `:` is outside the charset so this cannot happen today; it guards a future charset change.
    if name.lower().startswith("aws:"):
        name = session_name("x-" + text)
    return name


def external_id(text: str) -> str:
    """An ExternalId matching `^[\\w+=,.@:/-]{2,1224}$` in ASCII, for any input."""
    cleaned = "".join(ch if ch in EXTERNAL_ID_CHARS else "-" for ch in text)
    if len(cleaned) < EXTERNAL_ID_MIN:
        return cleaned + "-" + _short_hash(text)
    return _fit(text, cleaned, EXTERNAL_ID_MAX)


def _tag_char_allowed(ch: str) -> bool:
    return ch in _TAG_PUNCTUATION or unicodedata.category(ch)[0] in "LZN"


def tag_key_problem(key: str) -> str | None:
    """Why `key` cannot be a session tag key, or None. Keys are literal, so checked at load."""
    if not 1 <= len(key) <= TAG_KEY_MAX:
        return f"tag keys must be 1..{TAG_KEY_MAX} characters"
    if key.lower().startswith("aws:"):
        return "tag keys must not start with 'aws:' (reserved by AWS)"
    if not all(_tag_char_allowed(ch) for ch in key):
        return "tag keys may hold only letters, digits, spaces and _.:/=+-@"
    return None


def tag_value(text: str) -> str:
    """A session tag value in AWS's charset and length, for any input."""
    cleaned = "".join(ch if _tag_char_allowed(ch) else "-" for ch in text)
    if len(cleaned) <= TAG_VALUE_MAX:
        return cleaned  # tags are for people reading CloudTrail: stay readable when possible
    return _fit(text, cleaned, TAG_VALUE_MAX)


def session_tags(
    session: SessionTemplates, values: Mapping[str, str]
) -> tuple[tuple[str, str], ...]:
    return tuple((key, tag_value(render(value, values))) for key, value in session.tags)


def _json_escaped(values: Mapping[str, str]) -> dict[str, str]:
    # json.dumps of a str is a quoted, escaped string; the quotes come from the template.
    return {name: json.dumps(value)[1:-1] for name, value in values.items()}


def _check_policy_value(name: str, value: str) -> None:
    # IAM reads `*` and `?` as wildcards and `${...}` as a policy variable inside resource
    # ARNs: a task named `*` must not widen `arn:aws:s3:::bucket/${task}/*` to the whole bucket.
    if "*" in value or "?" in value or "${" in value:
        raise SessionPolicyUnsafeValue(
            f"{name} value contains a wildcard or policy variable and cannot scope a policy"
        )


def session_policy(template: str, values: Mapping[str, str]) -> str:
    """Render the template, parse it as JSON and return it compact and within STS's limit."""
    for name in set(template_variables(template)):
        _check_policy_value(name, values[name])
    text = render(template, _json_escaped(values))
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise SessionPolicyError(f"session policy is not valid JSON once rendered: {exc}") from exc
    # ensure_ascii: STS accepts only ASCII (and a few controls) in the policy text.
    compact = json.dumps(document, separators=(",", ":"), ensure_ascii=True)
    if len(compact) > MAX_SESSION_POLICY:
        raise SessionPolicyTooLong(
            f"session policy renders to {len(compact)} characters, more than {MAX_SESSION_POLICY}"
        )
    return compact


def build_spec(tenant: TenantPolicy, role: RoleRule, identity: Identity) -> AssumeRoleSpec:
    """AssumeRole parameters; raises SessionPolicyError when the session policy cannot be sent."""
    values = template_values(tenant, identity)
    policy = None
    if role.session_policy is not None:
        policy = session_policy(role.session_policy, values)
    name = session_name(render(tenant.session.name, values))
    source = source_identity(render(tenant.session.source_identity, values))
    tags = session_tags(tenant.session, values) if role.session_tags else ()
    transitive = tenant.session.transitive_tag_keys if role.session_tags else ()
    external = None
    if role.external_id is not None:
        external = external_id(render(role.external_id, values))
    if role.via is None:
        return AssumeRoleSpec(
            role_arn=role.arn,
            role_session_name=name,
            source_identity=source,
            duration_seconds=role.duration_seconds,
            tags=tags,
            transitive_tag_keys=transitive,
            session_policy=policy,
            external_id=external,
            tenant=tenant.tenant,
        )
    # A chain: what AWS carries along it is set on the first hop. SourceIdentity and transitive
    # tags persist into the second session, where setting a transitive key again fails the
    # call; the session name is the task's on both hops, so CloudTrail in either account names
    # it. The session policy and the ExternalId belong to the role the task gets.
    first = AssumeRoleSpec(
        role_arn=role.via,
        role_session_name=name,
        source_identity=source,
        duration_seconds=CHAIN_FIRST_HOP_SECONDS,
        tags=tags,
        transitive_tag_keys=transitive,
        tenant=tenant.tenant,
    )
    carried = {key.lower() for key in transitive}
    return AssumeRoleSpec(
        role_arn=role.arn,
        role_session_name=name,
        source_identity="",
        duration_seconds=role.duration_seconds,
        tags=tuple((key, value) for key, value in tags if key.lower() not in carried),
        session_policy=policy,
        external_id=external,
        via=first,
        tenant=tenant.tenant,
    )
