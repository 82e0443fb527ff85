"""The broker's audit chain as one component: the writer, its S3 copy, and its witnesses.

`writer` is the chain itself; `log` is what the broker appends to (the writer, timed and its
refusals counted in the broker's metrics).

The writer hands each closed segment to the shipper; the shipper hands each uploaded file back
for pruning, so the local directory stays a small buffer. Each checkpoint also pins the other
replicas' latest ones, through the store's replica registry (docs/audit.md). Files an earlier
run left unshipped go first, so the S3 copy stays a prefix of the local log.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from metaproxy.audit.checkpoint import WitnessedCheckpoint
from metaproxy.audit.s3copy import parse_s3_url
from metaproxy.audit.ship import S3Shipper, s3_client_factory
from metaproxy.audit.writer import AuditLog
from metaproxy.broker import instrument
from metaproxy.broker.config import BrokerConfig
from metaproxy.broker.metrics import BrokerMetrics
from metaproxy.broker.store.base import ReplicaRegistry
from metaproxy.clock import Clock
from metaproxy.errors import ConfigError

log = logging.getLogger("metaproxy.broker")

BACKFILL_SECONDS = 5.0  # listing the S3 copy at start-up must not hold the broker back for long


class BrokerAudit:
    def __init__(
        self,
        config: BrokerConfig,
        registry: ReplicaRegistry,
        clock: Clock,
        metrics: BrokerMetrics,
    ) -> None:
        self._config = config
        self._registry = registry
        config.audit_dir.mkdir(parents=True, exist_ok=True)
        self.shipper = self._shipper(config)
        self.writer = AuditLog(
            config.audit_dir,
            log_id=f"broker-{config.instance}",
            signing_key=config.audit_key,
            write_timeout=config.audit_write_timeout,
            clock=clock,
            # enqueue only appends to a list: an S3 outage never slows or fails an append.
            on_segment_closed=self.shipper.enqueue if self.shipper is not None else None,
            witness=self._others,
            on_checkpoint=self._publish,
            max_local_bytes=config.audit_max_local_bytes,  # pruned once shipped
        )
        self.log = instrument.TimedAuditLog(self.writer, metrics)

    def _shipper(self, config: BrokerConfig) -> S3Shipper | None:
        """Ships closed segments and checkpoints under `prefix/<instance>/`: each replica
        writes its own chain, and two chains under one prefix would not verify."""
        if not config.audit_s3_url:
            return None
        try:
            bucket, prefix = parse_s3_url(config.audit_s3_url)
        except ValueError as exc:
            raise ConfigError(f"audit_s3_url: {exc} (expected s3://bucket/prefix)") from None
        return S3Shipper(
            bucket=bucket,
            prefix=f"{prefix}/{config.instance}" if prefix else config.instance,
            client_factory=s3_client_factory(config.s3_endpoint, config.sts_region),
            on_uploaded=self._uploaded,
        )

    async def _uploaded(self, path: Path) -> None:
        await self.writer.prune(path)

    async def _others(self) -> dict[str, WitnessedCheckpoint]:
        """The other replicas' latest checkpoints, by log id (the writer leaves its own out)."""
        found = await self._registry.checkpoints()
        return {checkpoint.log_id: checkpoint for checkpoint in found.values()}

    async def _publish(self, checkpoint: WitnessedCheckpoint) -> None:
        await self._registry.publish_checkpoint(self._config.instance, checkpoint)

    async def start(self) -> None:
        if self.shipper is not None:
            await self.shipper.start()
            # Before the writer starts, so files left by an earlier run go first.
            await self._backfill(self.shipper)
        await self.writer.start()

    async def _backfill(self, shipper: S3Shipper) -> None:
        try:
            async with asyncio.timeout(BACKFILL_SECONDS):
                queued = await shipper.backfill(self._config.audit_dir)
        except Exception as exc:
            # S3 may be down at start-up: the broker still starts and newly closed segments
            # still queue; what an earlier run left unshipped goes at the next start.
            log.warning("audit backfill to S3 failed (%s); continuing", type(exc).__name__)
            return
        if queued:
            log.info("audit backfill: %d files queued for S3", queued)

    async def aclose(self) -> None:
        await self.writer.aclose()  # closes the segment and hands it to the shipper
        if self.shipper is not None:
            await self.shipper.aclose(drain_seconds=self._config.drain_seconds)
