"""The one stage factory and the one agent loop every stage uses.

faust acknowledges a record whose agent raised, so the loop never lets an exception out:
a record that cannot be processed goes to the stage's dead-letter topic with its reason and
original bytes, and the loop goes on. Outputs are sent for a whole batch and awaited together
before the batch's records are acknowledged, so an offset is committed only after what the
record produced is on the broker (at least once), without one round trip per record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from agents import consumer_drain
from pipeline import metrics
from pipeline.admin import topic_partitions
from pipeline.config import Config
from pipeline.errors import RecordError
from pipeline.partitioner import key_partitioner
from pipeline.records import dead_letter, decode, encode, is_plain_json, validate_for_topic
from pipeline.topics import (
    DEAD_LETTER_BYTES,
    MAX_MESSAGE_BYTES,
    PRODUCER_BATCH_BYTES,
    STAGES,
    TOPICS,
    Stage,
    partitions_of,
)

log = logging.getLogger(__name__)
PRODUCER_LINGER_S = 0.005


@dataclass(frozen=True)
class Meta:
    """Where an input record came from."""

    key: bytes | None
    partition: int
    offset: int
    raw: bytes


@dataclass(frozen=True)
class Out:
    topic: str
    key: str | bytes | None
    value: dict[str, Any]


Handler = Callable[[dict[str, Any], Meta], Awaitable[Sequence[Out]]]


def make_app(stage: Stage | str, config: Config, **overrides: Any) -> faust.App:
    """One faust App per stage; its id is the stage's consumer group."""
    consumer_drain.install()  # records reach the stream a fetched batch at a time
    stage = STAGES[stage] if isinstance(stage, str) else stage
    settings: dict[str, Any] = {
        "broker": f"kafka://{config.kafka.bootstrap}",
        "store": "memory://",
        "key_serializer": "raw",
        "value_serializer": "raw",
        "topic_partitions": config.kafka.partitions,
        "topic_replication_factor": config.kafka.replication,
        "consumer_auto_offset_reset": "earliest",
        "producer_acks": -1,
        "web_enabled": False,
        "broker_commit_every": 500,
        "broker_commit_interval": 1.0,
        "broker_session_timeout": config.kafka.session_timeout_s,
        "broker_heartbeat_interval": config.kafka.heartbeat_interval_s,
        "stream_wait_empty": False,
        "producer_max_request_size": DEAD_LETTER_BYTES,  # a dead letter is the largest record
        # Batches of records per produce request (bench/README.md): a 25-message turn is ~20 KB,
        # past faust's 16 KB default batch, so every record went out as its own batch; and with
        # no linger the sender shipped each record as soon as the agent yielded, one request
        # per record. The agent awaits the acks once per batch of records anyway.
        "producer_max_batch_size": PRODUCER_BATCH_BYTES,
        "producer_linger": PRODUCER_LINGER_S,
        "consumer_max_fetch_size": MAX_MESSAGE_BYTES,
        "producer_partitioner": key_partitioner,  # Kafka's default, faster (pipeline/partitioner.py)
        "datadir": str(config.cache_dir / "faust" / stage.app_id),
    }
    settings.update(overrides)
    Path(settings["datadir"]).mkdir(parents=True, exist_ok=True)
    return faust.App(stage.app_id, **settings)


def topic(app: faust.App, name: str, config: Config) -> faust.TopicT:
    spec = TOPICS[name]
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                     partitions=partitions_of(spec, config.kafka.partitions))


def _key_bytes(key: str | bytes | None) -> bytes | None:
    return key.encode("utf-8") if isinstance(key, str) else key


class Sinks:
    """The stage's output topics. `send` validates against the topic's schema and returns at
    once; `drain` waits until everything sent so far is acknowledged by the broker."""

    def __init__(self, app: faust.App, config: Config, stage: Stage) -> None:
        self.stage = stage
        self._app = app
        self._topics = {name: topic(app, name, config) for name in {*stage.outputs, stage.dead}}
        # each counter child looked up once: labels() takes a lock and builds a key per call
        self._counted = {name: metrics.RECORDS_OUT.labels(stage.name, name) for name in self._topics}
        self._pending: list[Awaitable[Any]] = []

    async def send(self, out: Out) -> None:
        plain = is_plain_json(out.value)
        validate_for_topic(out.topic, out.value, plain=plain)
        await self.send_validated([(out, plain, None)])

    async def send_validated(self, outs: Sequence[tuple[Out, bool | None, bytes | None]]) -> None:
        """`send` for records the caller has just validated (the agent loop validates and encodes
        every output where it can still turn a failure into a dead letter), each as (out, what
        is_plain_json said of it or None, its encoded bytes or None): one producer lookup and one
        count per topic for the lot."""
        producer = await self._kafka_producer()
        sent: dict[str, int] = {}
        for out, plain, data in outs:
            if out.topic not in self._counted:
                raise KeyError(f"{out.topic} is not an output of stage {self.stage.name}")
            value = data if data is not None else encode(out.value, plain=plain)
            self._pending.append(await producer.send(out.topic, value, key=_key_bytes(out.key)))
            sent[out.topic] = sent.get(out.topic, 0) + 1
        for name, count in sent.items():
            self._counted[name].inc(count)

    async def _kafka_producer(self) -> AIOKafkaProducer:
        """The app's own aiokafka producer (faust's settings: acks, batching, linger, its
        partitioner). Records go to it directly: faust's per-message wrapping around the same
        call (pending and future message objects, sensors, a debug log line) cost more CPU than
        the send itself (bench/README.md). faust flushes and stops this producer as before."""
        producer = await self._app.maybe_start_producer()
        return producer._ensure_producer()  # type: ignore[attr-defined]  # faust's aiokafka driver

    async def drain(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)


def _encoded(out: Out, plain: bool | None) -> bytes:
    try:
        data = encode(out.value, plain=plain)
    except (UnicodeEncodeError, ValueError, TypeError) as exc:
        raise RecordError("unencodable_output", f"{out.topic}: {type(exc).__name__}: {exc}"[:300]) from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise RecordError("output_too_large", f"{out.topic}: {len(data)} bytes > {MAX_MESSAGE_BYTES}")
    return data


def bind(app: faust.App, stage: Stage | str, config: Config, handler: Handler, *,
         sinks: Sinks | None = None, batch: int = 200, within_s: float = 0.05,
         parallel: bool = False, after_drain: Callable[[], None] | None = None) -> Sinks:
    """Register the stage's agent: decode + validate, handle, route outputs or dead letters.

    `parallel` runs the handler for every record of a batch at once (for stages that wait on
    a remote service); outputs are still sent in input order. `after_drain` runs once a
    batch's outputs are on the broker: state that says "already emitted" is written there,
    so a crash in between re-emits (a duplicate the next stage recognises) instead of losing.
    """
    stage = STAGES[stage] if isinstance(stage, str) else stage
    source = topic(app, stage.input, config)
    sinks = sinks or Sinks(app, config, stage)
    records_in = metrics.RECORDS_IN.labels(stage.name)

    async def process(event: faust.EventT) -> list[tuple[Out, bool | None, bytes | None]]:
        """The record's outputs, each validated (with whether it is plain JSON, found out once
        for the validator and the encoder alike), or its dead letter."""
        message = event.message
        raw = message.value if isinstance(message.value, bytes) else b""
        meta = Meta(message.key, message.partition, message.offset, raw)
        try:
            record = decode(raw, stage.input)
            outs = [(out, is_plain_json(out.value)) for out in await handler(record, meta)]
            encoded = []
            for out, plain in outs:
                validate_for_topic(out.topic, out.value, plain=plain)
                # encoded here, inside the try: an output that cannot be written (a lone
                # surrogate, over the topic's size) dead-letters its input instead of crashing
                # the agent on send, which would stall the stage on the same record for ever
                encoded.append((out, plain, _encoded(out, plain)))
            return encoded
        except RecordError as exc:
            reason, error = exc.reason, exc.detail
        except Exception as exc:  # a bug must not lose the record: park it where an operator sees it
            log.exception("stage %s: unexpected error on %s[%d]@%d", stage.name, stage.input,
                          meta.partition, meta.offset)
            reason, error = "internal_error", f"{type(exc).__name__}: {exc}"
        metrics.DEAD_LETTERS.labels(stage.dead, reason).inc()
        return [(Out(stage.dead, meta.key, dead_letter(
            stage=stage.name, source_topic=stage.input, raw=raw, reason=reason, error=error, key=meta.key,
            partition=meta.partition, offset=meta.offset)), None, None)]

    @app.agent(source, name=f"{stage.name}-agent")
    async def agent(stream: faust.StreamT) -> None:
        async for events in stream.take_events(batch, within=within_s):
            records_in.inc(len(events))
            if parallel:
                results = await asyncio.gather(*(process(e) for e in events))
            else:
                results = [await process(e) for e in events]
            await sinks.send_validated([out for outs in results for out in outs])  # process() validated them
            await sinks.drain()
            if after_drain:
                after_drain()

    return sinks


def state_table(app: faust.App, name: str, config: Config, stage: Stage | str) -> tuple[Any, asyncio.Event]:
    """A stage's changelog-backed table, keyed like its input records (raw bytes, JSON values),
    and an event set once the table may be written (see changelog_known).

    Tables here are written after a batch's outputs are on the broker (bind's after_drain),
    outside stream iteration, so the key picks the changelog partition with the same
    partitioner as the producers (use_partitioner)."""
    stage = STAGES[stage] if isinstance(stage, str) else stage
    table = app.Table(name, default=None, key_type=bytes,
                      schema=faust.Schema(key_serializer="raw", value_serializer="json"),
                      use_partitioner=True,
                      partitions=partitions_of(TOPICS[stage.input], config.kafka.partitions))
    writable = asyncio.Event()

    @app.task
    async def learn_changelog() -> None:
        await changelog_known(app, table)
        writable.set()

    return table, writable


async def changelog_known(app: faust.App, table: Any) -> None:
    """Return once the producer's metadata has `table`'s changelog topic.

    A table written outside stream iteration (use_partitioner=True) gets its changelog partition
    from faust's Producer.key_partition, which reads the producer's cached metadata and never
    fetches it: on a fresh broker faust creates the changelog topic at start, the cache does not
    have it, and the first write raised TypeError in after_drain, crashing the agent; the same
    pending key crashed it again on every later batch and faust stopped feeding it, so the
    stage stalled with its process alive. partitions_for() fetches until the topic is there and
    keeps it among the producer's tracked topics."""
    await app.producer._ensure_producer().partitions_for(table.changelog_topic.get_topic_name())


class TopicFollower:
    """Reads a whole topic outside any consumer group (every replica sees every record), from
    `horizon_ms` ago or from the start, into `apply`; `ready` is set once it has caught up.
    This is how replicas share a decision state (novelty window, breaker) through a topic."""

    def __init__(self, config: Config, name: str, apply: Callable[[bytes], Awaitable[None]],
                 horizon_ms: int | None = None) -> None:
        self.config, self.name, self.apply, self.horizon_ms = config, name, apply, horizon_ms
        self.ready = asyncio.Event()
        self.applied = 0

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.config.kafka.bootstrap, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    max_partition_fetch_bytes=16 * 1024 * 1024)
        await consumer.start()
        try:
            parts = await topic_partitions(consumer, [self.name]) or [TopicPartition(self.name, 0)]
            consumer.assign(parts)
            ends = await consumer.end_offsets(parts)
            if self.horizon_ms is None:
                await consumer.seek_to_beginning(*parts)
            else:
                since = int(time.time() * 1000) - self.horizon_ms
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
