"""agents/stage.py StagedTable: writes reach the table only when their batch is flushed, in the
order the batches were handled, and reads see every write not yet flushed."""

from __future__ import annotations

import pytest

from agents.stage import StagedTable


@pytest.mark.asyncio
async def test_a_sealed_batch_is_read_through_until_flushed() -> None:
    table: dict[bytes, object] = {b"a": 1}
    state = StagedTable(table)
    state.stage(b"a", 2)
    first = state.seal()  # batch 1 handled, its outputs on their way
    state.stage(b"b", 3)  # batch 2 handled meanwhile
    state.delete(b"a")
    assert table == {b"a": 1}
    assert await state.get(b"a") is None and await state.get(b"b") == 3
    second = state.seal()
    state.flush(first)  # batch 1 acknowledged: only its writes reach the table
    assert table == {b"a": 2}
    assert await state.get(b"a") is None  # batch 2's deletion still wins
    assert sorted(state.items()) == [(b"b", 3)]
    state.flush(second)
    assert table == {b"b": 3}


@pytest.mark.asyncio
async def test_the_newest_sealed_write_wins_a_read() -> None:
    state = StagedTable({})
    state.stage(b"k", 1)
    state.seal()
    state.stage(b"k", 2)
    state.seal()
    assert await state.get(b"k") == 2
    assert state.items() == [(b"k", 2)]


def test_batches_are_flushed_in_the_order_they_were_handled() -> None:
    state = StagedTable({})
    state.stage(b"k", 1)
    first = state.seal()
    state.stage(b"k", 2)
    second = state.seal()
    with pytest.raises(ValueError, match="order"):
        state.flush(second)
    state.flush(first)
    state.flush(second)


def test_flush_without_a_batch_writes_everything_in_order() -> None:
    table: dict[bytes, object] = {}
    state = StagedTable(table)
    state.stage(b"k", 1)
    state.seal()
    state.stage(b"k", 2)
    state.flush()
    assert table == {b"k": 2} and not state.pending
