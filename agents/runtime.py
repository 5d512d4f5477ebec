"""The one place stages meet faust: the app factory, the output sinks, the state table, the
followers, and the one agent loop every stage's core (agents/stage.py) is bound to.

At least once, exactly: an input offset is committed only after every output of its record is
acknowledged by the broker, or the record is in the stage's dead-letter topic with its reason.
- faust acknowledges a record whose agent raised, so the loop never lets a record's failure
  out: a record that cannot be processed is dead-lettered with its reason and original bytes.
- Outputs are sent for a whole batch and awaited together before the batch is acknowledged
  (no round trip per record). A write the broker refuses for what it is (too large for the
  topic) dead-letters that record; any other failure to write (unknown topic, authorization,
  timeouts) holds the batch, uncommitted, and sends what failed again with backoff.
- The agent loop reads its input from the consumer directly (agents/intake.py) and
  acknowledges a batch only then: a batch it leaves before that (shutdown, a bug) is never
  acknowledged, so it is read again instead of committed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import faust
from aiokafka import AIOKafkaProducer
from aiokafka import errors as kafka_errors

from agents import consumer_drain
from agents.intake import DEFAULT_CAPACITY, Intake
from agents.stage import (
    Encoded,
    Handler,
    Meta,
    Out,
    StagedTable,
    encode_output,
    key_bytes,
    process_record,
    publisher,
)
from pipeline import metrics
from pipeline.clock import SystemClock
from pipeline.config import Config
from pipeline.delivery.breaker import BreakerSettings
from pipeline.delivery.gate import OUTCOMES, BreakerGate, OnThrottle, Role, replay_horizon_ms
from pipeline.delivery.retry import RetryPolicy
from pipeline.health import Liveness, lasting
from pipeline.kafka.follower import TopicFollower
from pipeline.kafka.partitioner import key_partitioner
from pipeline.kafka.security import KafkaAccess, faust_settings, kafka_access
from pipeline.logs import log_context
from pipeline.model.records import dead_letter, encode, original_bytes
from pipeline.topics import (
    DEAD_LETTER_BYTES,
    MAX_MESSAGE_BYTES,
    PRODUCER_BATCH_BYTES,
    STAGES,
    TABLES,
    TOPICS,
    Stage,
    changelog_configs,
    hours_ms,
    partitions_of,
)

log = logging.getLogger(__name__)
# How long a produce batch waits for more records. At 5 ms the broker took ~1.9 ms of CPU per
# delivered trace end to end, at 20 ms ~1.2 (fewer, larger requests; every stage's CPU per
# trace fell too, and the max rate rose ~20 %); 50 ms gained nothing more (bench/README.md). A
# batch of a stage's outputs that fills PRODUCER_BATCH_BYTES goes at once.
PRODUCER_LINGER_S = 0.02
# faust's default (1200 s) is how long a write waits for a topic's metadata or an acknowledgement
# before it fails: a deleted topic or a missing ACL would hold a batch in silence for 20 minutes.
PRODUCER_REQUEST_TIMEOUT_S = 60.0
EXIT_AGENT_FAILED = 70  # EX_SOFTWARE
# A rebalance takes seconds; a worker out of its group for this long is stuck (restart it).
OUT_OF_GROUP_S = 120.0


def make_app(stage: Stage | str, config: Config, **overrides: Any) -> faust.App:
    """One faust App per stage; its id is the stage's consumer group, and it connects as the
    stage's principal (`[kafka]` security keys, `KAFKA_SASL_PASSWORD_<STAGE>`): faust hands the
    credentials to its consumer and its producer, the followers get them from `app.kafka_access`."""
    consumer_drain.install()  # records reach the stream a fetched batch at a time
    stage = STAGES[stage] if isinstance(stage, str) else stage
    access = kafka_access(config, stage.name)
    settings: dict[str, Any] = {
        **faust_settings(access),
        "store": "memory://",
        "key_serializer": "raw",
        "value_serializer": "raw",
        "topic_partitions": config.kafka.partitions,
        "topic_replication_factor": config.kafka.replication,
        "consumer_auto_offset_reset": "earliest",
        "producer_acks": -1,
        "web_enabled": False,
        "broker_commit_every": 500,
        "broker_commit_interval": 1.0,
        "broker_session_timeout": config.kafka.session_timeout_s,
        "broker_heartbeat_interval": config.kafka.heartbeat_interval_s,
        "stream_wait_empty": False,
        "producer_max_request_size": DEAD_LETTER_BYTES,  # a dead letter is the largest record
        # Batches of records per produce request: a 25-message turn is ~20 KB, past faust's 16 KB
        # default batch, which would send every record as its own batch; and with no linger the
        # sender would ship each record as soon as the agent yields, one request per record. The
        # agent awaits the acks once per batch of records anyway.
        "producer_max_batch_size": PRODUCER_BATCH_BYTES,
        "producer_linger": PRODUCER_LINGER_S,
        "producer_request_timeout": PRODUCER_REQUEST_TIMEOUT_S,
        "consumer_max_fetch_size": MAX_MESSAGE_BYTES,
        "producer_partitioner": key_partitioner,  # Kafka's default, faster (pipeline/kafka/partitioner.py)
        "datadir": str(config.cache_dir / "faust" / stage.app_id),
    }
    settings.update(overrides)
    Path(settings["datadir"]).mkdir(parents=True, exist_ok=True)
    app = faust.App(stage.app_id, **settings)
    app.kafka_access = access
    watch_liveness(app)
    return app


def app_access(app: faust.App) -> KafkaAccess:
    """How the stage of `app` connects to Kafka (make_app set it)."""
    access: KafkaAccess = app.kafka_access
    return access


def watch_liveness(app: faust.App) -> Liveness:
    """The app's answer to /healthz: its loop beats, its Kafka consumer has not crashed, and it
    is not stuck out of its consumer group (`bind` adds: its agent still runs)."""
    liveness = Liveness()
    app.liveness = liveness

    @app.task
    async def beat() -> None:
        await liveness.run_beats()

    liveness.probe("consumer", lambda: _consumer_crash(app))
    liveness.probe("group", lasting(lambda: bool(app.rebalancing), OUT_OF_GROUP_S, "not in the consumer group"))
    return liveness


def _consumer_crash(app: faust.App) -> str | None:
    if app.crashed:
        return f"the app crashed: {app.crash_reason!r}"
    consumer = app._consumer  # only once started: the property would create one, here in the HTTP thread
    thread = getattr(consumer, "_thread", None)  # faust's aiokafka consumer runs in a thread of its own
    if thread is not None and thread.crashed:
        return f"the Kafka consumer crashed: {thread.crash_reason!r}"
    return None


def topic(app: faust.App, name: str, config: Config) -> faust.TopicT:
    spec = TOPICS[name]
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                     partitions=partitions_of(spec, config.kafka.partitions))


# What the broker says of a record itself (it can never be written as it is): the record's input
# is dead-lettered. Every other failure to produce (unknown topic, authorization, timeouts, a
# broker gone) is about the deployment: the batch waits, uncommitted, and is sent again.
REFUSED_AS_RECORD: tuple[type[BaseException], ...] = (
    kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError,
    kafka_errors.RecordTooLargeError, kafka_errors.InvalidTimestampError,
)
# A dead letter the broker refuses as too large is written again with less of the original:
# its first 64 KiB, then none of it (the reason, the error and where it came from stay).
DEAD_LETTER_SHRINK_STEPS = (64 * 1024, 0)
HOLD_RETRY_BASE_S = 0.5
HOLD_RETRY_MAX_S = 30.0


class Sinks:
    """The stage's output topics, written through the app's producer.

    `send` puts one output on its way at once (for outputs a handler must publish before it
    returns: outcome records other replicas wait for); `drain` returns once all of those are
    acknowledged. `put` writes a batch's outputs and returns only when every output of every
    record is acknowledged or the record is in the dead-letter topic: the agent loop commits
    nothing before it returns.
    """

    def __init__(self, app: faust.App, config: Config, stage: Stage) -> None:
        self.stage = stage
        self._app = app
        self._topics = {name: topic(app, name, config) for name in {*stage.outputs, stage.dead}}
        # each counter child looked up once: labels() takes a lock and builds a key per call
        self._counted = {name: metrics.RECORDS_OUT.labels(stage.name, name) for name in self._topics}
        self._sent: list[tuple[Encoded, asyncio.Future[Any]]] = []
        self._backoff = RetryPolicy(base_s=HOLD_RETRY_BASE_S, max_s=HOLD_RETRY_MAX_S, rng=random.Random())

    def encoded(self, out: Out, plain: bool | None = None) -> Encoded:
        """`out` checked (an output of this stage, valid for its topic) and written to bytes;
        RecordError when it cannot be written."""
        return encode_output(self.stage, out, plain)

    async def send(self, out: Out) -> None:
        item = self.encoded(out)
        future = await self._dispatch(item)
        # appended after the await: `self._sent.append(..., await ...)` would bind the list first,
        # and a concurrent drain that swapped it meanwhile would never wait for this one
        self._sent.append((item, future))

    async def drain(self) -> None:
        """Return once everything `send` put on its way is acknowledged; what the broker did not
        take is sent again with backoff until it is (such an output belongs to no one input
        record that could be dead-lettered instead)."""
        sent, self._sent = self._sent, []
        if not sent:
            return
        errors = await self._acks([future for _, future in sent])
        failed = [item for (item, _), error in zip(sent, errors, strict=True) if error is not None]
        attempt = 0
        while failed:
            attempt += 1
            await self._hold(attempt, failed, [e for e in errors if e is not None])
            errors = await self.write(failed)
            failed = [item for item, error in zip(failed, errors, strict=True) if error is not None]

    async def write(self, items: Sequence[Encoded]) -> list[BaseException | None]:
        """Produce every item and wait for every acknowledgement: per item, the error, or None
        where the broker took it."""
        futures = [await self._dispatch(item) for item in items]
        errors = await self._acks(futures)
        taken: dict[str, int] = {}
        for item, error in zip(items, errors, strict=True):
            if error is None:
                taken[item.topic] = taken.get(item.topic, 0) + 1
        for name, count in taken.items():
            self._counted[name].inc(count)
        return errors

    async def put(self, records: Sequence[tuple[Meta, Sequence[Encoded]]]) -> None:
        """Every output of every record acknowledged, or the record dead-lettered (with why);
        until then the batch is held and what failed is sent again with backoff.

        The broker refuses a whole produce batch when it is too large for the topic, so after
        such a refusal the outputs are sent one at a time: the one still refused alone is the
        one too large, and only its record goes to the dead-letter topic."""
        pending = [_Pending(i, item) for i, (_, items) in enumerate(records) for item in items]
        one_at_a_time = False
        dead: set[int] = set()  # records whose dead letter is on its way: no second one
        attempt = 0
        while pending:
            if one_at_a_time:
                errors = [(await self.write([p.item]))[0] for p in pending]
            else:
                errors = await self.write([p.item for p in pending])
            failed = [(p, e) for p, e in zip(pending, errors, strict=True) if e is not None]
            if not failed:
                return
            if not one_at_a_time and len(pending) > 1 and any(_refused(e) for _, e in failed):
                one_at_a_time = True
                pending = [p for p, _ in failed]
                continue
            again: list[_Pending] = []
            held: list[tuple[_Pending, BaseException]] = []
            for p, error in failed:
                if not _refused(error):
                    again.append(p)
                    held.append((p, error))
                elif p.item.topic != self.stage.dead:
                    if p.record not in dead:  # one letter a record, whichever of its outputs was refused
                        dead.add(p.record)
                        again.append(_Pending(p.record, self._too_large_letter(records[p.record][0], p.item, error)))
                elif p.shrunk < len(DEAD_LETTER_SHRINK_STEPS):
                    again.append(_Pending(p.record, _shrunk(p.item, DEAD_LETTER_SHRINK_STEPS[p.shrunk]), p.shrunk + 1))
                else:  # even a letter without the original is refused: the topic's limit is wrong
                    again.append(p)
                    held.append((p, error))
            if held:
                attempt += 1
                await self._hold(attempt, [p.item for p, _ in held], [e for _, e in held])
            pending = again

    def _too_large_letter(self, meta: Meta, refused: Encoded, error: BaseException) -> Encoded:
        """The input record's dead letter after the broker refused its output `refused`."""
        metrics.DEAD_LETTERS.labels(self.stage.dead, "output_too_large").inc()
        log.error("stage %s: the broker refused a %d-byte record for %s (%s); its input %s[%d]@%d goes to %s",
                  self.stage.name, len(refused.data), refused.topic, type(error).__name__, self.stage.input,
                  meta.partition, meta.offset, self.stage.dead)
        letter = dead_letter(stage=self.stage.name, source_topic=self.stage.input, raw=meta.raw,
                             reason="output_too_large",
                             error=f"the broker refused {len(refused.data)} bytes for {refused.topic}: "
                                   f"{type(error).__name__}",
                             key=meta.key, partition=meta.partition, offset=meta.offset,
                             detail={"refused_topic": refused.topic, "refused_bytes": len(refused.data)})
        return Encoded(self.stage.dead, key_bytes(meta.key), encode(letter))

    async def _hold(self, attempt: int, items: Sequence[Encoded], errors: Sequence[BaseException]) -> None:
        topics = sorted({item.topic for item in items})
        kinds = sorted({type(e).__name__ for e in errors})
        for name in kinds:
            for t in topics:
                metrics.PRODUCE_FAILURES.labels(self.stage.name, t, name).inc()
        delay = self._backoff.delay(attempt)
        denied = sorted({item.topic for item, e in zip(items, errors, strict=True)
                         if isinstance(e, kafka_errors.TopicAuthorizationFailedError)})
        if denied:
            access: KafkaAccess | None = getattr(self._app, "kafka_access", None)
            who = (access.principal if access is not None else None) or "this stage's principal"
            log.error("stage %s: %s lacks the ACL to WRITE TOPIC %s (TopicAuthorizationFailedError); the batch is "
                      "held, uncommitted, until it is granted (`pipeline kafka acls` grants every stage what it "
                      "needs). Retry %d in %.1fs", self.stage.name, who, ", ".join(denied), attempt, delay)
            await asyncio.sleep(delay)
            return
        log.error("stage %s: the broker did not take %d record(s) for %s (%s: %s); the batch is held, "
                  "uncommitted: check that the topics exist and that this stage may write them. Retry %d in %.1fs",
                  self.stage.name, len(items), ", ".join(topics), ", ".join(kinds),
                  str(errors[0])[:200], attempt, delay)
        await asyncio.sleep(delay)

    async def _dispatch(self, item: Encoded) -> asyncio.Future[Any]:
        """The acknowledgement of `item`, as a future: a refusal before it was queued (no metadata
        for the topic, a record over the request size) is a future holding that error."""
        producer = await self._kafka_producer()
        try:
            return await producer.send(item.topic, item.data, key=item.key)
        except kafka_errors.KafkaError as exc:
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    @staticmethod
    async def _acks(futures: Sequence[asyncio.Future[Any]]) -> list[BaseException | None]:
        results = await asyncio.gather(*futures, return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    async def _kafka_producer(self) -> AIOKafkaProducer:
        """The app's own aiokafka producer (faust's settings: acks, batching, linger, its
        partitioner). Records go to it directly: faust's per-message wrapping around the same
        call cost more CPU than the send itself. faust flushes and stops this producer."""
        producer = await self._app.maybe_start_producer()
        return producer._ensure_producer()  # type: ignore[attr-defined]  # faust's aiokafka driver


@dataclass(frozen=True)
class _Pending:
    record: int  # index of the input record in its batch
    item: Encoded
    shrunk: int = 0  # for a dead letter: how many times it was written again with less of the original


def _shrunk(letter: Encoded, keep: int) -> Encoded:
    """A dead letter written again with only the first `keep` bytes of its original."""
    record = json.loads(letter.data)
    original = original_bytes(record)
    record["original_b64"] = base64.b64encode(original[:keep]).decode("ascii")
    record["detail"] = {**record.get("detail", {}), "original_truncated": True,
                        "original_bytes": record.get("detail", {}).get("original_bytes", len(original))}
    return Encoded(letter.topic, letter.key, encode(record))


def _refused(error: BaseException) -> bool:
    return isinstance(error, REFUSED_AS_RECORD)


def bind(app: faust.App, stage: Stage | str, config: Config, handler: Handler, *,
         sinks: Sinks | None = None, batch: int = 200, within_s: float = 0.05,
         parallel: bool = False, state: StagedTable | None = None) -> Sinks:
    """Register the stage's agent: decode + validate, handle, route outputs or dead letters.

    A batch is up to `batch` records, taken at once when they are there, else `within_s` after
    the loop asked for it (or when its first record arrives, if later). `parallel` runs the
    handler for every record of a batch at once (for stages that wait on a remote service);
    outputs are still sent in input order. A batch's `state` writes reach the table once its
    outputs are on the broker: state that says "already emitted" is written there, so a crash
    in between re-emits (a duplicate the next stage recognises) instead of losing. The next
    batch is handled while one is on its way to the broker (at most one: its outputs are sent
    once the one before is acknowledged), so the loop does not idle on acknowledgements.
    """
    stage = STAGES[stage] if isinstance(stage, str) else stage
    source = topic(app, stage.input, config)
    sinks = sinks or Sinks(app, config, stage)
    records_in = metrics.RECORDS_IN.labels(stage.name)

    async def process(message: Any) -> tuple[Meta, list[Encoded]]:
        raw = message.value if isinstance(message.value, bytes) else b""
        meta = Meta(message.key, message.partition, message.offset, raw)
        # every line logged while this record is handled says which record it was
        with log_context(stage=stage.name, topic=stage.input, partition=meta.partition, offset=meta.offset):
            return meta, await process_record(stage, handler, meta)

    stopped: list[str | None] = [None]  # why the agent is not running, once it stopped on its own
    app.liveness.probe("agent", lambda: stopped[0])
    intake = Intake(app, stage.input, capacity=max(DEFAULT_CAPACITY, 2 * batch))
    app.intake = intake  # the consumer's drain loop fills it (agents/consumer_drain.py)

    @app.agent(source, name=f"{stage.name}-agent")
    async def agent(stream: faust.StreamT) -> None:
        # The stream is never iterated: it subscribes the input topic and takes part in the
        # assignment; the records come through the intake (agents/intake.py says why).
        stopped[0] = None
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            stopped[0] = f"stopped: {type(exc).__name__}: {exc}"
            raise

    async def run() -> None:
        on_its_way: asyncio.Future[None] | None = None  # the batch before this one, until acknowledged
        try:
            while True:
                messages = await intake.take(batch, within_s)
                try:
                    records_in.inc(len(messages))
                    if parallel:
                        results = await asyncio.gather(*(process(m) for m in messages))
                    else:
                        results = [await process(m) for m in messages]
                    writes = state.seal() if state is not None else None
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:
                    loop_failed(exc)
                # One batch on its way at a time, in order: this one's outputs are sent once the
                # one before is acknowledged, which it was handled while waiting for.
                if on_its_way is not None:
                    await on_its_way
                on_its_way = asyncio.ensure_future(finish(messages, results, writes))
        finally:
            if on_its_way is not None and not on_its_way.done():
                on_its_way.cancel()  # shutdown: what is not acknowledged is read again

    async def finish(messages: list[Any], results: list[tuple[Meta, list[Encoded]]],
                     writes: dict[bytes, Any] | None) -> None:
        """Acknowledge a handled batch once every output of it is on the broker (or its record's
        dead letter is), and what its handlers sent on their own; its state is written then."""
        try:
            await sinks.put(results)
            await sinks.drain()  # what handlers sent on their own (outcome records)
            if state is not None and writes is not None:
                state.flush(writes)
            intake.ack(messages)
        except asyncio.CancelledError:  # shutdown: unacknowledged, read again
            raise
        except BaseException as exc:
            loop_failed(exc)

    def loop_failed(exc: BaseException) -> NoReturn:
        """A bug in the loop itself (every record's own failure is routed to its dead letter).
        The batch is not acknowledged, so nothing after it on its partitions can be committed:
        the partition would stall. Exit instead; the restarted worker reads it again."""
        log.critical("stage %s: the agent loop failed (%s: %s); exiting so that a restart reads the "
                     "batch again", stage.name, type(exc).__name__, exc, exc_info=True)
        logging.shutdown()
        os._exit(EXIT_AGENT_FAILED)

    return sinks


def state_table(app: faust.App, config: Config, stage: Stage | str) -> tuple[Any, asyncio.Event]:
    """A stage's changelog-backed table, keyed like its input records (raw bytes, JSON values),
    and an event set once the table may be written (see changelog_known).

    Tables here are written after a batch's outputs are on the broker (bind flushes the
    stage's StagedTable after the drain),
    outside stream iteration, so the key picks the changelog partition with the same
    partitioner as the producers (use_partitioner)."""
    stage = STAGES[stage] if isinstance(stage, str) else stage
    table = app.Table(TABLES[stage.name], default=None, key_type=bytes,
                      schema=faust.Schema(key_serializer="raw", value_serializer="json"),
                      use_partitioner=True,
                      extra_topic_configs=changelog_configs(hours_ms(config.kafka.unscrubbed_retention_hours)),
                      partitions=partitions_of(TOPICS[stage.input], config.kafka.partitions))
    writable = asyncio.Event()

    @app.task
    async def learn_changelog() -> None:
        await changelog_known(app, table)
        writable.set()

    return table, writable


async def changelog_known(app: faust.App, table: Any) -> None:
    """Return once the producer's metadata has `table`'s changelog topic.

    A table written outside stream iteration (use_partitioner=True) gets its changelog partition
    from faust's Producer.key_partition, which reads the producer's cached metadata and never
    fetches it: on a fresh broker faust creates the changelog topic at start, the cache does not
    have it, and the first write raised TypeError after the drain, crashing the agent; the same
    pending key crashed it again on every later batch and faust stopped feeding it, so the
    stage stalled with its process alive. partitions_for() fetches until the topic is there and
    keeps it among the producer's tracked topics."""
    await app.producer._ensure_producer().partitions_for(table.changelog_topic.get_topic_name())


def staged_table(app: faust.App, config: Config, stage: Stage | str) -> StagedTable:
    """The stage's state table as its core reads and writes it: writes wait for the batch's
    outputs (pass it to `bind(state=...)`), reads wait for the table to be writable."""
    table, writable = state_table(app, config, stage)
    return StagedTable(table, writable)


def follow(app: faust.App, follower: TopicFollower) -> TopicFollower:
    """Run `follower` for as long as the app runs (every replica reads the whole topic), as the
    app's principal."""
    if follower.kafka is None:
        follower.kafka = app_access(app)

    @app.task
    async def run_follower() -> None:
        await follower.run()

    return follower


def breaker_settings(config: Config) -> BreakerSettings:
    """The configured breaker settings (the `[breaker]` section)."""
    return BreakerSettings.from_section(config.breaker)


def breaker_gate(app: faust.App, config: Config, sinks: Sinks, stage: str, role: Role,
                 on_throttle: OnThrottle | None = None) -> BreakerGate:
    """The stage's breaker gate, publishing its outcomes through `sinks` and fed by a follower of
    every delivery.outcomes record since the replay horizon (every replica builds the same
    breaker state); it admits nothing before the follower has caught up."""
    gate = BreakerGate(breaker_settings(config), SystemClock(), publisher(sinks, OUTCOMES), stage=stage, role=role,
                       on_throttle=on_throttle)
    follow(app, TopicFollower(config, OUTCOMES, gate.apply_raw, replay_horizon_ms(gate.settings), ready=gate.ready))
    return gate
