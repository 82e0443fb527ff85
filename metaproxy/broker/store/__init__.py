"""The fleet store: see `base.py` for the seam, `open_store` to get one from the config."""

from __future__ import annotations

from pathlib import Path

from metaproxy.broker.store.base import FleetStore, StoreUnavailable
from metaproxy.broker.store.sealing import Sealer
from metaproxy.errors import ConfigError

__all__ = ["FleetStore", "StoreUnavailable", "open_store"]


def open_store(
    url: str,
    *,
    state_dir: Path | None,
    timeout: float,
    budget_per_second: float,
    sealer: Sealer | None = None,
) -> FleetStore:
    """`memory` or a Redis/Valkey URL (validated here; nothing connects until `start`). A
    shared store needs the fleet's key (`sealer`): it seals the shared credentials and signs
    the revocations. `budget_per_second`: the account's STS budget, which the store shares out
    among the replicas."""
    if url == "memory":
        from metaproxy.broker.store.memory import MemoryStore

        return MemoryStore(state_dir, budget_per_second=budget_per_second)
    from metaproxy.broker.store.redis_conn import parse_store_url
    from metaproxy.broker.store.redis_store import RedisStore
    from metaproxy.broker.store.signing import PURPOSE, RevocationSigner

    parsed = parse_store_url(url)
    if sealer is None:
        raise ConfigError("store_key_file: required with a shared store (--store redis://…)")
    signer = RevocationSigner(sealer.derive(PURPOSE))
    return RedisStore(parsed, timeout=timeout, signer=signer, budget_per_second=budget_per_second)
