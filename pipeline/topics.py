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
# 25-message turn (~20 KB), so every such record became a batch and a request of its own
# (bench/README.md). Every producer of the pipeline, the stages' and the collector's, uses it.
PRODUCER_BATCH_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Topic:
    name: str
    schema: str  # file name under schemas/ without .json
    key: str  # what the record key is, for operators
    doc: str
    partitions: int | None = None  # None: the configured default (kafka.partitions)
    compacted: bool = False
    retention_ms: int = 7 * DAY_MS
    extra: dict[str, str] = field(default_factory=dict)

    def configs(self) -> dict[str, str]:
        # A turn of 25 messages with tool output can pass Kafka's 1 MiB default record limit; a
        # dead letter holds a record of up to that size in base64 (4/3) plus its envelope.
        limit = DEAD_LETTER_BYTES if self.schema == "dead-letter.v1" else MAX_MESSAGE_BYTES
        cfg = {"retention.ms": str(self.retention_ms), "max.message.bytes": str(limit)}
        if self.compacted:
            cfg["cleanup.policy"] = "compact,delete"
        cfg.update(self.extra)
        return cfg


@dataclass(frozen=True)
class Stage:
    """A stream stage: its faust app id (so its consumer group), input, outputs, dead letters."""

    name: str
    input: str
    outputs: tuple[str, ...]
    dead: str
    doc: str

    @property
    def app_id(self) -> str:
        return f"panel-pipeline-{self.name}"


HOST_SESSION = "host:session_id"

TOPICS: dict[str, Topic] = {t.name: t for t in [
    Topic("opencode.events", "event.v1", HOST_SESSION, "normalised opencode events from the collector"),
    Topic("sessions.idle", "snapshot.v1", HOST_SESSION, "one snapshot per ended turn"),
    Topic("traces.sampled", "trace-sampled.v1", HOST_SESSION, "forwarded turns in the panel's message shape"),
    # Compacted by snapshot id so a replica rebuilding the novelty window reads each session once;
    # retention bounds it to what a window of any sane lruSize can still hold.
    Topic("sampler.shipped", "shipped.v1", "site_key:snapshot_id",
          "MinHash signatures of forwarded sessions; every sampler replica reads all of it",
          partitions=1, compacted=True, retention_ms=30 * DAY_MS),
    Topic("traces.scrubbed", "trace-scrubbed.v1", HOST_SESSION, "traces whose text came back from the scrubber"),
    Topic("traces.signed", "trace-signed.v1", "trace_id", "canonical bodies with HMAC and attestation"),
    Topic("traces.outbox", "trace-signed.v1", "trace_id", "traces the breaker admitted for delivery"),
    # One partition: every breaker replica reads the whole history in order and reaches the same state.
    Topic("delivery.outcomes", "outcome.v1", "endpoint", "every attempt, admission and breaker transition",
          partitions=1, retention_ms=3 * DAY_MS),
    Topic("passthrough.out", "event.v1", HOST_SESSION, "output of the wiring-check stage"),
    *[Topic(f"{stage}.dead", "dead-letter.v1", "original key",
            f"records the {stage} stage could not process, with the reason", retention_ms=30 * DAY_MS)
      for stage in ("collector", "ingest", "sample", "scrub", "sign", "breaker", "passthrough")],
    Topic("traces.dead", "dead-letter.v1", "trace_id", "traces the panel refused (400/401/422)",
          retention_ms=30 * DAY_MS),
]}

STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("passthrough", "opencode.events", ("passthrough.out",), "passthrough.dead",
          "wiring check: validates and copies records"),
    Stage("ingest", "opencode.events", ("sessions.idle",), "ingest.dead",
          "dedupe events, per-session state, one snapshot per ended turn"),
    Stage("sample", "sessions.idle", ("traces.sampled", "sampler.shipped"), "sample.dead",
          "error / novelty / random decisions"),
    Stage("scrub", "traces.sampled", ("traces.scrubbed",), "scrub.dead", "one scrubber call per trace, fail closed"),
    Stage("sign", "traces.scrubbed", ("traces.signed",), "sign.dead", "canonical body, HMAC, attestation"),
    Stage("breaker", "traces.signed", ("traces.outbox", "delivery.outcomes"), "breaker.dead",
          "circuit breaker per panel endpoint: pass, hold or drop"),
    Stage("deliver", "traces.outbox", ("delivery.outcomes", "traces.dead"), "traces.dead",
          "POST to the panel, re-sign when stale, retry, dead-letter"),
]}

PIPELINE_STAGES = ("ingest", "sample", "scrub", "sign", "breaker", "deliver")


def partitions_of(topic: Topic, default: int) -> int:
    return topic.partitions if topic.partitions is not None else default


def dead_letter_topics() -> list[str]:
    return [name for name, t in TOPICS.items() if t.schema == "dead-letter.v1"]
