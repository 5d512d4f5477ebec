"""agents/consumer_drain.py: faust's record hand-off, one race per fetched batch."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from mode import Service

from agents import consumer_drain

# faust 0.15.3's Consumer._drain_messages, which drain_messages re-states: a faust upgrade that
# changes it fails here, so the copy is reviewed against the new upstream before it runs.
UPSTREAM_SHA256 = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"


def test_the_upstream_loop_is_the_one_this_copy_was_written_against() -> None:
    source = inspect.getsource(consumer_drain.UPSTREAM)
    assert hashlib.sha256(source.encode()).hexdigest() == UPSTREAM_SHA256


@dataclass(frozen=True)
class Msg:
    topic: str
    offset: int


class FakeConsumer(Service):
    """The attributes of faust's Consumer that the drain loop touches, around real mode
    Service machinery (wait_first, sleep, stop flags)."""

    consumer_stopped_errors = (RuntimeError,)

    def __init__(self, batches: list[list[Msg]], on_record: Callable[[FakeConsumer, Msg], Any]) -> None:
        super().__init__()
        self.batches = batches
        self.on_record = on_record
        self.delivered: list[Msg] = []
        self.commits = 0
        self._read_offset: defaultdict[str, int | None] = defaultdict(lambda: None)
        self._commit_every = 2
        self._n_acked = 0
        self.suspend_flow = asyncio.Event()
        self.diag = SimpleNamespace(set_flag=lambda flag: None, unset_flag=lambda flag: None)
        self.app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True), rebalancing=False,
                                   tables=SimpleNamespace(changelog_topics={"t-changelog"}))
        self.rebalancing_at_delivery: list[bool] = []
        self.transport = SimpleNamespace(app=SimpleNamespace(should_stop=True))
        self.gaps: list[tuple[int, int]] = []
        self.fetches_completed = 0

    async def callback(self, message: Msg) -> None:
        await self.on_record(self, message)
        self.delivered.append(message)
        self.rebalancing_at_delivery.append(self.app.rebalancing)
        self._n_acked += 1

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[str, Msg]]:
        if not self.batches:
            self._stopped.set()
            return
        batch = self.batches.pop(0)
        await self.fetching(self)
        for message in batch:
            yield message.topic, message  # the topic stands for the partition
        self.fetches_completed += 1

    async def fetching(self, consumer: FakeConsumer) -> None:
        await asyncio.sleep(0)

    async def commit(self) -> None:
        self.commits += 1

    async def _add_gap(self, tp: str, start: int, end: int) -> None:
        self.gaps.append((start, end))


async def run(consumer: FakeConsumer) -> None:
    fetcher = Service()
    await asyncio.wait_for(consumer_drain.drain_messages(consumer, fetcher), 5)


async def passes(consumer: FakeConsumer, message: Msg) -> None:
    return None


@pytest.mark.asyncio
async def test_every_record_is_delivered_in_order_and_offsets_follow() -> None:
    consumer = FakeConsumer([[Msg("t", 0), Msg("t", 1), Msg("t", 2)], [Msg("t", 3), Msg("t", 6)]], passes)
    await run(consumer)
    assert [m.offset for m in consumer.delivered] == [0, 1, 2, 3, 6]
    assert consumer._read_offset["t"] == 6
    assert consumer.gaps == [(4, 6)]  # a hole in the offsets is recorded, as upstream
    assert consumer.commits == 2  # every commit_every acked records


@pytest.mark.asyncio
async def test_records_behind_the_read_offset_are_not_delivered_again() -> None:
    consumer = FakeConsumer([[Msg("t", 0), Msg("t", 1)], [Msg("t", 0), Msg("t", 2)]], passes)
    await run(consumer)
    assert [m.offset for m in consumer.delivered] == [0, 1, 2]


@pytest.mark.asyncio
async def test_a_rebalance_interrupts_a_blocked_delivery_and_skips_nothing_it_did_not_deliver() -> None:
    async def blocks_on_second(consumer: FakeConsumer, message: Msg) -> None:
        if message.offset == 1:
            consumer.suspend_flow.set()  # a rebalance while the stream buffer is full
            await asyncio.Event().wait()

    consumer = FakeConsumer([[Msg("t", 0), Msg("t", 1), Msg("t", 2)]], blocks_on_second)
    await run(consumer)
    assert [m.offset for m in consumer.delivered] == [0]
    # not advanced past what was delivered: the reassigned consumer fetches 1 and 2 again
    assert consumer._read_offset["t"] == 0


@pytest.mark.asyncio
async def test_an_error_in_delivery_reaches_the_consumer_as_upstream() -> None:
    async def fails(consumer: FakeConsumer, message: Msg) -> None:
        raise ValueError("decode failed")

    consumer = FakeConsumer([[Msg("t", 0)]], fails)
    with pytest.raises(ValueError, match="decode failed"):
        await run(consumer)


@pytest.mark.asyncio
async def test_a_rebalance_during_the_fetch_does_not_cancel_the_fetch() -> None:
    # faust's getmany seeks back to the committed offsets when the flow stopped while it
    # fetched; cancelling it there (as the first version of drain_messages did) lost the batch
    consumer = FakeConsumer([[Msg("t", 0), Msg("t", 1)]], passes)

    async def rebalance_midway(c: FakeConsumer) -> None:
        c.suspend_flow.set()
        await asyncio.sleep(0.01)

    consumer.fetching = rebalance_midway  # type: ignore[method-assign]
    await run(consumer)
    assert consumer.fetches_completed == 1
    assert consumer.delivered == []  # the flow is suspended: nothing handed over
    assert consumer._read_offset["t"] is None  # so nothing is skipped when it is fetched again


@pytest.mark.asyncio
async def test_a_rebalance_during_a_commit_does_not_cancel_the_commit() -> None:
    # upstream commits outside its per-record race; a commit cancelled half-way would leave
    # faust's acked-offset bookkeeping behind the broker's
    consumer = FakeConsumer([[Msg("t", 0), Msg("t", 1), Msg("t", 2), Msg("t", 3)]], passes)
    finished: list[int] = []

    async def slow_commit() -> None:
        consumer.suspend_flow.set()  # a rebalance begins while the commit is in flight
        await asyncio.sleep(0.01)
        consumer.commits += 1
        finished.append(consumer._n_acked)

    consumer.commit = slow_commit  # type: ignore[method-assign]
    await run(consumer)
    assert finished == [0]  # it ran to the end, once, after two records were acked
    assert [m.offset for m in consumer.delivered] == [0, 1]  # then nothing more was handed over
    assert consumer._read_offset["t"] == 1


@pytest.mark.asyncio
async def test_a_stream_record_fetched_while_rebalancing_is_handed_over_once_the_rebalance_is_over() -> None:
    # A stage with a table reads its changelog with the flow resumed; its stream partitions are
    # resumed and seeked before faust empties the stream queues (flow_control.resume) and ends
    # the rebalance. A stream record handed over in that window was emptied away with the fetch
    # position already past it: the restarted sampler stalled on 14 of them.
    consumer = FakeConsumer([[Msg("t-changelog", 0), Msg("t", 5), Msg("t-changelog", 1)]], passes)
    consumer.app.rebalancing = True

    async def finish_rebalance() -> None:
        await asyncio.sleep(0.05)
        consumer.app.rebalancing = False

    ending = asyncio.create_task(finish_rebalance())
    await run(consumer)
    await ending
    assert [(m.topic, m.offset) for m in consumer.delivered] == [("t-changelog", 0), ("t", 5), ("t-changelog", 1)]
    # the changelog record at once (the recovery waits for it), the stream record only after
    assert consumer.rebalancing_at_delivery == [True, False, False]
    assert consumer._read_offset["t"] == 5


@pytest.mark.asyncio
async def test_a_new_rebalance_while_a_record_is_held_hands_nothing_more_over() -> None:
    consumer = FakeConsumer([[Msg("t", 5), Msg("t", 6)]], passes)
    consumer.app.rebalancing = True

    async def rebalance_again() -> None:
        await asyncio.sleep(0.05)
        consumer.suspend_flow.set()

    again = asyncio.create_task(rebalance_again())
    await run(consumer)
    await again
    assert consumer.delivered == []
    assert consumer._read_offset["t"] is None  # fetched again after the reassignment, from the committed offset
