"""Where the collector's records go: the `EventSink` protocol and the aiokafka sink with a
bounded buffer, which turns a broker outage into back-pressure on the host tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    MessageSizeTooLargeError,
    ProducerClosed,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
)

from pipeline.clock import Clock, SystemClock
from pipeline.delivery.retry import RetryPolicy
from pipeline.kafka.security import KafkaAccess, client_settings
from pipeline.model.records import MAX_RECORD_BYTES
from pipeline.topics import PRODUCER_BATCH_BYTES

log = logging.getLogger(__name__)


class EventSink(Protocol):
    """Where the collector's records go. `send` may wait: that is the back-pressure."""

    async def send(self, topic: str, key: bytes, value: bytes) -> None: ...

    async def flush(self) -> None: ...


class SinkClosed(RuntimeError):
    """The sink was closed (or its drain task ended): nothing more is sent or flushed."""


# Resending these gets the same refusal, so retrying would stall every host behind one record.
_PERMANENT_KAFKA_ERRORS = (
    MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError, InvalidTopicError,
    TopicAuthorizationFailedError, CorruptRecordException,
)


@dataclass(frozen=True, slots=True)
class _Record:
    """A buffered record; `seq` orders it and tells `flush` how far delivery has got."""

    seq: int
    topic: str
    key: bytes
    value: bytes


class KafkaEventSink:
    """An idempotent aiokafka producer behind a bounded in-memory buffer.

    `send` returns once the record is buffered; when `max_buffered` records are waiting (the
    broker is down or slow) it waits for room, which stalls the host tasks and so the reading
    of their event streams. A drain task sends batches in order and retries transient failures
    with backoff, restarting the producer when it cannot start. Records the broker refuses for
    good (too large, bad topic, not authorised) are counted in `rejected` and logged with
    their key. Records still buffered when `close` gives up are counted in `dropped` and logged.
    `flush` waits until every record sent before it was acknowledged or rejected.
    """

    def __init__(
        self,
        kafka: KafkaAccess | str,
        *,
        max_buffered: int = 10_000,
        batch_size: int = 500,
        client_id: str = "opencode-collector",
        max_request_size: int = MAX_RECORD_BYTES + 1024 * 1024,
        # zstd (cramjam): aiokafka compresses in the event loop, and its gzip (level 9) is too
        # slow for the collector's volume
        compression_type: str | None = "zstd",
        linger_ms: int = 10,
        retry_min_s: float = 0.5,
        retry_max_s: float = 30.0,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        producer_options: Mapping[str, Any] | None = None,
    ) -> None:
        if max_buffered < 1 or batch_size < 1:
            raise ValueError("max_buffered and batch_size must be >= 1")
        self._kafka = kafka
        self._producer_kwargs: dict[str, Any] = {
            "client_id": client_id, "max_request_size": max_request_size,
            "compression_type": compression_type, "linger_ms": linger_ms,
            "max_batch_size": PRODUCER_BATCH_BYTES,
            **(producer_options or {}),
            # Not overridable: ordering per key and no loss on retries depend on them.
            "enable_idempotence": True, "acks": "all",
        }
        self.max_buffered = max_buffered
        self._batch_size = batch_size
        self._queue: asyncio.Queue[_Record] = asyncio.Queue()
        # Counts queued and in-flight records alike, so `buffered` never exceeds the bound.
        self._slots = asyncio.Semaphore(max_buffered)
        self._clock = clock or SystemClock()
        self._retry = RetryPolicy(base_s=retry_min_s, max_s=retry_max_s, rng=rng or random.Random())
        self._producer: AIOKafkaProducer | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._done = asyncio.Condition()
        self._seq = 0
        self._done_through = 0
        self._in_flight: list[_Record] = []
        self._closed = False
        # counters, read by the metrics module
        self.sent = 0
        self.rejected = 0
        self.dropped = 0
        self.retries = 0
        self.producer_restarts = 0
        self.broker_up = False

    @property
    def buffered(self) -> int:
        return self._queue.qsize() + len(self._in_flight)

    async def start(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="kafka-sink-drain")

    async def __aenter__(self) -> KafkaEventSink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        if self._closed:
            raise SinkClosed("the Kafka sink is closed")
        await self._slots.acquire()
        self._seq += 1
        self._queue.put_nowait(_Record(self._seq, topic, key, value))

    async def flush(self) -> None:
        target = self._seq
        async with self._done:
            while self._done_through < target:
                if self._drain_task is None or self._drain_task.done():
                    raise SinkClosed("the Kafka sink is not running; nothing can be flushed")
                await self._done.wait()

    async def close(self, timeout_s: float = 10.0) -> int:
        """Deliver what is buffered within `timeout_s`; count and log the rest. Returns it."""
        self._closed = True
        if self._drain_task is not None and not self._drain_task.done():
            with contextlib.suppress(TimeoutError, SinkClosed):
                await asyncio.wait_for(self.flush(), timeout_s)
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task
        lost = self.buffered
        if lost:
            self.dropped += lost
            # In-flight ones may still reach the broker as the producer stops: counted as lost
            # because nothing confirmed them.
            log.error("kafka sink closed with %d undelivered records (broker unreachable for %.1fs "
                      "of shutdown); they are lost and counted in dropped", lost, timeout_s)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), timeout_s)
            self._producer = None
        return lost

    # -- drain ----------------------------------------------------------

    async def _drain(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._in_flight = batch
            await self._deliver(batch)
            self._in_flight = []
            for _ in batch:
                self._slots.release()
            async with self._done:
                self._done_through = batch[-1].seq
                self._done.notify_all()

    async def _ready_producer(self) -> AIOKafkaProducer:
        attempt = 0
        while self._producer is None:
            producer = AIOKafkaProducer(**client_settings(self._kafka), **self._producer_kwargs)
            try:
                await producer.start()
            except Exception as exc:
                self.broker_up = False
                with contextlib.suppress(Exception):
                    await producer.stop()
                attempt += 1
                delay = self._retry.delay(attempt)
                log.warning("kafka producer cannot start (%s); %d records buffered; "
                            "retrying in %.1fs", exc, self.buffered, delay)
                await self._clock.sleep(delay)
                continue
            self._producer = producer
            self.producer_restarts += 1
        return self._producer

    async def _deliver(self, batch: list[_Record]) -> None:
        pending, attempt = batch, 0
        while pending:
            producer = await self._ready_producer()
            failed: list[_Record] = []
            futures: list[tuple[_Record, asyncio.Future[Any]]] = []
            for i, rec in enumerate(pending):
                try:
                    futures.append((rec, await producer.send(rec.topic, rec.value, key=rec.key)))
                except _PERMANENT_KAFKA_ERRORS as exc:
                    self._reject(rec, exc)
                except Exception as exc:
                    # Usually metadata unavailable: the rest of the batch would wait just as long.
                    failed.extend(pending[i:])
                    self._note_failure(exc)
                    break
            results = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
            for (rec, _), result in zip(futures, results, strict=True):
                if isinstance(result, _PERMANENT_KAFKA_ERRORS):
                    self._reject(rec, result)
                elif isinstance(result, BaseException):
                    failed.append(rec)
                    self._note_failure(result)
                else:
                    self.sent += 1
            if not failed:
                self.broker_up = True
                return
            pending = sorted(failed, key=lambda r: r.seq)
            attempt += 1
            self.retries += len(pending)
            delay = self._retry.delay(attempt)
            log.warning("kafka send failed for %d records; retrying in %.1fs", len(pending), delay)
            await self._clock.sleep(delay)

    def _note_failure(self, exc: BaseException) -> None:
        self.broker_up = False
        if isinstance(exc, ProducerClosed):
            self._producer = None

    def _reject(self, rec: _Record, exc: BaseException) -> None:
        self.rejected += 1
        log.error("kafka refused a record for good (%s: %s): topic %s key %s, %d bytes; dropped",
                  type(exc).__name__, exc, rec.topic, rec.key.decode("utf-8", "replace"),
                  len(rec.value))
