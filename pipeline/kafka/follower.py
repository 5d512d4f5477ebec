"""Following a whole topic outside any consumer group, so every replica sees every record.

This is how replicas share a decision state (the sampler's novelty window, the breaker) through
a topic: each one folds the same records, in the same order, into the same state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.clock import Clock, SystemClock
from pipeline.config import Config
from pipeline.kafka.admin import topic_partitions
from pipeline.kafka.security import KafkaAccess, client_settings

log = logging.getLogger(__name__)
FETCH_BYTES = 16 * 1024 * 1024


class TopicFollower:
    """Reads a whole topic outside any consumer group, from `horizon_ms` ago or from the start,
    into `apply`; `ready` is set once it has caught up with the end it saw at start. `kafka` is
    how its process connects (a stage's `agents.runtime.follow` gives it the app's)."""

    def __init__(self, config: Config, name: str, apply: Callable[[bytes], Awaitable[None]],
                 horizon_ms: int | None = None, *, ready: asyncio.Event | None = None,
                 clock: Clock | None = None, kafka: KafkaAccess | None = None) -> None:
        self.config, self.name, self.apply, self.horizon_ms = config, name, apply, horizon_ms
        self.kafka = kafka
        self.ready = ready if ready is not None else asyncio.Event()
        self.clock = clock or SystemClock()
        self.applied = 0

    async def run(self) -> None:
        if self.kafka is None:
            raise RuntimeError(f"the follower of {self.name} was not given its process's Kafka access")
        consumer = AIOKafkaConsumer(**client_settings(self.kafka), group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    max_partition_fetch_bytes=FETCH_BYTES)
        await consumer.start()
        try:
            parts = await topic_partitions(consumer, [self.name]) or [TopicPartition(self.name, 0)]
            consumer.assign(parts)
            ends = await consumer.end_offsets(parts)
            if self.horizon_ms is None:
                await consumer.seek_to_beginning(*parts)
            else:
                since = self.clock.now_ms() - self.horizon_ms
                starts = await consumer.offsets_for_times({tp: since for tp in parts})
                for tp in parts:
                    consumer.seek(tp, starts[tp].offset if starts.get(tp) else ends[tp])
            while True:
                batch = await consumer.getmany(timeout_ms=100)
                for msgs in batch.values():
                    for msg in msgs:
                        await self.apply(msg.value)
                        self.applied += 1
                if not self.ready.is_set() and all([await consumer.position(tp) >= ends[tp] for tp in parts]):
                    self.ready.set()
                    log.info("caught up with %s (%d records)", self.name, self.applied)
        finally:
            await consumer.stop()
