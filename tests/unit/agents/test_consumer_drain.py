"""agents/consumer_drain.py: faust's record hand-off, one race per fetched batch; the fetch and the
seek after a rebalance that keep the fetch position from passing a record no stream was handed."""

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
from faust.types import TP
from mode import Service

from agents import consumer_drain

# faust 0.15.3's Consumer._drain_messages, which drain_messages re-states: a faust upgrade that
# changes it fails here, so the copy is reviewed against the new upstream before it runs.
UPSTREAM_SHA256 = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"
# ... and ThreadDelegateConsumer._getmany and Consumer.perform_seek, which fetch_active and
# perform_seek replace
UPSTREAM_GETMANY_SHA256 = "f9d47aa9010b5ff2b874ba65f927871f3612718d8a9db00b58601554a35236c4"
UPSTREAM_PERFORM_SEEK_SHA256 = "0e8c130ff4b0afd82c0be9c5fd831316e10febc62c94032833911096e156d7c6"


@pytest.mark.parametrize(("upstream", "sha256"), [
    (consumer_drain.UPSTREAM, UPSTREAM_SHA256),
    (consumer_drain.UPSTREAM_GETMANY, UPSTREAM_GETMANY_SHA256),
    (consumer_drain.UPSTREAM_PERFORM_SEEK, UPSTREAM_PERFORM_SEEK_SHA256),
])
def test_the_upstream_code_is_the_one_these_copies_were_written_against(upstream: Any, sha256: str) -> None:
    source = inspect.getsource(upstream)
    assert hashlib.sha256(source.encode()).hexdigest() == sha256


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


# ---------------------------------------------------------------- the fetch (faust's _getmany)

STREAM, CHANGELOG = TP("t", 2), TP("t-changelog", 0)


class FakeFetcher:
    """aiokafka's fetched_records as faust's consumer thread calls it: it reads the partition set
    only once records are there, an empty set meaning every partition, and returning a record
    moves that partition's position past it."""

    def __init__(self, buffered: dict[TP, list[int]]) -> None:
        self.buffered = buffered
        self.records_arrive = asyncio.Event()
        self.asked: list[set[TP] | None] = []

    async def getmany(self, partitions: set[TP] | None, timeout: float) -> dict[TP, list[int]]:
        self.asked.append(partitions)
        await asyncio.wait_for(self.records_arrive.wait(), timeout)
        taken = {tp: offsets for tp, offsets in self.buffered.items() if not partitions or tp in partitions}
        for tp in taken:
            del self.buffered[tp]
        return taken


def fetching_consumer(fetcher: FakeFetcher, *, rebalancing: bool) -> Any:
    return SimpleNamespace(_thread=fetcher, app=SimpleNamespace(
        rebalancing=rebalancing, tables=SimpleNamespace(changelog_topics={CHANGELOG.topic})))


async def recovery_pauses_the_changelog(fetch: Any, active: set[TP], fetcher: FakeFetcher) -> Any:
    """A fetch waits with only the changelog partition active; the recovery has read the
    changelog and pauses it (faust's set is now empty) before a stream record arrives."""
    waiting = asyncio.create_task(fetch(fetching_consumer(fetcher, rebalancing=True), active, 1.0))
    await asyncio.sleep(0.01)
    active.discard(CHANGELOG)  # Recovery: consumer.pause_partitions(active changelog partitions)
    fetcher.records_arrive.set()
    return await waiting


@pytest.mark.asyncio
async def test_upstream_took_a_paused_stream_partitions_record_once_its_set_of_partitions_was_empty() -> None:
    # what a restarted ingest did: the record left aiokafka (its position past it), and faust's
    # getmany dropped it since the partition was not active; nothing sought back a partition
    # without a committed offset
    fetcher = FakeFetcher({STREAM: [0]})
    taken = await recovery_pauses_the_changelog(consumer_drain.UPSTREAM_GETMANY, {CHANGELOG}, fetcher)
    assert taken == {STREAM: [0]}


@pytest.mark.asyncio
async def test_a_fetch_asks_for_a_copy_of_the_active_partitions_so_a_paused_one_keeps_its_records() -> None:
    fetcher = FakeFetcher({STREAM: [0]})
    active = {CHANGELOG}
    taken = await recovery_pauses_the_changelog(consumer_drain.fetch_active, active, fetcher)
    assert taken == {}
    assert fetcher.asked == [{CHANGELOG}] and fetcher.asked[0] is not active
    assert fetcher.buffered == {STREAM: [0]}  # still in aiokafka, read once the stream is resumed


@pytest.mark.asyncio
async def test_while_rebalancing_only_the_changelog_is_fetched() -> None:
    # the recovery resumes the stream partitions, then seeks them and ends the rebalance: a
    # stream record fetched in between would come from before the seek
    fetcher = FakeFetcher({STREAM: [7], CHANGELOG: [3]})
    fetcher.records_arrive.set()
    taken = await consumer_drain.fetch_active(fetching_consumer(fetcher, rebalancing=True), {STREAM, CHANGELOG}, 1.0)
    assert taken == {CHANGELOG: [3]}
    assert fetcher.asked == [{CHANGELOG}]


@pytest.mark.asyncio
async def test_nothing_is_fetched_when_no_partition_may_be() -> None:
    fetcher = FakeFetcher({STREAM: [7]})
    taken = await consumer_drain.fetch_active(fetching_consumer(fetcher, rebalancing=True), {STREAM}, 1.0)
    assert taken == {} and fetcher.asked == []


@pytest.mark.asyncio
async def test_once_the_rebalance_is_over_every_active_partition_is_fetched() -> None:
    fetcher = FakeFetcher({STREAM: [7], CHANGELOG: [3]})
    fetcher.records_arrive.set()
    active = {STREAM, CHANGELOG}
    taken = await consumer_drain.fetch_active(fetching_consumer(fetcher, rebalancing=False), active, 1.0)
    assert taken == {STREAM: [7], CHANGELOG: [3]}
    assert fetcher.asked == [active] and fetcher.asked[0] is not active


@pytest.mark.asyncio
async def test_a_client_only_app_fetches_every_partition_as_upstream() -> None:
    fetcher = FakeFetcher({STREAM: [7]})
    fetcher.records_arrive.set()
    taken = await consumer_drain.fetch_active(fetching_consumer(fetcher, rebalancing=False), None, 1.0)
    assert taken == {STREAM: [7]} and fetcher.asked == [None]


# ---------------------------------------------------------------- the seek after a rebalance

class SeekingConsumer:
    """What faust's perform_seek touches: aiokafka's seek_to_committed (which seeks only the
    partitions committed past 0) and, for the replacement, the thread's seek_to_beginning."""

    def __init__(self, committed: dict[TP, int | None]) -> None:
        self.committed = committed
        self._read_offset: dict[TP, int | None] = {}
        self._committed_offset: defaultdict[TP, int | None] = defaultdict(lambda: None)
        self.app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: topic != "unacked"),
                                   tables=SimpleNamespace(changelog_topics={CHANGELOG.topic}))
        self.to_beginning: list[TP] = []
        self._thread = SimpleNamespace(seek_to_beginning=self.seek_to_beginning)

    async def seek_to_committed(self) -> dict[TP, int | None]:
        return dict(self.committed)

    async def seek_to_beginning(self, *partitions: TP) -> None:
        self.to_beginning.extend(partitions)


COMMITTED: dict[TP, int | None] = {TP("t", 0): 5, TP("t", 1): None, TP("t", 2): 0, CHANGELOG: None,
                                   TP("unacked", 0): None}


@pytest.mark.asyncio
async def test_after_a_rebalance_a_stream_partition_without_a_commit_is_read_from_its_beginning() -> None:
    # aiokafka's seek_to_committed leaves it where the fetch left it: past what faust dropped there
    consumer = SeekingConsumer(COMMITTED)
    await consumer_drain.perform_seek(consumer)
    assert sorted(consumer.to_beginning) == [TP("t", 1), TP("t", 2)]  # not the changelog, not an unacked topic


@pytest.mark.asyncio
async def test_the_seek_keeps_upstreams_offset_bookkeeping() -> None:
    ours, upstream = SeekingConsumer(COMMITTED), SeekingConsumer(COMMITTED)
    await consumer_drain.perform_seek(ours)
    await consumer_drain.UPSTREAM_PERFORM_SEEK(upstream)
    assert ours._read_offset == upstream._read_offset
    assert dict(ours._committed_offset) == dict(upstream._committed_offset)
    assert upstream.to_beginning == []  # what upstream missed


@pytest.mark.asyncio
async def test_with_every_stream_partition_committed_the_seek_is_upstreams() -> None:
    consumer = SeekingConsumer({TP("t", 0): 5, TP("t", 1): 9, CHANGELOG: None})
    await consumer_drain.perform_seek(consumer)
    assert consumer.to_beginning == []


class RecordingIntake:
    """The stage's intake (agents/intake.py) as the drain loop sees it: `topic` and `put`."""

    def __init__(self, topic: str, capacity: int) -> None:
        self.topic = topic
        self.capacity = capacity
        self.records: list[Msg] = []

    async def put(self, message: Msg) -> None:
        while len(self.records) >= self.capacity:
            await asyncio.sleep(0.01)  # never drained here: a stage holding its input
        self.records.append(message)


@pytest.mark.asyncio
async def test_the_stage_input_goes_to_its_intake_and_changelog_records_to_faust() -> None:
    consumer = FakeConsumer([[Msg("t", 0), Msg("t-changelog", 0), Msg("t", 1)]], passes)
    intake = RecordingIntake("t", capacity=10)
    consumer.app.intake = intake
    await run(consumer)
    assert [(m.topic, m.offset) for m in intake.records] == [("t", 0), ("t", 1)]
    assert [(m.topic, m.offset) for m in consumer.delivered] == [("t-changelog", 0)]
    assert consumer._read_offset["t"] == 1


@pytest.mark.asyncio
async def test_a_rebalance_interrupts_a_wait_for_room_in_a_full_intake_and_skips_nothing() -> None:
    consumer = FakeConsumer([[Msg("t", 0), Msg("t", 1), Msg("t", 2)]], passes)
    consumer.app.intake = RecordingIntake("t", capacity=1)

    async def rebalance_soon() -> None:
        await asyncio.sleep(0.05)
        consumer.suspend_flow.set()

    await asyncio.gather(run(consumer), rebalance_soon())
    assert [m.offset for m in consumer.app.intake.records] == [0]
    # the position faust seeks back from: 1 and 2 were never handed over, so they come again
    assert consumer._read_offset["t"] == 0
