"""A stage's core run in-process, without faust or a broker (as bytewax's testing.py runs a flow).

    clock = FakeClock()
    h = StageHarness("ingest", clock)
    h.bind(IngestStage(config, h.clock, h.state))
    batch = await h.feed(envelope, key="h1:ses_1")
    batch.values("sessions.idle"), batch.dead

A fed batch goes the way the runtime takes it: each record's bytes are decoded and validated
against its input topic, handled, and each output validated against its topic's schema
(agents.stage.process_record, the function the faust binding calls); a record that fails is
dead-lettered with its reason. Once the batch's outputs are "acknowledged", the staged state is
flushed to the in-memory table, as the runtime does after the drain. Outputs a core publishes on
its own (outcome records) go through `sinks`, which validates them too. Time is the FakeClock's:
a core that sleeps waits until the test moves the clock.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agents.stage import Encoded, Handler, Meta, Out, StageCore, StagedTable, encode_output, process_record
from devkit.clock import FakeClock
from pipeline.model.records import encode
from pipeline.topics import STAGES, Stage

T = TypeVar("T")


@dataclass(frozen=True)
class Written:
    """One record as the broker would hold it: topic, key bytes, the decoded JSON value."""

    topic: str
    key: bytes | None
    value: dict[str, Any]

    @classmethod
    def of(cls, item: Encoded) -> Written:
        return cls(item.topic, item.key, json.loads(item.data))


class MemoryTable(dict[bytes, Any]):
    """A stage's state table in memory (what the changelog would hold)."""


class MemorySinks:
    """Every topic the stage wrote, in order: its outputs and what its core sent on its own."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.topics: dict[str, list[Written]] = defaultdict(list)
        self.drains = 0

    async def send(self, out: Out) -> None:
        self.write(encode_output(self.stage, out))

    async def drain(self) -> None:
        self.drains += 1

    def write(self, item: Encoded) -> Written:
        written = Written.of(item)
        self.topics[item.topic].append(written)
        return written

    def values(self, topic: str) -> list[dict[str, Any]]:
        return [w.value for w in self.topics.get(topic, [])]


@dataclass
class Batch:
    """What one fed batch wrote for its records, in input order (not what the core sent on its own)."""

    stage: Stage
    written: list[Written] = field(default_factory=list)

    def values(self, topic: str) -> list[dict[str, Any]]:
        return [w.value for w in self.written if w.topic == topic]

    @property
    def dead(self) -> list[dict[str, Any]]:
        return self.values(self.stage.dead)


class StageHarness:
    """One stage's core fed batches of records in-process.

    `state` (a StagedTable over `table`) and `sinks` are there for the core's constructor; pass
    `table` to start from another harness' table, as a replica restarted on the same changelog."""

    def __init__(self, stage: str | Stage, clock: FakeClock | None = None, *, table: MemoryTable | None = None,
                 core: StageCore | None = None) -> None:
        self.stage = STAGES[stage] if isinstance(stage, str) else stage
        self.clock = clock or FakeClock()
        self.table = table if table is not None else MemoryTable()
        self.state = StagedTable(self.table)
        self.sinks = MemorySinks(self.stage)
        self._handler: Handler | None = core.handle if core is not None else None
        self._offset = 0
        self.inputs: dict[tuple[int, int], bytes] = {}  # what was fed, where: the input topic as stored

    def bind(self, core: StageCore) -> StageHarness:
        self._handler = core.handle
        return self

    async def feed(self, *records: dict[str, Any] | bytes, key: str | bytes | None = None,
                   parallel: bool = False) -> Batch:
        """Handle `records` as one batch (all with `key`); `parallel` handles them at once, as
        the runtime does for stages that wait on a remote service."""
        if self._handler is None:
            raise RuntimeError("no core bound: StageHarness(..., core=...) or harness.bind(core)")
        handler = self._handler
        metas = [self._meta(r, key) for r in records]
        if parallel:
            results = await asyncio.gather(*(process_record(self.stage, handler, m) for m in metas))
        else:
            results = [await process_record(self.stage, handler, m) for m in metas]
        batch = Batch(self.stage)
        for items in results:
            batch.written.extend(self.sinks.write(item) for item in items)
        self.state.flush()  # the batch's outputs are acknowledged: its state may be written
        return batch

    async def read(self, partition: int, offset: int) -> bytes | None:
        """An input record read back by where it is (pipeline.kafka.history.RecordReader.read);
        None once `forget` dropped it, as retention would."""
        return self.inputs.get((partition, offset))

    def forget(self) -> None:
        """Every input fed so far is past retention."""
        self.inputs.clear()

    def _meta(self, record: dict[str, Any] | bytes, key: str | bytes | None) -> Meta:
        raw = record if isinstance(record, bytes) else encode(record)
        meta = Meta(key.encode("utf-8") if isinstance(key, str) else key, 0, self._offset, raw)
        self.inputs[(0, self._offset)] = raw
        self._offset += 1
        return meta


async def on_clock(clock: FakeClock, work: Awaitable[T], step_s: float, max_steps: int = 1000) -> T:
    """Run `work` to its end, moving `clock` on by `step_s` each time it parks on the clock.

    Between steps it waits for `work` either to finish or to sleep: a core that does real I/O
    (a stub server) between its sleeps may take several retries in one step or none."""
    task = asyncio.ensure_future(work)
    for _ in range(max_steps):
        parked = asyncio.ensure_future(clock.wait_for_sleepers())
        await asyncio.wait({task, parked}, return_when=asyncio.FIRST_COMPLETED)
        parked.cancel()
        if task.done():
            return task.result()
        await clock.advance(step_s)
    task.cancel()
    raise AssertionError(f"still running after {max_steps} steps of {step_s} s")
