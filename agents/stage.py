"""What a stage's logic is made of, without faust or a broker.

A stage core is a plain object with `async handle(record, meta) -> Sequence[Out]`: it gets its
clock, its state and its sinks when it is built, so a unit test runs it in-process
(devkit/harness.py) and agents/runtime.py binds the same object to faust. `process_record` is
the one path from an input record's bytes to what is written for it (outputs, or its dead
letter): the runtime and the harness both use it, so a test sees what the broker would get.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline import metrics
from pipeline.errors import RecordError
from pipeline.model.records import dead_letter, decode, encode, is_plain_json, validate_for_topic
from pipeline.topics import MAX_MESSAGE_BYTES, Stage

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Encoded:
    """An output validated against its topic's schema and written to bytes, ready to produce."""

    topic: str
    key: bytes | None
    data: bytes


Handler = Callable[[dict[str, Any], Meta], Awaitable[Sequence[Out]]]


class StageCore(Protocol):
    """A stage's logic: the outputs of one input record (RecordError dead-letters it)."""

    async def handle(self, record: dict[str, Any], meta: Meta) -> Sequence[Out]: ...


class Emitter(Protocol):
    """Outputs a core must publish before it returns (outcome records other replicas wait
    for): `send` puts one on its way, `drain` returns once all sent are acknowledged."""

    async def send(self, out: Out) -> None: ...

    async def drain(self) -> None: ...


class Table(Protocol):
    """The key-value state a stage keeps between records (a faust Table, or a dict in tests)."""

    def get(self, key: bytes, default: Any = None) -> Any: ...

    def __setitem__(self, key: bytes, value: Any) -> None: ...

    def __delitem__(self, key: bytes) -> None: ...

    def __contains__(self, key: object) -> bool: ...

    def items(self) -> Any: ...


_DELETED = object()  # a staged deletion


class StagedTable:
    """A stage's table, read through pending writes that reach it only after the batch's outputs
    are acknowledged.

    State that says "already emitted" must not be in the table (its changelog) before what it
    says was emitted is on the broker: a crash in between would lose the output for good. So a
    core `stage`s its writes, reads see them at once, and the runtime writes a batch's writes
    once the batch is drained: a crash before that re-emits (a duplicate the next stage
    recognises) instead of losing. The runtime handles the next batch while one is on its way
    to the broker, so it `seal`s a batch's writes when the batch is handled and `flush`es that
    batch once it is drained; reads see the sealed batches too. `ready` is set once the table
    may be read and written (its changelog known; see runtime.changelog_known)."""

    def __init__(self, table: Table, ready: asyncio.Event | None = None) -> None:
        self._table = table
        self._pending: dict[bytes, Any] = {}
        self._sealed: list[dict[bytes, Any]] = []  # handled batches not yet drained, oldest first
        self._ready = ready

    async def get(self, key: bytes) -> Any:
        if self._ready is not None:
            await self._ready.wait()
        if key in self._pending:
            value = self._pending[key]
            return None if value is _DELETED else value
        for writes in reversed(self._sealed):
            if key in writes:
                value = writes[key]
                return None if value is _DELETED else value
        return self._table.get(key)

    def stage(self, key: bytes, value: Any) -> None:
        self._pending[key] = value

    def delete(self, key: bytes) -> None:
        """Remove `key` (a tombstone in the changelog) with the batch's other writes."""
        self._pending[key] = _DELETED

    def items(self) -> list[tuple[bytes, Any]]:
        """Every key and value, pending writes included (a snapshot: safe to stage while walking it)."""
        merged = dict(self._table.items())
        for writes in self._sealed:
            merged.update(writes)
        merged.update(self._pending)
        return [(k, v) for k, v in merged.items() if v is not _DELETED]

    @property
    def pending(self) -> Mapping[bytes, Any]:
        return self._pending

    def seal(self) -> dict[bytes, Any]:
        """The writes of the batch just handled, set apart: `flush(sealed)` once it is drained."""
        writes, self._pending = self._pending, {}
        self._sealed.append(writes)
        return writes

    def flush(self, sealed: dict[bytes, Any] | None = None) -> None:
        """Write `sealed` (the oldest sealed batch's writes) to the table; without it, every
        pending write."""
        if sealed is None:
            self.seal()
            batches, self._sealed = self._sealed, []
        elif self._sealed and self._sealed[0] is sealed:
            batches = [self._sealed.pop(0)]
        else:
            raise ValueError("a batch's writes are flushed in the order the batches were sealed")
        for writes in batches:
            for key, value in writes.items():
                if value is not _DELETED:
                    self._table[key] = value
                elif key in self._table:
                    del self._table[key]


def key_bytes(key: str | bytes | None) -> bytes | None:
    return key.encode("utf-8") if isinstance(key, str) else key


def encode_output(stage: Stage, out: Out, plain: bool | None = None) -> Encoded:
    """`out` checked (an output of this stage, valid for its topic) and written to bytes;
    RecordError when it cannot be written."""
    if out.topic not in stage.outputs and out.topic != stage.dead:
        raise KeyError(f"{out.topic} is not an output of stage {stage.name}")
    if plain is None:
        plain = is_plain_json(out.value)
    validate_for_topic(out.topic, out.value, plain=plain)
    try:
        data = encode(out.value, plain=plain)
    except (UnicodeEncodeError, ValueError, TypeError) as exc:
        raise RecordError("unencodable_output", f"{out.topic}: {type(exc).__name__}: {exc}"[:300]) from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise RecordError("output_too_large", f"{out.topic}: {len(data)} bytes > {MAX_MESSAGE_BYTES}")
    return Encoded(out.topic, key_bytes(out.key), data)


async def process_record(stage: Stage, handler: Handler, meta: Meta) -> list[Encoded]:
    """The record's outputs, each validated and encoded, or its dead letter: never an exception,
    since faust acknowledges a record whose agent raised and the record would be lost."""
    detail: dict[str, Any] | None = None
    try:
        record = decode(meta.raw, stage.input)
        # validated and encoded here, inside the try: an output that cannot be written (a lone
        # surrogate, over the topic's size) dead-letters its input instead of crashing the agent
        # on send, which would stall the stage on the same record for ever
        return [encode_output(stage, out) for out in await handler(record, meta)]
    except RecordError as exc:
        reason, error, detail = exc.reason, exc.detail, exc.data
    except Exception as exc:  # a bug must not lose the record: park it where an operator sees it
        log.exception("stage %s: unexpected error on %s[%d]@%d", stage.name, stage.input, meta.partition, meta.offset)
        reason, error = "internal_error", f"{type(exc).__name__}: {exc}"
    metrics.DEAD_LETTERS.labels(stage.dead, reason).inc()
    letter = dead_letter(stage=stage.name, source_topic=stage.input, raw=meta.raw, reason=reason, error=error,
                         key=meta.key, partition=meta.partition, offset=meta.offset, detail=detail)
    return [Encoded(stage.dead, key_bytes(meta.key), encode(letter))]


def publisher(emitter: Emitter, topic: str) -> Callable[[dict[str, Any]], Awaitable[None]]:
    """Publish a record keyed by its endpoint on `topic` at once: sent, and acknowledged before
    the call returns (an outcome other replicas must see before they decide)."""

    async def publish(record: dict[str, Any]) -> None:
        await emitter.send(Out(topic, record["endpoint"], record))
        await emitter.drain()

    return publish
