"""Copying a shipped audit log down from S3: one chain's files, or a fleet's `<instance>/`
folders, exactly as the shippers laid them out, to verify or query locally.

Only names the writer produces are fetched, so an object key like `../x` can never write
outside the target folder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from metaproxy.audit.names import CHECKPOINT_DIR, CHECKPOINT_RE, LATEST_NAME, segment_first_seq

# A replica's folder in a fleet copy (`prefix/<instance>/`): a name, never a path.
INSTANCE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` as (bucket, prefix without trailing slash)."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    return bucket, prefix.strip("/")


def download_s3(url: str, client_factory: Callable[[], Any], into: Path) -> int:
    """Copy segments and checkpoints under an s3:// prefix into `into`; returns objects copied.

    Both layouts come down as they are: one chain's files, or a fleet's `<instance>/` folders.
    """
    bucket, prefix = parse_s3_url(url)
    client = client_factory()
    base = f"{prefix}/" if prefix else ""
    copied = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        for item in page.get("Contents", []):
            relative = item["Key"][len(base) :]
            # Only names we produce are fetched: a key like "../x" can never leave `into`.
            if _is_log_file(relative) or _is_fleet_file(relative):
                target = into / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                target.write_bytes(body)
                copied += 1
    return copied


def _is_log_file(relative: str) -> bool:
    """A segment, checkpoint or latest-checkpoint.json, relative to one chain's folder."""
    parts = relative.split("/")
    if len(parts) == 1:
        return segment_first_seq(parts[0]) is not None or parts[0] == LATEST_NAME
    return len(parts) == 2 and parts[0] == CHECKPOINT_DIR and bool(CHECKPOINT_RE.match(parts[1]))


def _is_fleet_file(relative: str) -> bool:
    instance, _, rest = relative.partition("/")
    return (
        instance != CHECKPOINT_DIR
        and INSTANCE_RE.match(instance) is not None
        and _is_log_file(rest)
    )
