"""The names of everything the fleet keeps in Valkey/Redis, in one place.

Keys one script touches together share a hash tag (`{…}`), so each script runs in one slot of
a Cluster too. Values that name a session or an identity are digests.
"""

from __future__ import annotations

import hashlib
import json

PREFIX = "metaproxy"
REVOCATIONS_KEY = f"{PREFIX}:{{revocations}}"
# The lifts' tombstones: a revocation missing from the store without one here was lost, not
# lifted (same hash tag: the lift script writes both).
LIFTS_KEY = f"{PREFIX}:{{revocations}}:lifts"
REVOCATION_CHANNEL = f"{PREFIX}:revocations"
FLIGHT_CHANNEL = f"{PREFIX}:flights"
BUDGET_KEY = f"{PREFIX}:{{sts-budget}}"
REPLICAS_KEY = f"{PREFIX}:{{replicas}}:live"
CHECKPOINTS_KEY = f"{PREFIX}:{{replicas}}:checkpoints"


def tenant_key(tenant: str, part: str) -> str:
    # One hash tag per tenant: the admission script's three keys land in one Cluster slot.
    return f"{PREFIX}:{{tenant:{tenant}}}:{part}"


def short_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def revocation_field(tenant: str, task: str) -> str:
    return json.dumps([tenant, task])


def ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def cache_key(key: str) -> str:
    # Value and lease share a hash tag: one script touches both, on a Cluster too.
    return f"{PREFIX}:{{cache:{key}}}:value"


def lease_key(key: str) -> str:
    return f"{PREFIX}:{{cache:{key}}}:lease"


def waiting_key(key: str) -> str:
    # Set by a replica that waits for the lease's release; only then is the release published.
    return f"{PREFIX}:{{cache:{key}}}:waiting"


def flight_keys(key: str) -> list[str]:
    """The value, lease and waiting keys of one cache entry, in the scripts' order."""
    return [cache_key(key), lease_key(key), waiting_key(key)]


def owner_key(owner: str) -> str:
    return f"{PREFIX}:owner:{short_digest(owner)}"
