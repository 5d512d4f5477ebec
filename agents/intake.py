"""A stage's input records, handed from faust's consumer to the stage's agent loop directly.

faust hands a fetched record to an agent through its conductor (a flow-control wait, a lock, an
Event and a queue put per record), then the stream (a queue get, a context variable, sensors)
and `take_events` (a processor and two asyncio events per record): ~100 µs of CPU per record
for what the stage does in tens. The stage keeps faust's app, consumer group, tables and
changelogs, and its agent (whose stream subscribes the input topic and takes part in the
assignment), but reads its input from this buffer, which the consumer's drain loop
(`agents/consumer_drain.py`) fills straight from each fetch.

At least once is kept exactly as the stream kept it:
- a record is acknowledged (`Consumer.ack`, which alone lets a commit pass it) by the agent
  loop only after every output of it is on the broker or its dead letter is;
- a record the loop takes that was fetched before the last rebalance, or while the flow is
  stopped, is dropped unacknowledged, as faust's stream drops it: the rebalance seeks every
  partition back to its committed offset, so it is read again;
- a record taken and not acknowledged (shutdown, a crash) is never committed: it is read again
  after the restart or the next rebalance.
The buffer is bounded: once it holds `capacity` records the drain loop waits for room (inside
faust's race against a rebalance), so a stage that holds its input (the breaker while open)
stops the fetching, and its lag grows, as a full stream buffer did.
"""

from __future__ import annotations

import asyncio
from collections import deque
from time import monotonic
from typing import Any

import faust

DEFAULT_CAPACITY = 4096  # faust's stream_buffer_maxsize


class Intake:
    """The records of `topic` fetched for this worker and not yet taken by its agent loop."""

    def __init__(self, app: faust.App, topic: str, capacity: int = DEFAULT_CAPACITY) -> None:
        self.app = app
        self.topic = topic
        self.capacity = capacity
        self._records: deque[Any] = deque()
        self._arrived = asyncio.Event()
        self._enough = asyncio.Event()  # set once the buffer holds what a waiting take wants
        self._wanted = capacity
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._records)

    async def put(self, message: Any) -> None:
        """Add a fetched record (faust's Message); waits while the buffer is full."""
        while len(self._records) >= self.capacity:
            self._room.clear()
            await self._room.wait()
        self._records.append(message)
        self._arrived.set()
        if len(self._records) >= self._wanted:
            self._enough.set()

    async def take(self, most: int, within_s: float = 0.0) -> list[Any]:
        """Up to `most` records in fetch order: at once when `most` are there, else once
        `within_s` has passed since the call and a record is there (as faust's take_events:
        fewer, larger batches, one produce request and one wait for acknowledgements per batch,
        and a record that arrives late in the window waits only for the rest of it). Records
        the stream would skip (fetched before the current consumer generation, or while the
        flow is stopped) are left out, unacknowledged."""
        records = self._records
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            while not records:
                self._arrived.clear()
                await self._arrived.wait()
            left = deadline - loop.time()
            if left > 0 and len(records) < most:
                self._wanted = most
                self._enough.clear()
                try:
                    await asyncio.wait_for(self._enough.wait(), left)
                except TimeoutError:
                    pass
                finally:
                    self._wanted = self.capacity
            taken = [records.popleft() for _ in range(min(most, len(records)))]
            self._room.set()
            app = self.app
            if not app.flow_control.is_active():
                continue
            generation = app.consumer_generation_id
            current = [m for m in taken if m.generation_id == generation]
            if current:
                self._seen(current)
                return current

    def _seen(self, messages: list[Any]) -> None:
        """Tell faust's monitor the partitions are being processed (it logs a stalled stream
        for a partition that fetches while its stream takes nothing)."""
        monitor = self.app.monitor
        if monitor is not None:
            now = monotonic()
            inbound = monitor.stream_inbound_time
            for tp in {m.tp for m in messages}:
                inbound[tp] = now

    def ack(self, messages: list[Any]) -> None:
        """Let a commit pass `messages`: every output of each is on the broker."""
        ack = self.app.consumer.ack
        for message in messages:
            ack(message)
