"""The chain head, and records joining it: pure values, no disk, no clock, no lock.

`ChainHead` is where an audit chain stands: the seq its next record gets and the hash that record
links to. `link_batch` links queued records to a head in arrival order, cut where a group commit
must end; `Batch.settled` works out where the chain stands after a write of a batch that failed
but may have stored any prefix of it, from the last whole record found on disk. The writer holds
the one current head and replaces it only once the disk confirms; tests/test_audit_head.py checks
these as properties.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from metaproxy.audit.chain import FIRST_SEQ, ZERO_HASH, record_hash, record_line


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The seq the next record gets and the hash it links to as `prev`."""

    next_seq: int = FIRST_SEQ
    hash: str = ZERO_HASH

    @property
    def seq(self) -> int:
        """The last record's seq; 0 before the first record."""
        return self.next_seq - 1

    @classmethod
    def after(cls, record: Mapping[str, object]) -> ChainHead:
        """The head just past a stored record (one `chain.self_consistent` accepted)."""
        seq = record["seq"]
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise ValueError("a record's seq must be an integer")
        return cls(seq + 1, str(record["hash"]))

    def is_at(self, record: Mapping[str, object]) -> bool:
        """Whether `record` is the last record of the chain this head ends."""
        return record.get("seq") == self.seq and record.get("hash") == self.hash

    def link(self, body: Mapping[str, object]) -> tuple[dict[str, object], ChainHead]:
        """`body` with its seq, prev and hash, and the head after it."""
        record = {**body, "seq": self.next_seq, "prev": self.hash}
        digest = record_hash(self.hash, record)
        record["hash"] = digest
        return record, ChainHead(self.next_seq + 1, digest)


@dataclass(frozen=True, slots=True)
class Batch:
    """Records linked to `start`, in order, and the bytes that store them (one line each)."""

    start: ChainHead
    end: ChainHead
    records: tuple[dict[str, object], ...]
    data: bytes

    def settled(self, last: Mapping[str, object]) -> ChainHead | None:
        """Where the chain stands after a failed write of this batch, judged by `last`, the last
        whole record on disk: past the last of the batch's records that reached the disk (its
        hash chains back through every earlier one), `start` if none did, None if `last` is
        neither ours nor the record before the batch (the chain on disk is not this one)."""
        seq = last.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            index = seq - self.start.next_seq
            if 0 <= index < len(self.records) and last.get("hash") == self.records[index]["hash"]:
                return ChainHead(seq + 1, str(last["hash"]))
        return self.start if self.start.is_at(last) else None


def link_batch(
    head: ChainHead,
    bodies: Sequence[Mapping[str, object]],
    *,
    max_bytes: int,
    last_seq: int | None = None,
) -> Batch:
    """Link the leading `bodies` to `head`, in order, as one batch.

    The batch ends before a record that would start at or past `max_bytes` of data, or that
    would get a seq past `last_seq`: rotation and checkpoints then fall between batches exactly
    where single writes put them. The first record always goes in, so a batch is never empty
    while `bodies` is not.
    """
    records: list[dict[str, object]] = []
    lines: list[bytes] = []
    size = 0
    end = head
    for body in bodies:
        if records and (size >= max_bytes or (last_seq is not None and end.next_seq > last_seq)):
            break
        record, end = end.link(body)
        line = record_line(record)
        records.append(record)
        lines.append(line)
        size += len(line)
    return Batch(head, end, tuple(records), b"".join(lines))
