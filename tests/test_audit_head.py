"""The chain head as a value: linking records in any batches gives one chain, and a failed
batch settles where its last record on disk says. No disk, no clock."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaproxy.audit import chain
from metaproxy.audit.head import Batch, ChainHead, link_batch

bodies = st.lists(
    st.dictionaries(
        st.sampled_from(["event", "tenant", "task", "reason", "status"]),
        st.one_of(st.text(max_size=40), st.integers(0, 999)),
        min_size=1,
    ),
    max_size=40,
)
# No per-example deadline: these check values, not speed, and a loaded CI machine can pause any
# example past hypothesis's default 200 ms.
unhurried = settings(deadline=None)
heads = st.builds(
    ChainHead,
    next_seq=st.integers(chain.FIRST_SEQ, 10**9),
    hash=st.text("0123456789abcdef", min_size=64, max_size=64),
)


def linked_one_by_one(
    head: ChainHead, records: Sequence[dict[str, object]]
) -> list[dict[str, object]]:
    chained = []
    for body in records:
        record, head = head.link(body)
        chained.append(record)
    return chained


def batches(
    head: ChainHead, records: Sequence[dict[str, object]], max_bytes: int, every: int | None
) -> list[Batch]:
    """Link everything, batch after batch, as the writer's group commit does."""
    done: list[Batch] = []
    while len(records) > 0:
        last_seq = None if every is None else head.next_seq + every - 1
        batch = link_batch(head, records, max_bytes=max_bytes, last_seq=last_seq)
        done.append(batch)
        head, records = batch.end, records[len(batch.records) :]
    return done


@unhurried
@given(heads, bodies, st.integers(1, 2000), st.one_of(st.none(), st.integers(1, 7)))
def test_any_batching_links_the_same_chain_as_one_record_at_a_time(
    head: ChainHead, records: list[dict[str, object]], max_bytes: int, every: int | None
) -> None:
    """Where the batches are cut changes no byte of the chain."""
    linked = [
        record for batch in batches(head, records, max_bytes, every) for record in batch.records
    ]
    assert linked == linked_one_by_one(head, records)


@unhurried
@given(heads, bodies, st.integers(1, 2000), st.one_of(st.none(), st.integers(1, 7)))
def test_every_batch_holds_consecutive_verifiable_records_and_their_exact_lines(
    head: ChainHead, records: list[dict[str, object]], max_bytes: int, every: int | None
) -> None:
    """Each record links to the one before and hashes right; a batch stores exactly its lines."""
    for batch in batches(head, records, max_bytes, every):
        previous = batch.start
        for record in batch.records:
            assert (record["seq"], record["prev"]) == (previous.next_seq, previous.hash)
            assert chain.self_consistent(record, chain.record_line(record)[:-1])
            previous = ChainHead.after(record)
        assert batch.end == previous
        assert batch.data == b"".join(chain.record_line(r) for r in batch.records)


@unhurried
@given(heads, bodies, st.integers(1, 2000), st.integers(1, 7))
def test_a_batch_ends_at_its_byte_bound_and_at_the_checkpoint_seq(
    head: ChainHead, records: list[dict[str, object]], max_bytes: int, every: int
) -> None:
    """Only a batch's first record may start at or past max_bytes or pass last_seq, and a batch
    stops only at one of those bounds or at the end of the queue."""
    done = batches(head, records, max_bytes, every)
    for index, batch in enumerate(done):
        last_seq = batch.start.next_seq + every - 1
        lines = [chain.record_line(r) for r in batch.records]
        starts = [sum(map(len, lines[:i])) for i in range(len(lines))]
        assert all(start < max_bytes for start in starts[1:])
        assert all(r["seq"] <= last_seq for r in batch.records[1:])  # type: ignore[operator]
        if index < len(done) - 1:  # cut early: the next record would have crossed a bound
            assert sum(map(len, lines)) >= max_bytes or batch.end.next_seq > last_seq


@unhurried
@given(heads, bodies.filter(bool), st.data())
def test_a_failed_batch_settles_after_its_last_record_on_disk(
    head: ChainHead, records: list[dict[str, object]], data: st.DataObject
) -> None:
    """Any prefix of the batch on disk: the chain goes on right after it, as if that prefix
    alone had been written."""
    before, head = head.link({"event": "issued"})
    batch = link_batch(head, records, max_bytes=1 << 30)
    landed = data.draw(st.integers(0, len(batch.records)))
    last = batch.records[landed - 1] if landed else before
    expected = batch.start
    for record in batch.records[:landed]:
        expected = ChainHead.after(record)
    assert batch.settled(last) == expected


@unhurried
@given(heads, bodies.filter(bool))
def test_a_tail_from_another_chain_settles_nowhere(
    head: ChainHead, records: list[dict[str, object]]
) -> None:
    """A last record that is neither the batch's nor the one before it means the disk holds
    another chain: there is no head to continue from."""
    batch = link_batch(head, records, max_bytes=1 << 30)
    stranger, _ = ChainHead(head.next_seq, chain.ZERO_HASH[:-1] + "1").link(records[0])
    assert batch.settled(stranger) is None
    assert batch.settled({**batch.records[-1], "hash": chain.ZERO_HASH}) is None


def test_the_first_record_of_a_chain_links_to_zero() -> None:
    """A new chain starts at seq 1 with prev all zeros; `after` reads the head back."""
    record, head = ChainHead().link({"event": "issued"})
    assert (record["seq"], record["prev"]) == (1, chain.ZERO_HASH)
    assert head == ChainHead.after(record) == ChainHead(2, str(record["hash"]))
    assert head.seq == 1 and head.is_at(record)


def test_after_refuses_a_record_without_an_integer_seq() -> None:
    """A seq of another type (true, "3") is not a place in the chain."""
    with pytest.raises(ValueError, match="seq"):
        ChainHead.after({"seq": True, "hash": chain.ZERO_HASH})
