"""The host table the collector replicas share: the compacted topic `collector.hosts`.

One record per host, keyed by its name: its `[[hosts]]` entry without any password (a record
names the environment variable, `password_env`, each replica reads the password from); a
tombstone removes the host. Every replica reads the whole topic (`HostTableReader`), so it knows
every host's config; which hosts it follows is decided by Kafka group membership: the consumer
group `panel-pipeline-collector` subscribes to this topic, and a replica follows exactly the
hosts whose records live on the partitions the group assigned to it (pipeline.collector.replica).

A record's partition is its key's (Kafka's murmur2 partitioner), so which partition holds a host
never depends on who wrote it: two replicas seeding the same config write the same record to the
same partition, and compaction keeps one. `assign_partitions`, run by the group's leader through
`HostsAssignor`, balances hosts rather than partitions: partitions hold different numbers of
hosts, and a plain round robin over 16 partitions could give one replica most of them.

Write access to this topic is write access to the collector's configuration: a record says which
URL a replica connects to with which password variable. Grant it (Kafka ACLs) to the collector's
principal and to operators only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

from pipeline.config import Config, HostConfig
from pipeline.config.loader import check_base_url
from pipeline.errors import ConfigError, SchemaError
from pipeline.kafka.partitioner import key_partitioner
from pipeline.kafka.security import KafkaAccess, client_settings
from pipeline.model import records

log = logging.getLogger(__name__)

HOST_SCHEMA = "collector-host.v1"
RECORD_KIND = "collector.host/1"
FETCH_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class HostRecord:
    """One host as the table holds it: a `[[hosts]]` entry with `password_env`, never a password."""

    name: str
    base_url: str
    password_env: str | None
    site_key: str
    model: str | None = None
    agent: str | None = None
    allow_insecure_http: bool = False
    updated_at_ms: int = 0

    def encode(self) -> bytes:
        return json.dumps({"schema": RECORD_KIND, **asdict(self)}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> HostRecord:
        """The record in `value`; SchemaError when it is no valid host record."""
        try:
            data = json.loads(value)
        except ValueError as exc:
            raise SchemaError(f"not JSON: {exc}") from None
        records.validate(HOST_SCHEMA, data)
        data.pop("schema")
        return cls(**data)

    def same_host(self, other: HostRecord | None) -> bool:
        """Whether `other` says the same (when it was written aside): nothing to rewrite or restart."""
        return other is not None and replace(self, updated_at_ms=0) == replace(other, updated_at_ms=0)

    def resolve(self, cfg: Config) -> HostConfig:
        """The `HostConfig` this replica connects with: the password from the variable the record
        names, read from this replica's environment, or else (a host whose password is inline in
        the config) from this replica's own `[[hosts]]` entry of that name. ConfigError when the
        named variable is unset here or the URL is plain http to a non-loopback host unasked."""
        check_base_url(self.base_url, self.allow_insecure_http, f"collector.hosts[{self.name}].base_url")
        password = None
        if self.password_env is not None:
            password = cfg.optional_secret(self.password_env)
            if password is None:
                raise ConfigError(f"host {self.name}: the environment variable {self.password_env} is unset "
                                  "or empty in this collector", f"collector.hosts[{self.name}].password_env")
        else:
            local = next((h for h in cfg.hosts if h.name == self.name), None)
            password = local.password if local is not None else None
        return HostConfig(name=self.name, base_url=self.base_url, password=password, site_key=self.site_key,
                          model=self.model, agent=self.agent, allow_insecure_http=self.allow_insecure_http)


def config_password_envs(cfg: Config) -> dict[str, str | None]:
    """Each `[[hosts]]` entry's `password_env`, by host name, read from the config file again: the
    loaded `HostConfig` holds the resolved password, and only the variable's name may be shared."""
    if cfg.source == "<defaults>":
        return {}
    try:
        raw = tomllib.loads(Path(cfg.source).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    hosts = raw.get("hosts")
    return {h["name"]: h.get("password_env") for h in hosts if isinstance(h, dict) and isinstance(h.get("name"), str)
            } if isinstance(hosts, list) else {}


def records_of(cfg: Config, now_ms: int) -> list[HostRecord]:
    """The config's `[[hosts]]` as table records: what `pipeline collect` seeds the table with.

    A host whose password is inline in the file gets `password_env` None: every replica must then
    have that host in its own config to connect with a password (prefer `password_env`)."""
    envs = config_password_envs(cfg)
    out = []
    for h in cfg.hosts:
        if h.password is not None and not envs.get(h.name):
            log.warning("host %s: its password is inline in the config; only replicas with the same [[hosts]] "
                        "entry can use it (use password_env to share it)", h.name)
        out.append(HostRecord(name=h.name, base_url=h.base_url, password_env=envs.get(h.name), site_key=h.site_key,
                              model=h.model, agent=h.agent, allow_insecure_http=h.allow_insecure_http,
                              updated_at_ms=now_ms))
    return out


# ---------------------------------------------------------------- the table


class HostTable:
    """Every live record of the hosts topic, by host name, with the partition it is on."""

    def __init__(self) -> None:
        self.partitions: list[int] = []  # the topic's partitions, once known
        self.hosts: dict[str, tuple[int, HostRecord]] = {}
        self.invalid = 0  # records that are no host record (and not tombstones): skipped, counted

    def apply(self, partition: int, key: bytes | None, value: bytes | None) -> bool:
        """Fold one record in; returns whether the table changed."""
        if key is None:
            self.invalid += 1
            return False
        name = key.decode("utf-8", "replace")
        if value is None:
            return self.hosts.pop(name, None) is not None
        try:
            record = HostRecord.decode(value)
        except (SchemaError, TypeError) as exc:
            self.invalid += 1
            log.error("collector.hosts: the record of %s at partition %d is no host record (%s); ignored",
                      name, partition, exc)
            return False
        if record.name != name:
            self.invalid += 1
            log.error("collector.hosts: a record keyed %s names host %s; ignored", name, record.name)
            return False
        previous = self.hosts.get(name)
        self.hosts[name] = (partition, record)
        return previous is None or previous[0] != partition or not record.same_host(previous[1])

    def on(self, partitions: Iterable[int]) -> dict[str, HostRecord]:
        """The hosts whose records are on `partitions`: what the replica owning them follows."""
        wanted = set(partitions)
        return {name: record for name, (p, record) in self.hosts.items() if p in wanted}

    def counts(self) -> dict[int, int]:
        """Hosts per partition (every known partition listed, empty ones with 0)."""
        out = dict.fromkeys(self.partitions, 0)
        for p, _ in self.hosts.values():
            out[p] = out.get(p, 0) + 1
        return out

    def record(self, name: str) -> HostRecord | None:
        entry = self.hosts.get(name)
        return entry[1] if entry else None


def partition_of(name: str, partitions: Sequence[int]) -> int:
    """The partition a host's record (and its state) is on: its key's, as every producer computes it."""
    ordered = sorted(partitions)
    return key_partitioner(name.encode(), ordered, ordered)


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    """The topic's partitions from fresh metadata (a consumer subscribed to nothing has none)."""
    cluster = await consumer._client.fetch_all_metadata()
    return sorted(cluster.partitions_for_topic(topic) or ())


class HostTableReader:
    """Reads the whole hosts topic into a `HostTable`, outside any consumer group, until cancelled.

    `ready` is set once it has read up to the end offsets seen at start; `sync()` waits until it
    has read everything written before the call (a replica's own seeding, for one). `on_change`
    is called after each batch that changed the table."""

    def __init__(self, kafka: KafkaAccess | str, topic: str, *, on_change: Callable[[], None] | None = None,
                 client_options: Mapping[str, Any] | None = None) -> None:
        self.kafka, self.topic = kafka, topic
        self.table = HostTable()
        self.ready = asyncio.Event()
        self._on_change = on_change
        self._client_options = dict(client_options or {})
        self._consumer: AIOKafkaConsumer | None = None
        self._progress = asyncio.Condition()

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(**client_settings(self.kafka), group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", max_partition_fetch_bytes=FETCH_BYTES,
                                    **self._client_options)
        await consumer.start()
        try:
            parts: list[int] = []
            while not parts:  # the topic may still be being created (topics create, or auto-create)
                parts = await partitions_of(consumer, self.topic)
                if not parts:
                    log.warning("topic %s has no partitions yet; run `pipeline topics create`", self.topic)
                    await asyncio.sleep(1.0)
            self.table.partitions = parts
            tps = [TopicPartition(self.topic, p) for p in parts]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            self._consumer = consumer
            ends = await consumer.end_offsets(tps)
            while True:
                batch = await consumer.getmany(timeout_ms=200)
                changed = False
                for tp, msgs in batch.items():
                    for msg in msgs:
                        changed = self.table.apply(tp.partition, msg.key, msg.value) or changed
                if changed and self._on_change is not None:
                    self._on_change()
                if not self.ready.is_set() and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                    self.ready.set()
                    log.info("read the host table %s: %d hosts", self.topic, len(self.table.hosts))
                async with self._progress:
                    self._progress.notify_all()
        finally:
            self._consumer = None
            await consumer.stop()

    async def sync(self) -> None:
        """Return once everything written to the topic before this call has been applied."""
        await self.ready.wait()
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("the host table reader is not running")
        tps = [TopicPartition(self.topic, p) for p in self.table.partitions]
        ends = await consumer.end_offsets(tps)
        async with self._progress:
            while not all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                await self._progress.wait()


async def read_table(kafka: KafkaAccess | str, topic: str, *, timeout_s: float = 30.0,
                     client_options: Mapping[str, Any] | None = None) -> HostTable:
    """The table as it is now: read to the end once (for `pipeline hosts list`, and seeding)."""
    reader = HostTableReader(kafka, topic, client_options=client_options)
    task = asyncio.create_task(reader.run())
    try:
        ready = asyncio.create_task(reader.ready.wait())
        await asyncio.wait([task, ready], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what ended it
        if not reader.ready.is_set():
            raise TimeoutError(f"could not read {topic} within {timeout_s:.0f}s")
        return reader.table
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def changes(table: HostTable, wanted: Iterable[HostRecord]) -> list[HostRecord]:
    """The records of `wanted` the table does not already hold as they are: seeding writes only
    these, so starting a replica again (or ten at once) rewrites nothing."""
    return [r for r in wanted if not r.same_host(table.record(r.name))]


# ---------------------------------------------------------------- who follows which partitions


def assign_partitions(hosts_per_partition: Mapping[int, int], members: Sequence[str]) -> dict[str, list[int]]:
    """Every partition to one member, balancing hosts first and partitions second.

    Partitions with the most hosts go first, each to the member with the fewest hosts so far (then
    the fewest partitions, then the first by id), so replicas differ by at most one partition's
    hosts. Empty partitions are spread too: a host added later lands on an owned partition.
    Deterministic: the same inputs give the same plan on whichever member leads the group."""
    if not members:
        return {}
    ordered = sorted(members)
    plan: dict[str, list[int]] = {m: [] for m in ordered}
    load = dict.fromkeys(ordered, 0)
    for partition in sorted(hosts_per_partition, key=lambda p: (-hosts_per_partition[p], p)):
        member = min(ordered, key=lambda m: (load[m], len(plan[m]), m))
        plan[member].append(partition)
        load[member] += hosts_per_partition[partition]
    return {m: sorted(ps) for m, ps in plan.items()}


class HostsAssignor(AbstractPartitionAssignor):
    """aiokafka's hook for the group leader's plan: `assign_partitions` over the host table's
    counts, as the leader has read them (a leader not caught up yet balances partitions only;
    the next rebalance balances hosts again)."""

    name = "collector-hosts"
    version = 0

    def __init__(self, table: HostTable, topic: str) -> None:
        self._table, self._topic = table, topic

    def assign(self, cluster: ClusterMetadata,  # type: ignore[override]
               members: Mapping[str, ConsumerProtocolMemberMetadata]) -> dict[str, ConsumerProtocolMemberAssignment]:
        partitions = sorted(cluster.partitions_for_topic(self._topic) or ())
        counts = self._table.counts()
        plan = assign_partitions({p: counts.get(p, 0) for p in partitions}, list(members))
        log.info("collector group plan: %s", {m: ps for m, ps in plan.items()})
        return {m: ConsumerProtocolMemberAssignment(self.version, [(self._topic, plan[m])], b"") for m in members}

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:  # type: ignore[override]
        return ConsumerProtocolMemberMetadata(self.version, list(topics), b"")

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:  # type: ignore[override]
        return None
