"""Reading a topic's history without a consumer group: between two instants, what `pipeline
replay` reads (sessions.idle for the window, sampler.shipped before it, traces.sampled during it);
one record at a time by where it is (`RecordReader`: a pair partner's snapshot).

The window is found per partition with the broker's time index (`offsets_for_times`: the first
offset whose record timestamp is at or after the instant), and bounded by the end offsets when
the read starts, so a read of a live topic ends. Nothing joins a group or commits: the live
stages' groups and offsets are untouched.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.kafka.admin import DEFAULT_TIMEOUT_S, broker_calls, start_client, topic_partitions
from pipeline.kafka.security import KafkaAccess, client_settings

FETCH_MAX_RECORDS = 500
SLICE_MS = 60_000  # a time-ordered read holds one minute of records at a time


@dataclass(frozen=True)
class Stored:
    """One record as stored: where it is, when it was written (epoch ms), its key and value."""

    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes


Each = Callable[[Stored], "Awaitable[None] | None"]


async def _call(each: Each, stored: Stored) -> None:
    result = each(stored)
    if inspect.isawaitable(result):
        await result


async def read_between(kafka: KafkaAccess | str, topic: str, from_ms: int | None, to_ms: int | None,
                       each: Each, *, progress: Callable[[int, int], None] | None = None,
                       in_time_order: bool = False, slice_ms: int = SLICE_MS,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """Call `each` for every record of `topic` written at or after `from_ms` (None: from the log
    start) and before `to_ms` (None: up to the end when the read began). Partition by partition
    in offset order; with `in_time_order`, across partitions in timestamp order (then partition,
    offset), a `slice_ms` of time at a time, so memory holds one slice. `each` may be a coroutine
    function (awaited before the next record). `progress(read, total)` after each fetch. Returns
    how many were read."""
    consumer = AIOKafkaConsumer(**client_settings(kafka), group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_poll_records=FETCH_MAX_RECORDS,
                                request_timeout_ms=int(timeout_s * 1000) + 30_000)
    await start_client(consumer, kafka, timeout_s)
    try:
        partitions = await topic_partitions(consumer, [topic])
        if not partitions:
            return 0
        starts = await _offsets_at(consumer, partitions, from_ms, "start")
        stops = await _offsets_at(consumer, partitions, to_ms, "end")
        total = sum(max(0, stops[tp] - starts[tp]) for tp in partitions)
        counted = [0]

        async def counting(stored: Stored) -> None:
            await _call(each, stored)
            counted[0] += 1

        def tick() -> None:
            if progress:
                progress(counted[0], total)

        tick()
        if not in_time_order:
            await _read_ranges(consumer, {tp: (starts[tp], stops[tp]) for tp in partitions}, counting, tick)
            return counted[0]
        at = await _next_timestamp(consumer, starts, stops)
        while at is not None:
            upto = await _offsets_at(consumer, partitions, at + slice_ms, "end")
            ends = {tp: min(upto[tp], stops[tp]) for tp in partitions}
            held: list[Stored] = []
            await _read_ranges(consumer, {tp: (starts[tp], ends[tp]) for tp in partitions}, held.append, tick)
            for stored in sorted(held, key=lambda r: (r.timestamp, r.partition, r.offset)):
                await counting(stored)
            tick()
            starts = ends
            # an empty slice (a quiet spell) jumps to the next record instead of a minute at a time
            at = at + slice_ms if held else await _next_timestamp(consumer, starts, stops)
            if all(starts[tp] >= stops[tp] for tp in partitions):
                break
        return counted[0]
    finally:
        await consumer.stop()


async def _read_ranges(consumer: AIOKafkaConsumer, ranges: dict[TopicPartition, tuple[int, int]],
                       each: Each, tick: Callable[[], None]) -> None:
    """Every record in [start, stop) of each partition, in offset order per partition."""
    todo = {tp: bounds for tp, bounds in ranges.items() if bounds[0] < bounds[1]}
    consumer.assign(list(todo))
    for tp, (start, _) in todo.items():
        consumer.seek(tp, start)
    while todo:
        batches = await consumer.getmany(*todo, timeout_ms=1000)
        for tp, records in batches.items():
            stop = todo[tp][1] if tp in todo else -1
            for record in records:
                if record.offset >= stop:
                    break
                await _call(each, Stored(tp.partition, record.offset, record.timestamp, record.key,
                                         record.value or b""))
        for tp in list(todo):
            if await consumer.position(tp) >= todo[tp][1]:
                del todo[tp]
        tick()


async def _next_timestamp(consumer: AIOKafkaConsumer, starts: dict[TopicPartition, int],
                          stops: dict[TopicPartition, int]) -> int | None:
    """The earliest timestamp among the first records of the partitions' ranges (None: all empty)."""
    firsts: list[Stored] = []
    ranges = {tp: (starts[tp], min(stops[tp], starts[tp] + 1)) for tp in starts}
    await _read_ranges(consumer, ranges, firsts.append, lambda: None)
    return min((r.timestamp for r in firsts), default=None)


async def _offsets_at(consumer: AIOKafkaConsumer, partitions: list[TopicPartition], at_ms: int | None,
                      default: str) -> dict[TopicPartition, int]:
    """Per partition, the first offset at or after `at_ms`; past the last record (or `at_ms` None),
    the log start (`default` "start") or the end offset (`default` "end")."""
    ends = await consumer.end_offsets(partitions)
    if at_ms is None:
        return dict(await consumer.beginning_offsets(partitions)) if default == "start" else dict(ends)
    found = await consumer.offsets_for_times({tp: at_ms for tp in partitions})
    return {tp: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in partitions}


class RecordReader:
    """Reads single records of one topic back by (partition, offset), without a consumer group:
    the sample stage reading a pair partner's snapshot. One consumer, started on first use, one
    read at a time (pairs are rare next to the records around them)."""

    def __init__(self, kafka: KafkaAccess | str, topic: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.kafka, self.topic, self.timeout_s = kafka, topic, timeout_s
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def read(self, partition: int, offset: int) -> bytes | None:
        """The value stored at `offset` of `partition`; None when it is no longer there (past
        retention) or was never written. BrokerError when the broker cannot be asked."""
        async with self._lock:
            consumer = await self._started()
            tp = TopicPartition(self.topic, partition)
            async with broker_calls(self.kafka, self.timeout_s):
                first = (await consumer.beginning_offsets([tp]))[tp]
                end = (await consumer.end_offsets([tp]))[tp]
                if not first <= offset < end:
                    return None
                consumer.assign([tp])
                consumer.seek(tp, offset)
                deadline = asyncio.get_running_loop().time() + self.timeout_s
                while asyncio.get_running_loop().time() < deadline:
                    batch = await consumer.getmany(tp, timeout_ms=500, max_records=1)
                    for record in batch.get(tp, []):
                        # a compacted or transactional log may skip offsets: past it, it is gone
                        return (record.value or b"") if record.offset == offset else None
            raise TimeoutError(f"{self.topic}[{partition}]@{offset} not read within {self.timeout_s:g}s")

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(**client_settings(self.kafka), group_id=None, enable_auto_commit=False,
                                        auto_offset_reset="earliest",
                                        request_timeout_ms=int(self.timeout_s * 1000) + 30_000)
            await start_client(consumer, self.kafka, self.timeout_s)
            self._consumer = consumer
        return self._consumer
