"""Small aiokafka helpers for tests: produce raw records, read a topic, read committed offsets.
`bootstrap` is a plain broker's address or, for the secured broker, the `KafkaAccess` of a role."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import GroupCoordinatorNotAvailableError

from pipeline.kafka.admin import topic_partitions
from pipeline.kafka.security import KafkaAccess, client_settings
from pipeline.topics import MAX_MESSAGE_BYTES


async def produce(bootstrap: KafkaAccess | str, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(**client_settings(bootstrap), enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send(topic, value=value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def read_all(bootstrap: KafkaAccess | str, topic: str, expect: int, timeout_s: float = 60.0,
                   keep: Callable[[Any], bool] | None = None) -> list[Any]:
    """Read `topic` from the beginning until `expect` records arrived or the timeout. `keep`:
    count and return only the records it accepts (the session broker is shared: other tests'
    records are on the same topics)."""
    consumer = AIOKafkaConsumer(**client_settings(bootstrap), auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        parts = await topic_partitions(consumer, [topic])
        deadline = time.monotonic() + 10
        while not parts and time.monotonic() < deadline:  # a topic the test's stage creates itself
            await asyncio.sleep(0.2)
            parts = await topic_partitions(consumer, [topic])
        consumer.assign(parts)
        await consumer.seek_to_beginning()
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                out.extend(m for m in msgs if keep is None or keep(m))
        return out
    finally:
        await consumer.stop()


async def read_to_end(bootstrap: KafkaAccess | str, topic: str, timeout_s: float = 60.0) -> list[ConsumerRecord]:
    """Every record on `topic` up to its end offsets as they are now. Done by offsets, not by
    silence: a slow read must not pass for "nothing there" (TimeoutError instead)."""
    consumer = AIOKafkaConsumer(**client_settings(bootstrap), enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=2 * MAX_MESSAGE_BYTES,
                                fetch_max_bytes=4 * MAX_MESSAGE_BYTES)
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, [topic])
        deadline = time.monotonic() + 10
        while not tps and time.monotonic() < deadline:  # a topic a stage creates itself
            await asyncio.sleep(0.2)
            tps = await topic_partitions(consumer, [topic])
        consumer.assign(tps)
        ends, starts = await consumer.end_offsets(tps), await consumer.beginning_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        todo = {tp for tp in tps if ends[tp] > starts[tp]}
        out: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: could not read up to {ends}")
            for tp, msgs in (await consumer.getmany(*todo, timeout_ms=500)).items():
                out.extend(m for m in msgs if m.offset < ends[tp])
                if msgs and msgs[-1].offset >= ends[tp] - 1:
                    todo.discard(tp)
        return out
    finally:
        await consumer.stop()


def values(msgs: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(m.value) for m in msgs]


async def committed(bootstrap: KafkaAccess | str, group: str) -> dict[tuple[str, int], int]:
    admin = AIOKafkaAdminClient(**client_settings(bootstrap))
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}
    except GroupCoordinatorNotAvailableError:
        return {}  # the offsets topic is created on first use; nothing is committed yet
    finally:
        await admin.close()


async def end_offsets(bootstrap: KafkaAccess | str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(**client_settings(bootstrap), group_id=None)
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, [topic])
        consumer.assign(tps)
        return {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def forge_outbox(kafka: KafkaAccess | str) -> None:
    """Write a forged record to traces.outbox as `kafka` (what only the breaker stage may do):
    raises what the broker answers (a refused connection, an authorization error)."""
    producer = AIOKafkaProducer(**client_settings(kafka), request_timeout_ms=5000)
    try:
        await asyncio.wait_for(producer.start(), 15)
        await asyncio.wait_for(producer.send_and_wait("traces.outbox", b'{"forged": true}', key=b"x"), 15)
    finally:
        await producer.stop()
