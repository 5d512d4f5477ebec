"""`KafkaStateStore`: each host's `HostState` in the compacted topic `collector.state`, keyed by
host name, so whichever replica follows a host next starts from what the last one reported.

Saving goes through the collector's own sink, after the flush that acknowledged the events the
state covers, and is itself flushed before `save` returns: when a replica hands a host over
(its group partitions revoked), the state is on the broker before the rebalance completes.
Loading reads only the partitions holding the hosts asked for, from the start to the end offsets
seen at the call, and keeps each host's last record; a host with none falls back to `fallback`
(the state files of `state_dir`, read-only: how a collector from before this topic hands over).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.collector.hosts import FETCH_BYTES, partition_of, partitions_of
from pipeline.collector.sink import EventSink
from pipeline.collector.state import HostState, StateStore
from pipeline.kafka.security import KafkaAccess, client_settings

log = logging.getLogger(__name__)


class KafkaStateStore:
    """A `StateStore` on a compacted topic; `loads` and `saves` count the calls, for tests."""

    def __init__(self, kafka: KafkaAccess | str, topic: str, sink: EventSink, *, fallback: StateStore | None = None,
                 client_options: Mapping[str, Any] | None = None) -> None:
        self.kafka, self.topic = kafka, topic
        self._sink = sink
        self._fallback = fallback
        self._client_options = dict(client_options or {})
        self.loads = 0
        self.saves = 0

    async def load(self, hosts: Collection[str]) -> dict[str, HostState]:
        wanted = set(hosts)
        found: dict[str, HostState] = {}
        if wanted:
            found = await self._read(wanted)
        self.loads += 1
        missing = wanted - set(found)
        if missing and self._fallback is not None:
            migrated = await self._fallback.load(missing)
            for host in migrated:
                log.info("host %s: no state in %s; starting from its state file", host, self.topic)
            found.update(migrated)
        return found

    async def _read(self, wanted: set[str]) -> dict[str, HostState]:
        consumer = AIOKafkaConsumer(**client_settings(self.kafka), group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", max_partition_fetch_bytes=FETCH_BYTES,
                                    **self._client_options)
        await consumer.start()
        try:
            partitions = await partitions_of(consumer, self.topic)
            if not partitions:
                return {}
            tps = sorted({TopicPartition(self.topic, partition_of(h, partitions)) for h in wanted})
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            latest: dict[str, bytes | None] = {}
            while not all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                batch = await consumer.getmany(*tps, timeout_ms=200)
                for msgs in batch.values():
                    for msg in msgs:
                        if msg.key is None:
                            continue
                        host = msg.key.decode("utf-8", "replace")
                        if host in wanted:
                            latest[host] = msg.value
        finally:
            await consumer.stop()
        out: dict[str, HostState] = {}
        for host, value in latest.items():
            if value is None:
                continue  # a tombstone: the state was forgotten
            try:
                state = HostState.from_dict(json.loads(value))
            except ValueError:
                state = None
            if state is None:
                log.warning("host %s: its state in %s is unreadable; starting fresh (ingest dedupes what "
                            "is re-reported)", host, self.topic)
                continue
            out[host] = state
        return out

    async def save(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        for host, data in states.items():
            await self._sink.send(self.topic, host.encode(), json.dumps(data, separators=(",", ":")).encode())
        await self._sink.flush()
        self.saves += 1
