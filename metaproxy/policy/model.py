"""A loaded, validated policy set: plain frozen values the evaluator reads and never edits.

Everything here has already passed `load.py`; code that holds a `PolicySet` may trust that role
ARNs are well formed, every tenant has exactly one default role and templates name only known
variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from types import MappingProxyType

from metaproxy.models import BrokerLimits, Identity, IdentityKind, SidecarLimits

DEFAULT_SESSION_NAME = "${tenant}.${task}"
DEFAULT_SOURCE_IDENTITY = "${tenant}.${task}"
DEFAULT_DURATION_SECONDS = 3600


def role_identity(arn: str) -> tuple[str, str, str]:
    """(partition, account, name) of a role ARN: what IAM tells roles apart by. Role names are
    unique in an account whatever their path and case, so `role/App` and `role/team/app` are
    one role to IAM and one role to the ownership rule."""
    parts = arn.split(":", 5)
    if len(parts) < 6:
        return ("", "", arn.lower())
    return (parts[1], parts[4], parts[5].rsplit("/", 1)[-1].lower())


def matches_any(value: str, globs: tuple[str, ...]) -> bool:
    # fnmatchcase, not fnmatch: fnmatch folds case on some platforms, and `Web` is not `web`.
    return any(glob == "*" or fnmatchcase(value, glob) for glob in globs)


@dataclass(frozen=True, slots=True)
class IdentityRule:
    """One `[[identities]]` entry: which verified tokens belong to the tenant."""

    index: int
    kind: IdentityKind
    issuer: str = ""  # empty: any trusted issuer of this kind
    tenant_claim: str = ""  # platform tokens: the verified `tenant` claim (aws: the mapped one)
    apps: tuple[str, ...] = ("*",)  # platform tokens: globs on the `app` claim (aws: mapped)
    namespace: str = ""  # kubernetes tokens: exact namespace
    service_accounts: tuple[str, ...] = ("*",)  # kubernetes tokens: globs on the SA name
    trust_domain: str = ""  # spiffe tokens: the SPIFFE ID's exact trust domain

    @property
    def label(self) -> str:
        return f"identities[{self.index}]"

    def matches(self, identity: Identity) -> bool:
        if identity.kind != self.kind or (self.issuer and identity.issuer != self.issuer):
            return False
        if self.kind in ("platform", "aws"):
            return identity.tenant == self.tenant_claim and matches_any(identity.app, self.apps)
        if self.kind == "spiffe":
            return identity.issuer == "spiffe://" + self.trust_domain and matches_any(
                identity.app, self.apps
            )
        return identity.namespace == self.namespace and matches_any(
            identity.service_account, self.service_accounts
        )


@dataclass(frozen=True, slots=True)
class RoleRule:
    """One `[[roles]]` entry: a role the tenant's tasks may get, and how it is scoped."""

    index: int
    arn: str
    default: bool = False
    apps: tuple[str, ...] = ("*",)
    duration_seconds: int = DEFAULT_DURATION_SECONDS
    session_policy: str | None = None  # a JSON template; values are JSON-escaped into it
    # Role chaining: assume `via` (a role ARN) first, then this role with its credentials.
    via: str | None = None
    external_id: str | None = None  # a template, like the session name
    # False: no session tags for this role (chaining into an account that refuses them).
    session_tags: bool = True

    @property
    def name(self) -> str:
        return self.arn.rsplit("/", 1)[-1]

    @property
    def label(self) -> str:
        return f"roles[{self.index}]"

    def allows_app(self, app: str) -> bool:
        return matches_any(app, self.apps)


@dataclass(frozen=True, slots=True)
class SessionTemplates:
    """The `[session]` table: how a task is made attributable in CloudTrail."""

    name: str = DEFAULT_SESSION_NAME
    source_identity: str = DEFAULT_SOURCE_IDENTITY
    tags: tuple[tuple[str, str], ...] = ()  # (key, value template), keys validated at load
    transitive_tag_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """One tenant's file, validated."""

    tenant: str
    team: str
    file: str  # the file name, e.g. `acme.toml`; rules are reported as `acme.toml roles[1]`
    digest: str  # sha256 of the file bytes, hex
    identities: tuple[IdentityRule, ...]
    roles: tuple[RoleRule, ...]
    session: SessionTemplates = field(default_factory=SessionTemplates)
    sidecar_limits: SidecarLimits = field(default_factory=SidecarLimits)
    broker_limits: BrokerLimits = field(default_factory=BrokerLimits)
    description: str = ""
    # `[shared_roles]`: (role ARN, the other tenants that may name it too; "*": any tenant).
    shared_roles: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def default_role(self) -> RoleRule:
        # load.py guarantees exactly one default role per tenant.
        return next(role for role in self.roles if role.default)

    def find_role(self, requested: str) -> RoleRule | None:
        """A role by full ARN or by name (the ARN's last path segment)."""
        key = "arn" if requested.startswith("arn:") else "name"
        return next((role for role in self.roles if getattr(role, key) == requested), None)

    def shares(self, arn: str, tenant: str) -> bool:
        """True if this tenant's `[shared_roles]` lets `tenant` name the role `arn` too."""
        wanted = role_identity(arn)
        return any(
            role_identity(shared) == wanted and (tenant in tenants or "*" in tenants)
            for shared, tenants in self.shared_roles
        )

    def claims(self, identity: Identity) -> bool:
        return any(rule.matches(identity) for rule in self.identities)


def _index_key(kind: IdentityKind, exact: str) -> tuple[IdentityKind, str]:
    """Every identity rule names one exact value (a platform rule its `tenant` claim, a
    Kubernetes rule its namespace); only tenants with a rule for that value can claim a token."""
    return (kind, exact)


def _rule_key(rule: IdentityRule) -> tuple[IdentityKind, str]:
    by_kind = {"platform": rule.tenant_claim, "aws": rule.tenant_claim, "spiffe": rule.trust_domain}
    exact = by_kind.get(rule.kind)
    return _index_key(rule.kind, rule.namespace if exact is None else exact)


def _identity_key(identity: Identity) -> tuple[IdentityKind, str]:
    # A SPIFFE identity's issuer is `spiffe://TRUST_DOMAIN`: its trust domain is the exact value.
    spiffe = identity.issuer.removeprefix("spiffe://")
    exact = {"platform": identity.tenant, "aws": identity.tenant, "spiffe": spiffe}.get(
        identity.kind
    )
    return _index_key(identity.kind, identity.namespace if exact is None else exact)


@dataclass(frozen=True, slots=True)
class PolicySet:
    """All tenants, keyed by tenant name; `digest` identifies the exact files in force."""

    tenants: Mapping[str, TenantPolicy]
    digest: str
    # (kind, tenant claim or namespace) -> the tenants with an identity rule for it, so a
    # request looks at its few candidates rather than every tenant's rules.
    _candidates: Mapping[tuple[IdentityKind, str], tuple[TenantPolicy, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # A read-only view, so a shared set cannot be edited by whoever holds it.
        object.__setattr__(self, "tenants", MappingProxyType(dict(self.tenants)))
        candidates: dict[tuple[IdentityKind, str], list[TenantPolicy]] = {}
        for tenant in self.tenants.values():
            keys = {_rule_key(rule) for rule in tenant.identities}
            for key in keys:
                candidates.setdefault(key, []).append(tenant)
        frozen = {key: tuple(tenants) for key, tenants in candidates.items()}
        object.__setattr__(self, "_candidates", MappingProxyType(frozen))

    def claiming(self, identity: Identity) -> list[TenantPolicy]:
        """The tenants whose identity rules match `identity` (one, unless policies overlap)."""
        candidates = self._candidates.get(_identity_key(identity), ())
        return [tenant for tenant in candidates if tenant.claims(identity)]
