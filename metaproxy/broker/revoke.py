"""Revoking and lifting, as the control API does them, for the whole fleet.

A revocation is durable in the store before it is acknowledged, applied to this replica's view
at once (the store's push brings it to the others), and drops the cached credentials it covers
here and in the shared cache. Each step that changes state is one audit record.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta
from typing import Any

from metaproxy.audit.record import make_record
from metaproxy.broker.app import BrokerServices
from metaproxy.broker.revocation import revocation_scope
from metaproxy.broker.shared_cache import owner_names
from metaproxy.broker.store.base import Lift, Revocation, RevocationEvent, StoreUnavailable
from metaproxy.clock import iso_z
from metaproxy.errors import Unavailable
from metaproxy.logs import request_id_var
from metaproxy.policy.revoke_deny import deny_policy


class StoreDown(Unavailable):
    code = "StoreUnavailable"
    public_message = "the fleet store is unreachable; nothing was changed, retry later"


async def _audit(
    services: BrokerServices,
    event: str,
    tenant: str,
    task: str,
    *,
    reason: str,
    peer: str,
    status: int,
) -> None:
    await services.audit.append(
        make_record(
            event,
            request_id=request_id_var.get(),
            task=task,
            tenant=tenant,
            rule="control",
            reason=reason,
            peer=peer,
            instance=services.config.instance,
            status=status,
        )
    )


async def revoke(services: BrokerServices, tenant: str, task: str, *, peer: str) -> dict[str, Any]:
    entry = Revocation(
        tenant=tenant,
        task=task,
        at=iso_z(services.clock.now()),
        by=f"{peer} via {services.config.instance}",
    )
    # Counted before the store's push (which in memory comes back at once) drops them too.
    dropped, roles = services.issuer.forget(tenant, task)
    try:
        await services.store.revocations.add(entry)
    except StoreUnavailable:
        reason = f"revoke {revocation_scope(tenant, task)}: store down"
        await _audit(services, "failed", tenant, task, reason=reason, peer=peer, status=503)
        raise StoreDown(f"revoke {revocation_scope(tenant, task)}: store unreachable") from None
    # This replica refuses at once; the others when the push (or their resync) reaches them.
    services.revocations.apply(RevocationEvent("revoke", entry))
    shared_dropped = 0
    shared_cache = services.store.cache
    with contextlib.suppress(StoreUnavailable):
        # Expired from the store in any case before the sidecars' floor; dropped now so a
        # lifted task starts with credentials issued after the IAM deny's cut-off.
        if shared_cache is not None:
            shared_dropped = await shared_cache.drop_owner(
                owner_names(tenant, task)[1 if task else 0]
            )
    tenant_policy = services.policies.current.tenants[tenant]
    roles = sorted({*roles, *(role.arn for role in tenant_policy.roles)})
    await _audit(
        services,
        "revoked",
        tenant,
        task,
        reason=f"{revocation_scope(tenant, task)} revoked by operator; "
        f"{dropped} cached sets dropped here, {shared_dropped} from the shared cache",
        peer=peer,
        status=200,
    )
    cutoff = deny_cutoff(services.clock.now(), services.config.revocation_max_staleness)
    return {
        "revoked": {"tenant": tenant, "task": task, "at": entry.at, "by": entry.by},
        # The same sets usually sit in both: this replica's cache and the fleet's shared one.
        "dropped": {"replica": dropped, "shared": shared_dropped},
        "roles": roles,
        "deny_policy": deny_policy(tenant_policy, task, cutoff),
        "deny_covers_sessions_issued_before": cutoff,
    }


# Between the broker's clock and STS's, and for an STS call under way when a replica learns.
DENY_MARGIN_SECONDS = 60.0


def deny_cutoff(revoked_at: datetime, max_staleness: float) -> str:
    """Until when the printed deny must reach: every credential the fleet may still have minted
    and handed out for the task. This replica refuses at once, and re-checks every fetch before
    it answers; another replica may not have heard yet — it re-reads the store, or refuses to
    issue once its view is older than `--revocation-max-staleness`."""
    return iso_z(revoked_at + timedelta(seconds=max_staleness + DENY_MARGIN_SECONDS))


async def lift(
    services: BrokerServices, tenant: str, task: str, *, peer: str
) -> dict[str, Any] | None:
    lift = Lift(
        tenant, task, at=iso_z(services.clock.now()), by=f"{peer} via {services.config.instance}"
    )
    try:
        lifted = await services.store.revocations.remove(lift)
    except StoreUnavailable:
        reason = f"lift {revocation_scope(tenant, task)}: store down"
        await _audit(services, "failed", tenant, task, reason=reason, peer=peer, status=503)
        raise StoreDown(f"lift {revocation_scope(tenant, task)}: store unreachable") from None
    if lifted is None:
        return None
    services.revocations.apply(RevocationEvent("lift", lifted, lift))
    await _audit(
        services,
        "lifted",
        tenant,
        task,
        reason=f"revocation of {revocation_scope(tenant, task)} (at {lifted.at}) "
        "lifted by operator",
        peer=peer,
        status=200,
    )
    return {"lifted": {"tenant": tenant, "task": task, "at": lifted.at, "by": lifted.by}}
