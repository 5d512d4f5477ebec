"""Inspect and redrive dead letters: every stage's `*.dead` topic holds the original bytes and
the reason; redrive puts the original back on the topic the failing stage reads.

Where a letter goes back to comes from the topic table (`Topic.redrive_to` of the dead-letter
topic it sits in), never from the letter: a letter is data anyone able to write the topic could
forge, and one naming `traces.outbox` would otherwise be signed and delivered unscrubbed. A
letter whose original does not match its target topic's schema is refused, not redriven.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from pipeline.errors import ConfigError, PipelineError, RecordError
from pipeline.kafka.acls import REDRIVE_GROUP
from pipeline.kafka.admin import DEFAULT_TIMEOUT_S, broker_calls, start_client, topic_partitions
from pipeline.kafka.security import KafkaAccess, client_settings
from pipeline.model.records import decode, original_bytes
from pipeline.topics import TOPICS, dead_letter_topics

__all__ = ["REDRIVE_GROUP", "DeadLetter", "NothingToRedrive", "read", "redrive", "redrive_target", "shown"]


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


def redrive_target(topic: str) -> str | None:
    """Where letters of the dead-letter topic `topic` go back to: from the topic table only."""
    return TOPICS[topic].redrive_to if topic in TOPICS else None


def shown(letter: DeadLetter, *, original: bool) -> dict[str, Any]:
    """A letter as `dead list` shows it: the original bytes (session content) only on request."""
    record = {k: v for k, v in letter.record.items() if k != "original_b64"}
    if "original_b64" in letter.record:
        try:
            raw = original_bytes(letter.record)
        except (ValueError, TypeError):
            raw = b""
        record["original_bytes"] = len(raw)
        if original:
            record["original"] = raw.decode("utf-8", errors="replace")
    return record


async def read(kafka: KafkaAccess | str, topic: str | None = None, *, group: str | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> list[DeadLetter]:
    """Every dead letter (or, with `group`, those after the group's committed offsets).
    A broker that cannot be reached within `timeout_s` raises BrokerError (one line)."""
    topics = _topics(topic)  # an unknown topic is named before any connection
    consumer = AIOKafkaConsumer(**client_settings(kafka), group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", request_timeout_ms=int(timeout_s * 1000))
    await start_client(consumer, kafka, timeout_s)
    try:
        async with broker_calls(kafka, timeout_s):
            return await _read(consumer, topics, group)
    finally:
        await consumer.stop()


async def _read(consumer: AIOKafkaConsumer, topics: list[str], group: str | None) -> list[DeadLetter]:
    out: list[DeadLetter] = []
    tps = await topic_partitions(consumer, topics)
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


class NothingToRedrive(PipelineError):
    """The letter asked for is not there, or letters are not fit to go back: nothing was
    redriven. Not a configuration error: the command was right, the topic's content is not."""


async def redrive(kafka: KafkaAccess | str, topic: str, *, dead_id: str | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> list[DeadLetter]:
    """Put dead letters back where they failed. `dead_id`: that one (wherever it is); otherwise
    every letter not redriven before (tracked by the redrive consumer group's offsets)."""
    target = redrive_target(topic) if topic in dead_letter_topics() else None
    _topics(topic)  # an unknown topic is a usage error, named
    if target is None:
        raise ConfigError(f"{topic} cannot be redriven: nothing reads its letters again (inspect them with "
                          "`pipeline dead list`)", "--topic")
    letters = await read(kafka, topic, group=None if dead_id else REDRIVE_GROUP, timeout_s=timeout_s)
    chosen = [d for d in letters if dead_id is None or d.record.get("dead_id") == dead_id]
    if dead_id and not chosen:
        raise NothingToRedrive(f"no dead letter with id {dead_id!r} in {topic} (see `pipeline dead list --topic "
                               f"{topic}`)")
    refused = [(d, why) for d in chosen if (why := _unfit(d, target)) is not None]
    if refused:
        lines = "; ".join(f"{d.record.get('dead_id')}: {why}" for d, why in refused[:5])
        raise NothingToRedrive(f"{len(refused)} letter(s) in {topic} are not valid {target} records and were not "
                               f"redriven (nothing was): {lines}")
    producer = AIOKafkaProducer(**client_settings(kafka), enable_idempotence=True, acks="all",
                                request_timeout_ms=int(timeout_s * 1000))
    await start_client(producer, kafka, timeout_s)
    try:
        async with broker_calls(kafka, timeout_s):
            for d in chosen:
                key = d.record.get("key")
                await producer.send(target, value=original_bytes(d.record),
                                    key=key.encode("utf-8") if isinstance(key, str) else None)
            await producer.flush()
    finally:
        await producer.stop()
    if dead_id is None and letters:
        await _commit(kafka, letters, timeout_s)
    return chosen


def _unfit(letter: DeadLetter, target: str) -> str | None:
    """Why the letter's original cannot go to `target` (None: it can)."""
    try:
        decode(original_bytes(letter.record), target)
    except (KeyError, ValueError, TypeError):
        return "no original bytes"
    except RecordError as exc:
        return exc.reason
    return None


async def _commit(kafka: KafkaAccess | str, letters: list[DeadLetter], timeout_s: float) -> None:
    consumer = AIOKafkaConsumer(**client_settings(kafka), group_id=REDRIVE_GROUP, enable_auto_commit=False,
                                request_timeout_ms=int(timeout_s * 1000))
    await start_client(consumer, kafka, timeout_s)
    try:
        async with broker_calls(kafka, timeout_s):
            await _commit_offsets(consumer, letters)
    finally:
        await consumer.stop()


async def _commit_offsets(consumer: AIOKafkaConsumer, letters: list[DeadLetter]) -> None:
    last: dict[TopicPartition, int] = {}
    for d in letters:
        tp = TopicPartition(d.topic, d.partition)
        last[tp] = max(last.get(tp, -1), d.offset)
    consumer.assign(list(last))
    await consumer.commit({tp: OffsetAndMetadata(o + 1, "") for tp, o in last.items()})
