"""The collector: every configured `opencode serve` daemon's `/global/event` -> Kafka.

One task per host, each on its own connection, so a host that refuses connections, stalls or
sends garbage costs only its own task. Per host:

- Stream: `GET /global/event`, each frame normalised (pipeline.envelope) and produced to
  `opencode.events` keyed `host:session_id`; frames that are not events go to `collector.dead`.
  No frame at all (not even a heartbeat) for `dead_after_heartbeats x heartbeat_period_s`
  means the connection is dead: reconnect, with exponential backoff and full jitter.
- Turn ends: `session.idle` or `session.status: idle` -> fetch `GET /session/{id}/message`
  (again, with backoff, until the last assistant message has `time.completed` or `error`,
  bounded) and `GET /session/{id}`, and produce a synthetic `pipeline.turn_ended`. Triggers for
  a session already being fetched are coalesced into one re-fetch after it.
- Reconcile: on every (re)connect, sessions updated since the last seen time that are idle now
  and whose content differs from what this collector last reported get a turn_ended with
  `backfill=True, source="reconcile"`. What was reported is kept per host in a state file,
  written only after the sink has flushed what it records, so a restart re-emits rather than
  loses (ingest dedupes by snapshot id).
- Poll fallback: some opencode releases send only heartbeats on the event stream. While no
  session frame has arrived for `poll_interval_s`, the same reconcile pass runs on a timer
  (`source="poll"`), which also notices sessions that were busy and are now idle.

`GET /session/status` is per instance directory in opencode 1.18.33 (without `?directory=` it
only shows the daemon's own working directory), while `GET /session`, `GET /session/{id}` and
its messages answer for every directory; so status is asked per directory of the sessions in
question, with one client per directory.

The sink is anything with `send(topic, key, value)` and `flush()`; `KafkaEventSink` is the
aiokafka one, with a bounded buffer that turns a broker outage into back-pressure on the host
tasks instead of memory growth.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
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

from pipeline.config import Config, HostConfig
from pipeline.envelope import (
    TURN_ENDED,
    EventFilter,
    MalformedEvent,
    Source,
    Trigger,
    normalise,
    turn_ended,
)
from pipeline.opencode.client import (
    InsecureHostError,
    MalformedFrame,
    OpencodeClient,
    OpencodeError,
    OpencodeNotFound,
)
from pipeline.records import MAX_RECORD_BYTES, dead_letter, encode
from pipeline.retry import RetryPolicy
from pipeline.snapshot import snapshot_id
from pipeline.topics import PRODUCER_BATCH_BYTES, TOPICS

__all__ = [
    "DEAD_TOPIC",
    "EVENTS_TOPIC",
    "Clock",
    "Collector",
    "CollectorSettings",
    "EventSink",
    "HostState",
    "HostStats",
    "KafkaEventSink",
    "SinkClosed",
    "SystemClock",
    "default_client_factory",
    "state_file",
]

log = logging.getLogger(__name__)

EVENTS_TOPIC = TOPICS["opencode.events"].name
DEAD_TOPIC = TOPICS["collector.dead"].name
# Where a dead-lettered frame came from: not a topic, the daemon's stream.
SSE_SOURCE = "sse:/global/event"
STATE_VERSION = 1


# ---------------------------------------------------------------- clock, sink protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...  # wall clock, epoch ms: record timestamps

    def monotonic(self) -> float: ...  # seconds: durations

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class EventSink(Protocol):
    """Where the collector's records go. `send` may wait: that is the back-pressure."""

    async def send(self, topic: str, key: bytes, value: bytes) -> None: ...

    async def flush(self) -> None: ...


class SinkClosed(RuntimeError):
    pass


# ---------------------------------------------------------------- Kafka sink

# Resending these gets the same refusal, so retrying would stall every host behind one record.
_PERMANENT_KAFKA_ERRORS = (
    MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError, InvalidTopicError,
    TopicAuthorizationFailedError, CorruptRecordException,
)


@dataclass(frozen=True, slots=True)
class _Record:
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
        bootstrap_servers: str,
        *,
        max_buffered: int = 10_000,
        batch_size: int = 500,
        client_id: str = "opencode-collector",
        max_request_size: int = MAX_RECORD_BYTES + 1024 * 1024,
        # zstd (cramjam): aiokafka's gzip runs at level 9 in the event loop, which held the
        # sink to ~300 turn records/s (bench/README.md, collector)
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
        self._bootstrap = bootstrap_servers
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
            producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, **self._producer_kwargs)
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


# ---------------------------------------------------------------- settings, stats, state


@dataclass(frozen=True)
class CollectorSettings:
    enabled: bool = True
    max_messages: int = 25
    heartbeat_period_s: float = 10.0
    dead_after_heartbeats: int = 3
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    # Silent-stream fallback: reconcile every this many seconds while no session frame comes.
    poll_interval_s: float = 10.0  # 0 disables
    settle_initial_s: float = 0.25
    settle_max_delay_s: float = 2.0
    settle_timeout_s: float = 10.0
    fetch_attempts: int = 3
    max_concurrent_fetches: int = 4  # per host
    reconcile_max_sessions: int = 100
    first_start_lookback_s: float = 24 * 3600.0
    reconcile_slack_s: float = 600.0
    max_tracked_sessions: int = 2000
    state_dir: Path | None = None
    checkpoint_interval_s: float = 5.0
    shutdown_flush_timeout_s: float = 10.0
    max_record_bytes: int = MAX_RECORD_BYTES
    event_filter: EventFilter = field(default_factory=EventFilter)
    events_topic: str = EVENTS_TOPIC
    dead_topic: str = DEAD_TOPIC

    def __post_init__(self) -> None:
        for name in ("heartbeat_period_s", "reconnect_min_s", "reconnect_max_s", "settle_initial_s",
                     "settle_max_delay_s", "checkpoint_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"collector.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("dead_after_heartbeats", "max_messages", "fetch_attempts",
                     "max_concurrent_fetches", "reconcile_max_sessions", "max_tracked_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"collector.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.poll_interval_s < 0 or self.settle_timeout_s < 0:
            raise ValueError("collector.poll_interval_s and settle_timeout_s must be >= 0")

    @property
    def silence_s(self) -> float:
        return self.heartbeat_period_s * self.dead_after_heartbeats

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> CollectorSettings:
        """From the validated config: its `[collector]` section, `maxMessages`, `enabled`.

        Keys the section does not declare keep their defaults here.
        """
        section = config.collector
        values: dict[str, Any] = {"enabled": config.enabled, "max_messages": config.max_messages}
        for name in ("heartbeat_period_s", "dead_after_heartbeats", "reconnect_min_s",
                     "reconnect_max_s", "poll_interval_s", "settle_timeout_s",
                     "reconcile_max_sessions", "first_start_lookback_s", "checkpoint_interval_s"):
            value = getattr(section, name, None)
            if value is not None:
                values[name] = value
        state_dir = getattr(section, "state_dir", "")
        if state_dir:
            values["state_dir"] = Path(state_dir).expanduser()
        values["event_filter"] = EventFilter.from_config(getattr(section, "drop_event_types", None))
        values.update(overrides)
        return cls(**values)


@dataclass
class HostStats:
    """Plain counters per host for the metrics module; monotonically increasing except flags."""

    host: str
    connected: bool = False
    connections: int = 0
    reconnects: int = 0
    events_in: int = 0
    events_out: int = 0
    events_filtered: int = 0
    events_malformed: int = 0
    turns_emitted: int = 0
    turns_unchanged: int = 0
    backfills: int = 0
    reconciles: int = 0
    polls: int = 0
    fetch_failures: int = 0
    unsettled_turns: int = 0
    trimmed_turns: int = 0
    oversize_drops: int = 0
    last_error: str | None = None
    last_frame_at_ms: int | None = None


@dataclass
class HostState:
    """What one host's collector has reported, persisted so a restart neither loses nor doubles.

    `sessions[id]` = {snapshot_id, last_message_id, last_message_digest, session_updated,
    reported_at}: the last reported turn is known by its final message (id and digest), which
    stays in later listings unchanged, not by `snapshot_id`, whose window moves once a session
    outgrows `max_messages`. Files from before `last_message_digest` still load (see
    `_already_reported`); `snapshot_id` stays for collectors that predate it.
    `watermark_ms` is the newest session `time.updated` handled; reconcile looks at sessions
    updated after it (minus a slack) and at none older, except on first start.
    """

    watermark_ms: int | None = None
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self, host: str) -> dict[str, Any]:
        return {"version": STATE_VERSION, "host": host, "watermark_ms": self.watermark_ms,
                "sessions": {k: dict(v) for k, v in self.sessions.items()}}

    @classmethod
    def load(cls, path: Path) -> HostState:
        """A missing or unreadable file starts fresh: that re-emits, which ingest absorbs."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            log.warning("collector state %s unreadable (%s); starting fresh", path, exc)
            return cls()
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            log.warning("collector state %s has an unknown layout; starting fresh", path)
            return cls()
        watermark = data.get("watermark_ms")
        sessions = data.get("sessions")
        return cls(watermark_ms=watermark if isinstance(watermark, int) else None,
                   sessions={k: v for k, v in sessions.items() if isinstance(v, dict)}
                   if isinstance(sessions, dict) else {})

    @staticmethod
    def save(path: Path, data: Mapping[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, separators=(",", ":"))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def state_file(state_dir: Path, host: str) -> Path:
    # Host names are free text; the hash keeps two names that sanitise alike apart.
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", host)[:64]
    digest = hashlib.sha256(host.encode("utf-8")).hexdigest()[:8]
    return state_dir / f"collector-{safe}-{digest}.json"


ClientFactory = Callable[[HostConfig, "str | None"], OpencodeClient]


def reserialised(frame: Any) -> bytes:
    """The bytes a rejected frame's dead letter holds: the client parsed the wire bytes, so the
    frame is written back as JSON. A lone surrogate (a `\\ud800` escape on the wire, legal JSON)
    cannot be UTF-8: that frame is written with its non-ASCII escaped, as the wire had it."""
    try:
        return json.dumps(frame, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(frame, ensure_ascii=True, default=str).encode("ascii")


def default_client_factory(host: HostConfig, directory: str | None) -> OpencodeClient:
    password = host.password.reveal() if host.password is not None else None
    return OpencodeClient(host.base_url, password, directory=directory,
                          allow_insecure_http=host.allow_insecure_http)


# ---------------------------------------------------------------- one host


@dataclass(frozen=True)
class _TurnRequest:
    trigger: Trigger
    source: Source
    backfill: bool


def _idle_trigger(envelope: Mapping[str, Any]) -> Trigger | None:
    if envelope["type"] == "session.idle":
        return "session.idle"
    if envelope["type"] == "session.status":
        status = envelope["properties"].get("status")
        if isinstance(status, Mapping) and status.get("type") == "idle":
            return "session.status"
    return None


def _settled(listing: Sequence[Mapping[str, Any]]) -> bool:
    """True when the last assistant message has finished (completed or failed)."""
    for message in reversed(listing):
        info = message.get("info") or {}
        if info.get("role") == "assistant":
            time_ = info.get("time") if isinstance(info.get("time"), Mapping) else {}
            return bool(time_.get("completed") or info.get("error"))
    return True


def _finished(info: Mapping[str, Any]) -> bool:
    """An assistant message that ends its turn: failed, or completed with a final finish reason
    (a completed message that stopped for tool calls is followed by another in the same turn)."""
    time_ = info.get("time") if isinstance(info.get("time"), Mapping) else {}
    return bool(info.get("error")) or (bool(time_.get("completed")) and info.get("finish") != "tool-calls")


def completed_turns(listing: Sequence[Mapping[str, Any]]) -> list[int]:
    """End indexes (exclusive) of every completed turn in a listing, oldest first.

    A turn is a user message and the assistant messages after it. It is complete when the next
    user message exists, or when its last assistant message finished. The idle of one turn can
    be fetched after the next prompt was already sent: the listing then ends in a turn still in
    progress, which must not be reported as (or hide) the turn that ended.
    """
    ends: list[int] = []
    roles = [(m.get("info") or {}).get("role") for m in listing]
    for i, message in enumerate(listing):
        if roles[i] != "assistant":
            continue
        next_role = roles[i + 1] if i + 1 < len(listing) else None
        if next_role == "user" or (next_role is None and _finished(message.get("info") or {})):
            ends.append(i + 1)
    return ends


def _settled_timeout(listing: Sequence[Mapping[str, Any]]) -> bool:
    """A listing whose last turn never finished in time is still reported as it is."""
    return bool(listing) and (listing[-1].get("info") or {}).get("role") == "assistant"


def _has_assistant(listing: Sequence[Mapping[str, Any]]) -> bool:
    return any((m.get("info") or {}).get("role") == "assistant" for m in listing)


def _message_id(message: Mapping[str, Any]) -> Any:
    return (message.get("info") or {}).get("id")


def _message_digest(host: str, session_id: str, message: Mapping[str, Any]) -> str:
    """What a turn's final message holds (completion, error, parts), hashed as snapshots are."""
    return snapshot_id(host, session_id, [message])


def _already_reported(previous: Mapping[str, Any] | None, last_message: Mapping[str, Any],
                      digest: str) -> bool:
    """Whether the turn ending in `last_message` was reported as it is now.

    Decided by that message alone: the window of messages sent with a turn is cut from the
    listing, which starts later as the session grows, so its snapshot id changes although the
    turn did not. A late update (an unsettled turn that settled) changes the final message.
    """
    message_id = _message_id(last_message)
    if previous is None or message_id is None or previous.get("last_message_id") != message_id:
        return False
    recorded = previous.get("last_message_digest")
    # A state file from before digests: the same final message is taken as that turn. A late
    # update to it goes unreported, once, rather than every long session's turn being re-sent.
    return recorded is None or recorded == digest


def _updated_ms(session: Mapping[str, Any]) -> int | None:
    time_ = session.get("time")
    value = time_.get("updated") if isinstance(time_, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _HostRunner:
    _MAX_DIRECTORY_CLIENTS = 32

    def __init__(self, host: HostConfig, sink: EventSink, settings: CollectorSettings,
                 clock: Clock, rng: random.Random, client_factory: ClientFactory) -> None:
        self.host = host
        self.stats = HostStats(host.name)
        self._sink = sink
        self._s = settings
        self._clock = clock
        self._client_factory = client_factory
        self._backoff = RetryPolicy(base_s=settings.reconnect_min_s, max_s=settings.reconnect_max_s,
                                    rng=rng)
        self.state_path = state_file(settings.state_dir, host.name) if settings.state_dir else None
        self.state = HostState.load(self.state_path) if self.state_path else HostState()
        self.dirty = False
        self._clients: dict[str | None, OpencodeClient] = {}
        self._busy: dict[str, str | None] = {}  # session id -> its directory
        # session id -> a re-fetch requested while one was running (None: none requested)
        self._inflight: dict[str, _TurnRequest | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._fetch_slots = asyncio.Semaphore(settings.max_concurrent_fetches)
        self._last_session_frame = clock.monotonic()

    # -- lifecycle ------------------------------------------------------

    async def run(self) -> None:
        attempt = 0
        try:
            while True:
                started = self._clock.monotonic()
                try:
                    await self._connection()
                    reason = "stream ended"
                except TimeoutError:
                    reason = f"no frame for {self._s.silence_s:.1f}s"
                except InsecureHostError as exc:
                    self.stats.last_error = str(exc)
                    log.error("host %s: %s; not collecting from it", self.host.name, exc)
                    return
                except OpencodeError as exc:
                    reason = str(exc)
                except Exception as exc:  # one host's bug must not end the others' collection
                    log.exception("host %s: collector error", self.host.name)
                    reason = f"{type(exc).__name__}: {exc}"
                was_connected, self.stats.connected = self.stats.connected, False
                self.stats.last_error = reason
                self.stats.reconnects += 1
                # A connection that stayed up a while resets the backoff; one that fails at
                # once keeps growing it, however often the daemon accepts and drops.
                healthy = self._clock.monotonic() - started >= self._s.heartbeat_period_s
                attempt = 1 if (was_connected and healthy) else attempt + 1
                delay = self._backoff.delay(attempt)
                log.warning("host %s: event stream lost (%s); reconnecting in %.2fs",
                            self.host.name, reason, delay)
                await self._clock.sleep(delay)
        finally:
            self.stats.connected = False
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for client in self._clients.values():
                with contextlib.suppress(Exception):
                    await client.aclose()
            self._clients.clear()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"collector:{self.host.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _client(self, directory: str | None) -> OpencodeClient:
        client = self._clients.get(directory)
        if client is None:
            if len(self._clients) >= self._MAX_DIRECTORY_CLIENTS:
                oldest = next(k for k in self._clients if k is not None)
                self._spawn(self._clients.pop(oldest).aclose(), "close-client")
            client = self._clients[directory] = self._client_factory(self.host, directory)
        return client

    async def _connection(self) -> None:
        loop = asyncio.get_running_loop()
        stream = self._client(None).events(global_=True)
        helpers: list[asyncio.Task[None]] = []
        try:
            async with asyncio.timeout(self._s.silence_s) as deadline:
                async for item in stream:
                    # The deadline covers waiting for the daemon only: a sink applying
                    # back-pressure must not look like a dead stream.
                    deadline.reschedule(None)
                    if not self.stats.connected:
                        self.stats.connected = True
                        self.stats.connections += 1
                        log.info("host %s: event stream connected", self.host.name)
                        helpers.append(self._spawn(self._reconcile_with_retry(), "reconcile"))
                        if self._s.poll_interval_s > 0:
                            helpers.append(self._spawn(self._poll_loop(), "poll"))
                    await self._handle(item)
                    deadline.reschedule(loop.time() + self._s.silence_s)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await stream.aclose()

    # -- frames ---------------------------------------------------------

    async def _handle(self, item: dict[str, Any] | MalformedFrame) -> None:
        self.stats.events_in += 1
        now = self._clock.now_ms()
        self.stats.last_frame_at_ms = now
        if isinstance(item, MalformedFrame):
            await self._dead(item.reason.replace("-", "_"), item.detail or item.reason,
                             item.raw.encode("utf-8", "replace"), now)
            return
        try:
            envelope = normalise(item, host=self.host.name, site_key=self.host.site_key,
                                 received_at_ms=now)
        except MalformedEvent as exc:
            await self._dead(exc.reason, exc.detail, reserialised(item), now)
            return
        if envelope is None:
            self.stats.events_filtered += 1
            return
        self._observe(envelope)
        if self._s.event_filter.keeps(envelope["type"]):
            await self._produce(envelope)
            self.stats.events_out += 1
        else:
            self.stats.events_filtered += 1
        trigger = _idle_trigger(envelope)
        if trigger is not None:
            self.request_turn_end(envelope["session_id"], _TurnRequest(trigger, "sse", False))

    def _observe(self, envelope: Mapping[str, Any]) -> None:
        self._last_session_frame = self._clock.monotonic()
        session_id, event_type = envelope["session_id"], envelope["type"]
        if event_type == "session.status":
            status = envelope["properties"].get("status")
            kind = status.get("type") if isinstance(status, Mapping) else None
            if kind in ("busy", "retry"):
                self._busy[session_id] = envelope.get("directory")
            elif kind == "idle":
                self._busy.pop(session_id, None)
        elif event_type in ("session.idle", "session.deleted"):
            self._busy.pop(session_id, None)

    async def _dead(self, reason: str, error: str, raw: bytes, now: int) -> None:
        self.stats.events_malformed += 1
        record = dead_letter(stage="collector", source_topic=SSE_SOURCE, raw=raw, reason=reason,
                             error=error, key=self.host.name, redrive_topic=self._s.events_topic,
                             detail={"host": self.host.name}, at=now)
        log.warning("host %s: malformed frame dead-lettered (%s)", self.host.name, reason)
        await self._sink.send(self._s.dead_topic, self.host.name.encode("utf-8"), encode(record))

    async def _produce(self, envelope: dict[str, Any]) -> None:
        value = encode(envelope)
        if len(value) > self._s.max_record_bytes and envelope["type"] == TURN_ENDED:
            value = self._trim(envelope)
        if len(value) > self._s.max_record_bytes:
            self.stats.oversize_drops += 1
            log.error("host %s: %s for session %s is %d bytes, over max_record_bytes %d; dropped",
                      self.host.name, envelope["type"], envelope["session_id"], len(value),
                      self._s.max_record_bytes)
            return
        key = f"{self.host.name}:{envelope['session_id']}".encode()
        await self._sink.send(self._s.events_topic, key, value)

    def _trim(self, envelope: dict[str, Any]) -> bytes:
        """Drop the oldest messages until the record fits: the snapshot is a tail anyway."""
        messages: list[Any] = envelope["properties"]["messages"]
        value = encode(envelope)
        while len(value) > self._s.max_record_bytes and len(messages) > 1:
            del messages[0]
            value = encode(envelope)
        self.stats.trimmed_turns += 1
        log.warning("host %s: turn_ended for %s trimmed to its last %d messages to fit %d bytes",
                    self.host.name, envelope["session_id"], len(messages), self._s.max_record_bytes)
        return value

    # -- turn ends ------------------------------------------------------

    def request_turn_end(self, session_id: str, request: _TurnRequest) -> None:
        if session_id in self._inflight:
            pending = self._inflight[session_id]
            # A live trigger outranks a reconcile one: it says the turn was seen ending.
            if pending is None or pending.source != "sse" or request.source == "sse":
                self._inflight[session_id] = request
            return
        self._inflight[session_id] = None
        self._spawn(self._turn_end_loop(session_id, request), f"turn-end:{session_id}")

    async def _turn_end_loop(self, session_id: str, request: _TurnRequest) -> None:
        try:
            while True:
                try:
                    await self._turn_end(session_id, request)
                except OpencodeError as exc:
                    self.stats.fetch_failures += 1
                    log.warning("host %s: turn end of %s not fetched (%s); the next reconcile "
                                "retries it", self.host.name, session_id, exc)
                next_request = self._inflight.get(session_id)
                if next_request is None:
                    return
                self._inflight[session_id] = None
                request = next_request
        finally:
            self._inflight.pop(session_id, None)

    async def _turn_end(self, session_id: str, request: _TurnRequest) -> None:
        client = self._client(None)
        for attempt in range(1, self._s.fetch_attempts + 1):
            try:
                async with self._fetch_slots:
                    listing = await self._settled_listing(client, session_id)
                    # After the listing, so a title set at the end of the turn is included.
                    session = await client.get_session(session_id)
                break
            except OpencodeNotFound:
                log.info("host %s: session %s is gone; no turn_ended", self.host.name, session_id)
                return
            except OpencodeError:
                if attempt == self._s.fetch_attempts:
                    raise
                await self._clock.sleep(self._backoff.delay(attempt))
        previous = self.state.sessions.get(session_id)
        ends = completed_turns(listing) or ([len(listing)] if _settled_timeout(listing) else [])
        for end in self._unreported(listing, ends, previous):
            kept = listing[:end][-self._s.max_messages:]
            snap = snapshot_id(self.host.name, session_id, kept)
            digest = _message_digest(self.host.name, session_id, listing[end - 1])
            if _already_reported(previous, listing[end - 1], digest):
                self.stats.turns_unchanged += 1
            elif request.source != "sse" and not _has_assistant(kept):
                pass  # nothing has answered yet, so no turn ended; remembered so polls skip it
            else:
                envelope = turn_ended(host=self.host.name, site_key=self.host.site_key, session=session,
                                      messages=kept, trigger=request.trigger,
                                      received_at_ms=self._clock.now_ms(), source=request.source,
                                      backfill=request.backfill)
                await self._produce(envelope)
                self.stats.turns_emitted += 1
                if request.backfill:
                    self.stats.backfills += 1
            self._remember(session_id, snap, kept, digest, _updated_ms(session))
            previous = self.state.sessions.get(session_id)

    @staticmethod
    def _unreported(listing: Sequence[Mapping[str, Any]], ends: list[int],
                    previous: Mapping[str, Any] | None) -> list[int]:
        """The turn ends after the last one this collector reported (all of them if it never
        reported this session, or if that message fell out of the listing window), and the
        reported one itself, which `_already_reported` tells apart from a late update."""
        last_id = previous.get("last_message_id") if previous else None
        ids = [_message_id(m) for m in listing]
        if last_id is not None and last_id in ids:
            reported_end = ids.index(last_id) + 1
            newer = [e for e in ends if e > reported_end]
            # the reported turn itself may have changed since (a late update): re-check it
            return [e for e in ends if e == reported_end] + newer
        return ends

    async def _settled_listing(self, client: OpencodeClient,
                               session_id: str) -> list[dict[str, Any]]:
        """The listing once the last assistant message has finished, or when waiting is over.

        Its last `message.updated` can land after `session.idle`; an unsettled listing is
        still emitted when the bound is reached, and the next idle or reconcile, seeing
        different content, emits the settled one.
        """
        delay, waited = self._s.settle_initial_s, 0.0
        while True:
            listing = await client.messages(session_id, limit=self._s.max_messages)
            if _settled(listing):
                return listing
            if waited >= self._s.settle_timeout_s:
                self.stats.unsettled_turns += 1
                log.warning("host %s: session %s still unfinished after %.1fs; emitting as is",
                            self.host.name, session_id, waited)
                return listing
            await self._clock.sleep(delay)
            waited += delay
            delay = min(delay * 2, self._s.settle_max_delay_s)

    def _remember(self, session_id: str, snap: str, kept: Sequence[Mapping[str, Any]],
                  last_message_digest: str, updated: int | None) -> None:
        self.state.sessions[session_id] = {
            "snapshot_id": snap, "last_message_id": _message_id(kept[-1]) if kept else None,
            "last_message_digest": last_message_digest, "session_updated": updated or 0,
            "reported_at": self._clock.now_ms(),
        }
        if len(self.state.sessions) > self._s.max_tracked_sessions:
            sessions = self.state.sessions
            oldest = sorted(sessions, key=lambda k: sessions[k]["reported_at"])
            for stale in oldest[: len(sessions) - self._s.max_tracked_sessions]:
                del sessions[stale]
        if updated is not None:
            self.state.watermark_ms = max(self.state.watermark_ms or 0, updated)
        self.dirty = True

    # -- reconcile and poll -----------------------------------------------

    async def _reconcile_with_retry(self) -> None:
        for attempt in range(1, self._s.fetch_attempts + 1):
            try:
                await self.reconcile("reconcile")
                return
            except OpencodeError as exc:
                log.warning("host %s: reconcile failed (%s)", self.host.name, exc)
                if attempt < self._s.fetch_attempts:
                    await self._clock.sleep(self._backoff.delay(attempt))

    async def _poll_loop(self) -> None:
        while True:
            await self._clock.sleep(self._s.poll_interval_s)
            if self._clock.monotonic() - self._last_session_frame < self._s.poll_interval_s:
                continue
            self.stats.polls += 1
            try:
                await self.reconcile("poll")
            except OpencodeError as exc:
                log.info("host %s: status poll failed (%s)", self.host.name, exc)

    async def reconcile(self, source: Source) -> None:
        """Request a turn end for every recently updated session that is idle and unreported."""
        sessions = await self._client(None).list_sessions(limit=self._s.reconcile_max_sessions)
        if self.state.watermark_ms is None:
            floor = self._clock.now_ms() - int(self._s.first_start_lookback_s * 1000)
        else:
            floor = self.state.watermark_ms - int(self._s.reconcile_slack_s * 1000)
        candidates: list[tuple[str, str | None]] = []
        for info in sessions:
            session_id, updated = info.get("id"), _updated_ms(info)
            if not isinstance(session_id, str) or updated is None:
                continue
            previous = self.state.sessions.get(session_id)
            if session_id not in self._busy:
                if previous is not None and updated <= previous.get("session_updated", 0):
                    continue
                if previous is None and updated < floor:
                    continue
            directory = info.get("directory")
            candidates.append((session_id, directory if isinstance(directory, str) else None))
        if source == "reconcile":
            self.stats.reconciles += 1
        if not candidates:
            return
        busy, unknown = await self._busy_in({d for _, d in candidates})
        for session_id, directory in candidates:
            if directory in unknown:
                continue  # status unknown: never report a turn that may still be running
            if session_id in busy:
                self._busy[session_id] = directory
                continue
            self._busy.pop(session_id, None)
            # Live and polled turn ends were seen during a connection; only a reconnect's are
            # backfill in the schema's sense.
            request = _TurnRequest("reconcile", source, backfill=source == "reconcile")
            self.request_turn_end(session_id, request)

    async def _busy_in(self, directories: Iterable[str | None]) -> tuple[set[str], set[str | None]]:
        busy: set[str] = set()
        unknown: set[str | None] = set()
        for directory in directories:
            try:
                busy.update(await self._client(directory).session_status())
            except OpencodeError as exc:
                unknown.add(directory)
                log.info("host %s: status of %s unknown (%s)", self.host.name, directory, exc)
        return busy, unknown


# ---------------------------------------------------------------- the collector


class Collector:
    """Runs one independent task per host; `await run()` until `stop()` (or cancellation)."""

    def __init__(
        self,
        hosts: Sequence[HostConfig],
        producer: EventSink,
        *,
        settings: CollectorSettings | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        client_factory: ClientFactory = default_client_factory,
    ) -> None:
        names = [h.name for h in hosts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate host names: {', '.join(duplicates)}")
        self.settings = settings or CollectorSettings()
        self._sink = producer
        self._clock = clock or SystemClock()
        rng = rng or random.Random()
        self._runners = {
            h.name: _HostRunner(h, producer, self.settings, self._clock,
                                random.Random(rng.random()), client_factory)
            for h in hosts
        }
        self._stop = asyncio.Event()
        self.checkpoints = 0

    @property
    def stats(self) -> dict[str, HostStats]:
        return {name: runner.stats for name, runner in self._runners.items()}

    def totals(self) -> dict[str, int]:
        """Every numeric counter summed over hosts, plus how many hosts are connected."""
        out: dict[str, int] = {}
        for stats in self.stats.values():
            for key, value in asdict(stats).items():
                if isinstance(value, bool):
                    out[key] = out.get(key, 0) + int(value)
                elif isinstance(value, int) and key != "last_frame_at_ms":
                    out[key] = out.get(key, 0) + value
        return out

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        if not self.settings.enabled:
            log.info("collector disabled (enabled = false or PANEL_OPENCODE_DISABLED=1)")
            return
        self._stop.clear()
        tasks = [asyncio.create_task(r.run(), name=f"collector:{name}")
                 for name, r in self._runners.items()]
        checkpointer = asyncio.create_task(self._checkpoint_loop(), name="collector:checkpoint")
        try:
            await self._stop.wait()
        finally:
            for task in [*tasks, checkpointer]:
                task.cancel()
            await asyncio.gather(*tasks, checkpointer, return_exceptions=True)
            await self._checkpoint(timeout_s=self.settings.shutdown_flush_timeout_s)

    async def _checkpoint_loop(self) -> None:
        while True:
            await self._clock.sleep(self.settings.checkpoint_interval_s)
            try:
                await self._checkpoint(timeout_s=None)
            except Exception:
                log.exception("collector checkpoint failed; retrying next interval")

    async def _checkpoint(self, timeout_s: float | None) -> None:
        """Persist what was reported, once the sink holds none of it in memory any more."""
        due = {r: r.state.to_dict(r.host.name) for r in self._runners.values()
               if r.dirty and r.state_path is not None}
        if not due:
            return
        for runner in due:
            runner.dirty = False
        try:
            if timeout_s is None:
                await self._sink.flush()
            else:
                await asyncio.wait_for(self._sink.flush(), timeout_s)
        except (TimeoutError, SinkClosed) as exc:
            for runner in due:
                runner.dirty = True
            # Not saving leaves the old state: the next start re-emits instead of losing.
            log.warning("collector state not saved: the sink did not flush (%s)", exc or "timeout")
            return
        for runner, data in due.items():
            assert runner.state_path is not None
            HostState.save(runner.state_path, data)
        self.checkpoints += 1
