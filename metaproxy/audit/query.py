"""Answers the security team's questions from a log directory or its S3 copy.

"Who had role X at 14:02?" is `--role X --at 14:02`: records whose credentials were valid
then (issued at or before, expiring after). "Which task owned ASIA…?" is `--access-key-id`.
Query reads records as stored; run `metaproxy audit verify` first to know they are genuine.
A fleet's folder (or prefix) answers for every replica at once, merged in time order.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from metaproxy.audit.layout import MixedLayout, chain_dirs, resolve_layout
from metaproxy.audit.names import sorted_segments
from metaproxy.logs import printable

TABLE_COLUMNS: Final = (
    "seq",
    "time",
    "event",
    "tenant",
    "task",
    "role_arn",
    "session_name",
    "access_key_id",
    "expiration",
    "rule",
    "reason",
    "instance",
    "operator",
    "request_id",
)
GRANTING_EVENTS: Final = frozenset({"issued", "refreshed"})


def parse_time(text: str) -> datetime:
    """ISO 8601 (date, minutes, seconds, `Z` or offset); a time without a zone is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _record_time(record: dict[str, object], key: str) -> datetime | None:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        return None
    try:
        return parse_time(value)
    except ValueError:
        return None


def role_matches(wanted: str, role_arn: str) -> bool:
    """A full ARN must match exactly; a bare name matches the ARN's last path element."""
    if not role_arn:
        return False
    if ":" in wanted:
        return wanted == role_arn
    return role_arn.rsplit("/", 1)[-1] == wanted


@dataclass(frozen=True, slots=True)
class QueryFilter:
    task: str = ""
    tenant: str = ""
    role: str = ""
    access_key_id: str = ""
    event: str = ""
    since: datetime | None = None
    until: datetime | None = None
    at: datetime | None = None  # credentials valid at this moment

    def matches(self, record: dict[str, object]) -> bool:
        fields_match = all(
            not wanted or record.get(key, "") == wanted
            for key, wanted in (
                ("task", self.task),
                ("tenant", self.tenant),
                ("access_key_id", self.access_key_id),
                ("event", self.event),
            )
        )
        if not fields_match:
            return False
        if self.role and not role_matches(self.role, str(record.get("role_arn", ""))):
            return False
        return self._time_matches(record)

    def _time_matches(self, record: dict[str, object]) -> bool:
        when = _record_time(record, "time")
        if when is None:
            return self.since is None and self.until is None and self.at is None
        if (self.since is not None and when < self.since) or (
            self.until is not None and when > self.until
        ):
            return False
        if self.at is None:
            return True
        expires = _record_time(record, "expiration")
        return (
            record.get("event") in GRANTING_EVENTS
            and expires is not None
            and when <= self.at < expires
        )


def iter_records(directory: Path) -> Iterator[dict[str, object]]:
    """Records in chain order; lines that are not JSON objects are skipped (verify reports them)."""
    for _, path in sorted_segments(directory):
        with path.open("rb") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record


def query_dir(
    directory: Path, where: QueryFilter, *, fleet: bool | None = None
) -> list[dict[str, object]]:
    """Matching records of one chain in chain order, or of a fleet in time order.

    `fleet=None` tells the layouts apart, and raises `layout.MixedLayout` for a folder holding
    both. In a fleet a record without an `instance` gets its replica's folder name, so every
    answer says which broker decided.
    """
    if resolve_layout(directory, fleet) == "chain":
        return [record for record in iter_records(directory) if where.matches(record)]
    found: list[tuple[datetime, str, int, dict[str, object]]] = []
    for replica in chain_dirs(directory):
        for record in iter_records(replica):
            if where.matches(record):
                record.setdefault("instance", replica.name)
                seq = record.get("seq")
                position = seq if isinstance(seq, int) else 0
                when = _record_time(record, "time") or _UNDATED
                found.append((when, replica.name, position, record))
    # Ties broken by replica and seq: one replica's records keep their chain order.
    found.sort(key=lambda item: item[:3])
    return [record for *_, record in found]


_UNDATED: Final = datetime.min.replace(tzinfo=UTC)


def query_s3(
    url: str, where: QueryFilter, client_factory: Callable[[], Any], *, fleet: bool | None = None
) -> list[dict[str, object]]:
    from metaproxy.audit.s3copy import download_s3

    with tempfile.TemporaryDirectory(prefix="metaproxy-audit-") as tmp:
        download_s3(url, client_factory, Path(tmp))
        try:
            return query_dir(Path(tmp), where, fleet=fleet)
        except MixedLayout as exc:
            raise MixedLayout(str(exc).replace(tmp, url, 1)) from None


def format_table(records: list[dict[str, object]]) -> str:
    rows = [[_cell(record.get(column, "")) for column in TABLE_COLUMNS] for record in records]
    widths = [
        max([len(column), *(len(row[i]) for row in rows)]) for i, column in enumerate(TABLE_COLUMNS)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(TABLE_COLUMNS, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def _cell(value: object) -> str:
    # Records are attacker-influenced (task names, reasons): no control characters on a terminal.
    return printable(str(value))
