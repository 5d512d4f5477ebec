"""Inspect and redrive dead letters: every stage's `*.dead` topic holds the original bytes and
the reason; redrive puts the original back on the topic the failing stage reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from pipeline.admin import topic_partitions
from pipeline.errors import ConfigError
from pipeline.records import original_bytes
from pipeline.topics import dead_letter_topics

REDRIVE_GROUP = "panel-pipeline-redrive"


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    record: dict[str, Any]


def _topics(topic: str | None) -> list[str]:
    known = dead_letter_topics()
    if topic is None:
        return known
    if topic not in known:
        raise ConfigError(f"--topic {topic!r} is not a dead-letter topic (known: {', '.join(known)})", "--topic")
    return [topic]


async def read(bootstrap: str, topic: str | None = None, *, group: str | None = None) -> list[DeadLetter]:
    """Every dead letter (or, with `group`, those after the group's committed offsets)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    out: list[DeadLetter] = []
    try:
        tps = await topic_partitions(consumer, _topics(topic))
        if not tps:
            return []
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            committed = await consumer.committed(tp) if group else None
            consumer.seek(tp, committed or 0)
        # a list, not a generator: `await` inside a generator expression makes it an async
        # generator, which any() cannot iterate
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for tp, msgs in (await consumer.getmany(timeout_ms=1000)).items():
                for m in msgs:
                    try:
                        record = json.loads(m.value)
                    except (ValueError, TypeError):
                        record = {"dead_id": f"unreadable@{m.offset}", "reason": "unreadable_dead_letter"}
                    out.append(DeadLetter(tp.topic, tp.partition, m.offset, record))
        return out
    finally:
        await consumer.stop()


async def redrive(bootstrap: str, topic: str, *, dead_id: str | None = None) -> list[DeadLetter]:
    """Put dead letters back where they failed. `dead_id`: that one (wherever it is); otherwise
    every letter not redriven before (tracked by the redrive consumer group's offsets)."""
    letters = await read(bootstrap, topic, group=None if dead_id else REDRIVE_GROUP)
    chosen = [d for d in letters if dead_id is None or d.record.get("dead_id") == dead_id]
    if dead_id and not chosen:
        raise ConfigError(f"no dead letter with id {dead_id!r} in {topic}", "--id")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for d in chosen:
            key = d.record.get("key")
            await producer.send(d.record["redrive_topic"], value=original_bytes(d.record),
                                key=key.encode("utf-8") if isinstance(key, str) else None)
        await producer.flush()
    finally:
        await producer.stop()
    if dead_id is None and letters:
        await _commit(bootstrap, letters)
    return chosen


async def _commit(bootstrap: str, letters: list[DeadLetter]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=REDRIVE_GROUP, enable_auto_commit=False)
    await consumer.start()
    try:
        last: dict[TopicPartition, int] = {}
        for d in letters:
            tp = TopicPartition(d.topic, d.partition)
            last[tp] = max(last.get(tp, -1), d.offset)
        consumer.assign(list(last))
        await consumer.commit({tp: OffsetAndMetadata(o + 1, "") for tp, o in last.items()})
    finally:
        await consumer.stop()
