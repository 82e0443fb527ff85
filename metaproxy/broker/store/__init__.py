"""The fleet store: see `base.py` for the seam, `open_store` to get one from the config."""

from __future__ import annotations

from pathlib import Path

from metaproxy.broker.store.base import FleetStore, StoreUnavailable

__all__ = ["FleetStore", "StoreUnavailable", "open_store"]


def open_store(url: str, *, state_dir: Path | None, timeout: float) -> FleetStore:
    """`memory` or a Redis/Valkey URL (validated here; nothing connects until `start`)."""
    if url == "memory":
        from metaproxy.broker.store.memory import MemoryStore

        return MemoryStore(state_dir)
    from metaproxy.broker.store.redis_conn import parse_store_url
    from metaproxy.broker.store.redis_store import RedisStore

    return RedisStore(parse_store_url(url), timeout=timeout)
