"""The one topic table: every topic, its shape on the broker, its key and its record schema.

Stages, the admin commands, lag reporting and dead-letter redrive all read this table;
no topic name is spelled anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DAY_MS = 24 * 3600 * 1000
MAX_MESSAGE_BYTES = 10 * 1024 * 1024
DEAD_LETTER_BYTES = MAX_MESSAGE_BYTES * 4 // 3 + 256 * 1024
# Producer batches (per partition, per request): aiokafka's 16 KB default is smaller than one
# 25-message turn (~20 KB), which would make every such record a batch and a request of its
# own. Every producer of the pipeline, the stages' and the collector's, uses it.
PRODUCER_BATCH_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Topic:
    name: str
    schema: str  # file name under schemas/ without .json: what is written to the topic
    key: str  # what the record key is, for operators
    doc: str
    partitions: int | None = None  # None: the configured default (kafka.partitions)
    compacted: bool = False
    retention_ms: int = 7 * DAY_MS
    # holds session content no scrubber has seen: kept no longer than `kafka.unscrubbed_retention_hours`
    unscrubbed: bool = False
    # a dead-letter topic: where `pipeline dead redrive` puts its letters back (None: nowhere)
    redrive_to: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    # older schemas still read from the topic (records written before an upgrade), each known by
    # the `schema` value its records carry
    reads: tuple[str, ...] = ()

    @property
    def schemas(self) -> tuple[str, ...]:
        """Every schema a record of the topic may have: the one written, then the older ones."""
        return (self.schema, *self.reads)

    def retention(self, unscrubbed_retention_ms: int | None = None) -> int:
        """Retention on the broker: an unscrubbed topic never keeps more than the configured bound."""
        if self.unscrubbed and unscrubbed_retention_ms is not None:
            return min(self.retention_ms, unscrubbed_retention_ms)
        return self.retention_ms

    def configs(self, unscrubbed_retention_ms: int | None = None) -> dict[str, str]:
        # A turn of 25 messages with tool output can pass Kafka's 1 MiB default record limit; a
        # dead letter holds a record of up to that size in base64 (4/3) plus its envelope.
        limit = DEAD_LETTER_BYTES if self.schema == "dead-letter.v1" else MAX_MESSAGE_BYTES
        cfg = {"retention.ms": str(self.retention(unscrubbed_retention_ms)), "max.message.bytes": str(limit)}
        if self.compacted:
            cfg["cleanup.policy"] = "compact,delete"
        cfg.update(self.extra)
        return cfg


@dataclass(frozen=True)
class Stage:
    """A stream stage: its faust app id (so its consumer group), input, outputs, dead letters, and
    the topics every replica follows whole outside the group (shared decision state)."""

    name: str
    input: str
    outputs: tuple[str, ...]
    dead: str
    doc: str
    follows: tuple[str, ...] = ()

    @property
    def app_id(self) -> str:
        return f"panel-pipeline-{self.name}"


HOST_SESSION = "host:session_id"
# The consumer group through which the collector replicas share the hosts of `collector.hosts`.
COLLECTOR_GROUP = "panel-pipeline-collector"
# Partitions of the collector's host table and state: at most this many collector replicas get hosts.
COLLECTOR_PARTITIONS = 16
SOURCE_RETENTION_MS = 7 * DAY_MS  # what the collector's topic keeps; nothing unscrubbed outlives it

STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("passthrough", "opencode.events", ("passthrough.out",), "passthrough.dead",
          "wiring check: validates and copies records"),
    Stage("ingest", "opencode.events", ("sessions.idle",), "ingest.dead",
          "dedupe events, per-session state, one snapshot per ended turn"),
    Stage("sample", "sessions.idle", ("traces.sampled", "sampler.shipped"), "sample.dead",
          "error / novelty / random decisions", follows=("sampler.shipped",)),
    Stage("scrub", "traces.sampled", ("traces.scrubbed",), "scrub.dead", "one scrubber call per trace, fail closed"),
    Stage("sign", "traces.scrubbed", ("traces.signed",), "sign.dead", "canonical body, HMAC, attestation"),
    Stage("breaker", "traces.signed", ("traces.outbox", "delivery.outcomes"), "breaker.dead",
          "circuit breaker per panel endpoint: pass, hold or drop", follows=("delivery.outcomes",)),
    Stage("deliver", "traces.outbox", ("delivery.outcomes", "traces.dead"), "traces.dead",
          "POST to the panel, re-sign when stale, retry, dead-letter", follows=("delivery.outcomes",)),
]}

# Where the scrub stage's input sits: a stage at or before it reads content no scrubber has seen.
_UNSCRUBBED_STAGES = frozenset({"passthrough", "ingest", "sample", "scrub"})


def _dead(name: str, stage: str, key: str, doc: str, redrive_to: str | None) -> Topic:
    # A dead letter holds the original bytes of what its stage read: unscrubbed up to the scrub
    # stage, so kept no longer than the source; scrubbed after it, kept for inspection.
    unscrubbed = stage in _UNSCRUBBED_STAGES or stage == "collector"
    return Topic(name, "dead-letter.v1", key, doc, unscrubbed=unscrubbed, redrive_to=redrive_to,
                 retention_ms=SOURCE_RETENTION_MS if unscrubbed else 30 * DAY_MS)


TOPICS: dict[str, Topic] = {t.name: t for t in [
    Topic("opencode.events", "event.v1", HOST_SESSION, "normalised opencode events from the collector",
          unscrubbed=True, retention_ms=SOURCE_RETENTION_MS),
    # keyed by the turn's prompt_ref (host:session_id for a turn without one): the sampler's pair
    # window is partitioned like it (README, "Pairwise across hosts")
    Topic("sessions.idle", "snapshot.v2", "prompt_ref", "one snapshot per ended turn", unscrubbed=True,
          reads=("snapshot.v1",)),
    Topic("traces.sampled", "trace-sampled.v2", HOST_SESSION, "forwarded turns in the panel's message shape",
          unscrubbed=True, reads=("trace-sampled.v1",)),
    # Compacted by snapshot id so a replica rebuilding the novelty window reads each session once;
    # retention bounds it to what a window of any sane lruSize can still hold. MinHash signatures
    # only: no text.
    Topic("sampler.shipped", "shipped.v1", "site_key:snapshot_id",
          "MinHash signatures of forwarded sessions; every sampler replica reads all of it",
          partitions=1, compacted=True, retention_ms=30 * DAY_MS),
    Topic("traces.scrubbed", "trace-scrubbed.v2", HOST_SESSION, "traces whose text came back from the scrubber",
          reads=("trace-scrubbed.v1",)),
    Topic("traces.signed", "trace-signed.v1", "trace_id", "canonical bodies with HMAC and attestation"),
    Topic("traces.outbox", "trace-signed.v1", "trace_id", "traces the breaker admitted for delivery"),
    # One partition: every breaker replica reads the whole history in order and reaches the same state.
    Topic("delivery.outcomes", "outcome.v1", "endpoint", "every attempt, admission and breaker transition",
          partitions=1, retention_ms=3 * DAY_MS),
    Topic("passthrough.out", "event.v1", HOST_SESSION, "output of the wiring-check stage", unscrubbed=True),
    # The collector's shared state: tables, not streams, so compacted and never deleted by age (a host
    # record or a host's reported turns must outlive any silence). Both keyed by host name with the same
    # partition count, so a host's state lives on the partition number of its host record, and a replica
    # reads only the state partitions it was assigned. The partition count bounds the useful replicas.
    Topic("collector.hosts", "collector-host.v1", "host",
          "the hosts the collector replicas share (config without passwords); a replica follows the hosts "
          "on the partitions its consumer group gave it", partitions=COLLECTOR_PARTITIONS, compacted=True,
          retention_ms=-1, extra={"cleanup.policy": "compact"}),
    Topic("collector.state", "collector-state.v1", "host",
          "per host: the turns the collector reported and its reconcile watermark; ids and digests, no text",
          partitions=COLLECTOR_PARTITIONS, compacted=True, retention_ms=-1, extra={"cleanup.policy": "compact"}),
    # the collector's letters are frames that never became events: nothing reads them but people
    _dead("collector.dead", "collector", "host", "frames the collector could not read, with the reason", None),
    *[_dead(stage.dead, stage.name, "original key", f"records the {stage.name} stage could not process, "
            "with the reason", stage.input) for stage in STAGES.values() if stage.name != "deliver"],
    # a refused trace goes back through the breaker, so a redrive never reaches a panel known to be down
    _dead("traces.dead", "deliver", "trace_id", "traces the panel refused (400/401/422), or that could not be "
          "delivered", "traces.signed"),
]}

# The stages' changelog-backed tables; faust names a table's topic `<app id>-<table>-changelog`.
TABLES: dict[str, str] = {"ingest": "session-state", "sample": "decided-snapshots"}


def changelog_topic(stage: str) -> str:
    return f"{STAGES[stage].app_id}-{TABLES[stage]}-changelog"


def changelog_configs(unscrubbed_retention_ms: int) -> dict[str, str]:
    """A table keyed like its input holds what the input held (ingest's: titles, directories):
    its changelog keeps it no longer than unscrubbed topics do, compacted or not."""
    return {"cleanup.policy": "compact,delete", "retention.ms": str(unscrubbed_retention_ms)}


PIPELINE_STAGES = ("ingest", "sample", "scrub", "sign", "breaker", "deliver")


def partitions_of(topic: Topic, default: int) -> int:
    return topic.partitions if topic.partitions is not None else default


def dead_letter_topics() -> list[str]:
    return [name for name, t in TOPICS.items() if t.schema == "dead-letter.v1"]


def unscrubbed_topics() -> list[str]:
    return [name for name, t in TOPICS.items() if t.unscrubbed]


def hours_ms(hours: float) -> int:
    return int(hours * 3600 * 1000)


def topic_table() -> list[dict[str, object]]:
    """The table as plain data, for what is not Python (the Helm chart's files/topics.json):
    every topic, then the stages' table changelogs. `partitions` None means the configured default
    (`kafka.partitions`); `configs` are at the table's own retention, which an `unscrubbed` topic
    caps at `kafka.unscrubbed_retention_hours`."""
    rows: list[dict[str, object]] = [
        {"name": t.name, "partitions": t.partitions, "compacted": t.compacted, "retention_ms": t.retention_ms,
         "unscrubbed": t.unscrubbed, "configs": t.configs()}
        for t in TOPICS.values()]
    # a changelog has its table's input's partitions (faust requires it), and holds that input's content
    for stage in TABLES:
        source = TOPICS[STAGES[stage].input]
        rows.append({"name": changelog_topic(stage), "partitions": source.partitions, "compacted": True,
                     "retention_ms": source.retention_ms, "unscrubbed": True,
                     "configs": changelog_configs(source.retention_ms)})
    return rows


if __name__ == "__main__":
    import json

    print(json.dumps(topic_table(), indent=2))
