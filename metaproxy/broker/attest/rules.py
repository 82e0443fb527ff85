"""From the ARN STS names to an identity: which tenant, app and task an attested role is.

A rule is `ACCOUNT:ROLE:TENANT[:APP]` (`--aws-attest-rules`): ROLE is a role name, or a prefix
ending in `*`; APP a name or `{role}` (the default). The task is the role's session name:
ECS names a task role's session after the task's ID, EC2 an instance profile's after the
instance. Rules are the operator's, read once; nothing from the ARN is ever a pattern, and every
name taken from it must pass the same name rules as a token's claims (`identity/names.py`), as
it reaches session names and ARNs through policy templates. The first matching rule wins.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from metaproxy.errors import ConfigError, Unauthenticated
from metaproxy.identity.names import name_problem
from metaproxy.models import Identity

APP_FROM_ROLE = "{role}"
# Only assumed roles attest: an IAM user's long-lived key is nobody's platform identity.
_ASSUMED_ROLE = re.compile(
    r"arn:(?P<partition>aws[a-z-]{0,12}):sts::(?P<account>\d{12}):assumed-role/"
    r"(?P<role>[\w+=,.@-]{1,64})/(?P<session>[\w+=,.@-]{2,64})",
    re.ASCII,
)
_ACCOUNT = re.compile(r"\d{12}", re.ASCII)
_ROLE_NAME = re.compile(r"[\w+=,.@-]{1,64}", re.ASCII)


class CallerArn(NamedTuple):
    partition: str
    account: str
    role: str
    session: str


@dataclass(frozen=True, slots=True)
class AttestRule:
    account: str
    role: str  # exact, or a prefix when it ends in `*`
    tenant: str
    app: str = APP_FROM_ROLE

    def matches(self, caller: CallerArn) -> bool:
        if caller.account != self.account:
            return False
        if self.role.endswith("*"):
            return caller.role.startswith(self.role[:-1])
        return caller.role == self.role


def parse_rule(spec: str) -> AttestRule:
    """One `ACCOUNT:ROLE:TENANT[:APP]`, or ConfigError saying what is wrong with it."""
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise ConfigError(f"--aws-attest-rules: {spec!r} must be ACCOUNT:ROLE:TENANT[:APP]")
    account, role, tenant = parts[:3]
    app = parts[3] if len(parts) == 4 else APP_FROM_ROLE
    if not _ACCOUNT.fullmatch(account):
        raise ConfigError(f"--aws-attest-rules: {account!r} is not a 12-digit account ID")
    if role != "*" and not _ROLE_NAME.fullmatch(role.removesuffix("*")):
        raise ConfigError(f"--aws-attest-rules: {role!r} is not a role name or PREFIX*")
    for what, name in (("tenant", tenant), ("app", "" if app == APP_FROM_ROLE else app)):
        if name and (problem := name_problem(name)):
            raise ConfigError(f"--aws-attest-rules: {what} {name!r} {problem}")
    if not tenant:
        raise ConfigError(f"--aws-attest-rules: {spec!r} names no tenant")
    return AttestRule(account, role, tenant, app)


def parse_caller(arn: str, account: str) -> CallerArn:
    """The assumed role STS says signed, or Unauthenticated (any other kind of principal)."""
    found = _ASSUMED_ROLE.fullmatch(arn)
    if found is None:
        raise Unauthenticated(
            "AWS attestation is not by an assumed role (task or instance role)",
            reason="invalid_claims",
        )
    caller = CallerArn(found["partition"], found["account"], found["role"], found["session"])
    if caller.account != account:
        raise Unauthenticated("AWS attestation names two accounts", reason="invalid_claims")
    return caller


def attested_identity(
    arn: str,
    account: str,
    rules: Sequence[AttestRule],
    *,
    access_key_id: str,
    expires_at: float,
) -> Identity:
    """The identity the first matching rule gives the caller STS named, or Unauthenticated."""
    caller = parse_caller(arn, account)
    rule = next((rule for rule in rules if rule.matches(caller)), None)
    if rule is None:
        raise Unauthenticated(
            f"AWS attestation by role {caller.role} of account {caller.account} matches no rule",
            reason="unknown_issuer",
        )
    app = caller.role if rule.app == APP_FROM_ROLE else rule.app
    for what, name in (("role", app), ("session", caller.session)):
        if problem := name_problem(name):
            raise Unauthenticated(
                f"AWS attestation's {what} name {problem}", reason="invalid_claims"
            )
    return Identity(
        kind="aws",
        issuer=f"aws:{caller.account}",
        subject=arn,
        task=caller.session,
        tenant=rule.tenant,
        app=app,
        token_id=access_key_id,  # joins the record with CloudTrail's; not a secret
        expires_at=expires_at,
    )
