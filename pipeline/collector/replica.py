"""One `pipeline collect` process's share of the hosts: Kafka group membership drives a `Collector`.

Every replica reads the whole host table (`HostTableReader`) and joins the consumer group
`panel-pipeline-collector`, subscribed to the hosts topic. The group gives each replica some of
the topic's partitions; a replica follows exactly the hosts whose records are on its partitions:

- assigned: remember the partitions, then (in the replica's own task, not the group's) load the
  state of their hosts from `collector.state`, read to its end, and start them;
- revoked: stop those hosts, flush the sink and save their state, before returning, so before
  the rebalance completes and before any other replica starts them: a graceful handover (a
  replica added or stopped) reports nothing twice;
- a table change (a host added, removed, or its record changed; `pipeline hosts`): start, stop
  or restart the hosts on owned partitions, no rebalance needed.

A replica killed outright (kill -9) stops heartbeating; after `kafka.session_timeout_s` the group
rebalances and the others take its hosts over from the state it last saved: what it reported
since is reported again, which ingest's snapshot-id dedupe absorbs, and the reconcile of each
(re)connect reports what ended meanwhile, so no ended turn is lost.

aiokafka revokes every partition of every member at each rebalance (the eager protocol): every
replica restarts its hosts then, reconnecting and reconciling from the saved state. Rebalances
happen when replicas come and go, not when hosts change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from pipeline.collector.collector import Collector
from pipeline.collector.hosts import HostRecord, HostsAssignor, HostTableReader, changes
from pipeline.collector.sink import EventSink
from pipeline.config import HostConfig
from pipeline.errors import ConfigError
from pipeline.kafka.security import KafkaAccess, client_settings

log = logging.getLogger(__name__)

Resolve = Callable[[HostRecord], HostConfig]


class Replica:
    """Drives `collector` from the host table and the group's assignment; `await run()` until
    cancelled. `seed` records are written to the table first where it does not hold them as
    they are (`pipeline collect` seeds the config's `[[hosts]]`)."""

    def __init__(self, collector: Collector, sink: EventSink, kafka: KafkaAccess | str, resolve: Resolve, *,
                 session_timeout_s: float = 10.0, heartbeat_interval_s: float = 1.0,
                 seed: Sequence[HostRecord] = (), client_options: Mapping[str, Any] | None = None,
                 client_id: str = "opencode-collector") -> None:
        self.collector = collector
        self.settings = collector.settings
        self._sink = sink
        self._kafka = kafka
        self._resolve = resolve
        self._session_timeout_s = session_timeout_s
        self._heartbeat_interval_s = heartbeat_interval_s
        self._seed = list(seed)
        self._client_options = dict(client_options or {})
        self._client_id = client_id
        self.reader = HostTableReader(kafka, self.settings.hosts_topic, on_change=self._wake_up,
                                      client_options=client_options)
        self.assigned: set[int] = set()
        self.joined = asyncio.Event()  # set at the first assignment
        self.rebalances = 0
        self._running: dict[str, HostRecord] = {}  # followed hosts, with the record each was started from
        self._refused: dict[str, HostRecord] = {}  # records this replica cannot follow, logged once each
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one change of the followed set at a time (assign, revoke, table)

    @property
    def table(self) -> dict[str, HostRecord]:
        return {name: record for name, (_, record) in self.reader.table.hosts.items()}

    def _wake_up(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        reader = asyncio.create_task(self.reader.run(), name="collector:host-table")
        consumer: AIOKafkaConsumer | None = None
        try:
            await _first(reader, self.reader.ready.wait())
            if self._seed:
                await self._write_seed()
                await _first(reader, self.reader.sync())
            consumer = AIOKafkaConsumer(
                **client_settings(self._kafka), group_id=self.settings.group_id, client_id=self._client_id,
                enable_auto_commit=False, auto_offset_reset="latest",
                session_timeout_ms=int(self._session_timeout_s * 1000),
                heartbeat_interval_ms=int(self._heartbeat_interval_s * 1000),
                partition_assignment_strategy=(HostsAssignor(self.reader.table, self.settings.hosts_topic),),
                **self._client_options)
            consumer.subscribe([self.settings.hosts_topic], listener=_Listener(self, consumer))
            await consumer.start()
            while True:
                if reader.done():
                    reader.result()  # the table reader failed: so does the replica
                # Polling keeps the membership alive (max.poll.interval); the partitions are paused,
                # so nothing is fetched: the records are read whole by the table reader.
                await consumer.getmany(timeout_ms=500)
                if self._wake.is_set():
                    self._wake.clear()
                    await self._reconcile()
        finally:
            if consumer is not None:
                # Hosts first (their state saved), then leave the group: the others take them over at once.
                await self._stop_all()
                with contextlib.suppress(Exception):
                    await consumer.stop()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _write_seed(self) -> None:
        todo = changes(self.reader.table, self._seed)
        for record in todo:
            await self._sink.send(self.settings.hosts_topic, record.name.encode(), record.encode())
        await self._sink.flush()
        if todo:
            log.info("wrote %d hosts of the config to %s: %s", len(todo), self.settings.hosts_topic,
                     ", ".join(r.name for r in todo))

    # -- the group's callbacks --------------------------------------------

    async def revoked(self) -> None:
        """Partitions taken away: stop their hosts and save their state before returning."""
        async with self._lock:
            self.assigned = set()
            await self._stop(list(self._running))

    def assigned_to(self, partitions: set[int]) -> None:
        """Partitions given: follow their hosts (done by `run`, so the group's task is not held)."""
        self.assigned = partitions
        self.rebalances += 1
        self.joined.set()
        log.info("collector group: assigned partitions %s of %s", sorted(partitions), self.settings.hosts_topic)
        self._wake.set()

    # -- following ----------------------------------------------------------

    async def _reconcile(self) -> None:
        """Make the followed hosts the table's hosts on the assigned partitions, as they are now."""
        async with self._lock:
            wanted = self.reader.table.on(self.assigned)
            stale = [n for n, rec in self._running.items() if not rec.same_host(wanted.get(n))]
            await self._stop(stale)
            start: list[HostConfig] = []
            for name, record in sorted(wanted.items()):
                if name in self._running:
                    continue
                try:
                    start.append(self._resolve(record))
                except ConfigError as exc:
                    if not record.same_host(self._refused.get(name)):
                        log.error("host %s: not following it: %s", name, exc)
                    self._refused[name] = record
                    continue
                self._refused.pop(name, None)
                self._running[name] = record
            if start:
                await self.collector.follow(start)
            if stale or start:
                names = sorted(self._running)
                log.info("collecting from %d hosts: %s", len(names), ", ".join(names))

    async def _stop(self, names: list[str]) -> None:
        if not names:
            return
        for name in names:
            self._running.pop(name, None)
        await self.collector.unfollow(names, timeout_s=self.settings.shutdown_flush_timeout_s)
        log.info("stopped following %d hosts: %s", len(names), ", ".join(sorted(names)))

    async def _stop_all(self) -> None:
        async with self._lock:
            self.assigned = set()
            await self._stop(list(self._running))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, replica: Replica, consumer: AIOKafkaConsumer) -> None:
        self._replica, self._consumer = replica, consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._replica.revoked()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._consumer.pause(*assigned)
        self._replica.assigned_to({tp.partition for tp in assigned if tp.topic == self._replica.settings.hosts_topic})


async def _first(task: asyncio.Task[None], awaitable: Any) -> None:
    """Await `awaitable`, unless `task` (a helper it depends on) ends first: then raise what ended it."""
    waiter = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not waiter.done():
            waiter.cancel()
    if not waiter.done():
        task.result()
        raise RuntimeError("the host table reader ended")
    waiter.result()
