"""Consumer-group lag per stage: what an operator watches to see which stage to scale.

Every stage is its own consumer group (`Stage.app_id`) on one input topic. For each group
this reads, per input partition, the committed offset (from the group coordinator, through
the admin client) and the log start and end offsets (through a group-less consumer), and
derives the lag. Two samples some seconds apart give the group's consumption rate and so
the time to drain its lag; the stage with the longest time to drain is the bottleneck.

Nothing here joins a group or commits: the report is read-only against any cluster, and
works whether or not a stage is running.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    GroupCoordinatorNotAvailableError,
    GroupLoadInProgressError,
    KafkaError,
    NotCoordinatorForGroupError,
)
from rich.console import JustifyMethod
from rich.table import Table
from rich.text import Text

from pipeline import metrics
from pipeline.errors import BrokerError
from pipeline.kafka.admin import DEFAULT_TIMEOUT_S, start_client, unreachable
from pipeline.kafka.security import KafkaAccess, access_of, client_settings
from pipeline.topics import STAGES, Stage

log = logging.getLogger(__name__)

# The coordinator answers these while the offsets topic is being created (the first
# FindCoordinator on a fresh cluster creates it) or while a coordinator moves: worth a retry.
_COORDINATOR_BUSY = (GroupCoordinatorNotAvailableError, GroupLoadInProgressError, NotCoordinatorForGroupError)

# Group states in which nothing consumes and nothing ever did, if no offset is committed either.
_NO_MEMBERS_STATES = {"Dead", "Empty", None}


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    committed: int | None  # None: the group never committed on this partition
    start: int  # log start offset: retention moves it forward
    end: int  # high watermark: the offset the next record written gets

    @property
    def position(self) -> int:
        """Where the group resumes: its commit, or the log start (faust resets to earliest)
        when it never committed or its commit points at records retention already deleted."""
        return self.start if self.committed is None else max(self.committed, self.start)

    @property
    def lag(self) -> int:
        # Clamped: a topic deleted and recreated leaves old commits beyond the new end.
        return max(0, self.end - self.position)

    @property
    def expired(self) -> int:
        """Records retention deleted before this group read them: data the stage lost."""
        return 0 if self.committed is None else max(0, self.start - self.committed)


@dataclass(frozen=True)
class StageLag:
    stage: str
    group: str
    topic: str
    topic_exists: bool
    partitions: tuple[PartitionLag, ...] = ()
    state: str | None = None  # the coordinator's group state: Stable, Empty, Dead (no such group), ...
    members: int | None = None
    rate: float | None = None  # records/s the group committed past; None until two samples exist
    in_rate: float | None = None  # records/s appended to the input topic over the same span
    error: str | None = None

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def end_total(self) -> int:
        return sum(p.end for p in self.partitions)

    @property
    def expired(self) -> int:
        return sum(p.expired for p in self.partitions)

    @property
    def group_exists(self) -> bool:
        """Has this group ever run: a commit on its input, or members right now."""
        return any(p.committed is not None for p in self.partitions) or bool(self.members) \
            or self.state not in _NO_MEMBERS_STATES

    @property
    def drain_s(self) -> float | None:
        """Seconds to consume the current lag at the measured rate, as if input stopped now.
        None: rate not measured yet, or no topic; inf: lag and nothing consumed over the interval."""
        if not self.topic_exists or self.error:
            return None
        if self.lag == 0:
            return 0.0
        if self.rate is None:
            return None
        return math.inf if self.rate <= 0 else self.lag / self.rate

    @property
    def stalled(self) -> bool:
        return self.drain_s == math.inf


@dataclass(frozen=True)
class LagReport:
    bootstrap: str
    taken_at: float  # wall clock (epoch seconds), for display
    stages: tuple[StageLag, ...]
    interval_s: float | None = None  # the span rates were measured over; None: no rates
    monotonic: float = 0.0  # for rates against a later report; meaningless across processes

    def stage(self, name: str) -> StageLag:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(name)

    @property
    def absent(self) -> list[str]:
        """Stages whose group never ran (not deployed, or dying before its first commit)."""
        return [s.stage for s in self.stages if s.topic_exists and not s.error and not s.group_exists]

    @property
    def bottleneck(self) -> str | None:
        """The stage to scale: the longest time to drain; by lag when rates are unknown, and
        by lag among stalled stages. Groups that never ran are left out: a stage that is not
        deployed (the passthrough wiring check, in production) would otherwise always win
        with the whole topic as its lag. They are listed in `absent` instead."""
        candidates = [s for s in self.stages
                      if s.topic_exists and not s.error and s.group_exists and s.lag > 0]
        if not candidates:
            return None
        if any(s.rate is None for s in candidates):
            return max(candidates, key=lambda s: s.lag).stage
        return max(candidates, key=lambda s: (s.drain_s or 0.0, s.lag)).stage


def _explain(exc: BaseException) -> str:
    # aiokafka's broker errors already start with their class name; its client errors may be empty.
    text = str(exc)
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}".rstrip(": ")


def _stage_list(stages: Mapping[str, Stage] | Iterable[Stage]) -> list[Stage]:
    return list(stages.values()) if isinstance(stages, Mapping) else list(stages)


class LagCollector:
    """Holds one admin client and one group-less consumer, so `--watch` and the worker's
    exporter do not reconnect on every sample."""

    def __init__(self, kafka: KafkaAccess | str, *, request_timeout_ms: int = int(DEFAULT_TIMEOUT_S * 1000),
                 coordinator_wait_s: float = 15.0, **client_options: Any) -> None:
        """`request_timeout_ms` bounds starting (a listener that accepts and never answers
        included) and every request after. How to connect (TLS, SASL) comes with `kafka`;
        `client_options` go to both aiokafka clients as they are."""
        self.kafka = kafka
        self.bootstrap = access_of(kafka).bootstrap
        self.coordinator_wait_s = coordinator_wait_s
        self.timeout_s = request_timeout_ms / 1000
        common = {**client_settings(kafka), "request_timeout_ms": request_timeout_ms,
                  "client_id": "pipeline-lag", **client_options}
        self._admin = AIOKafkaAdminClient(**common)
        # group_id=None: reading offsets must never join, rebalance or commit for a stage's group.
        self._consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **common)

    async def start(self) -> LagCollector:
        """Connect both clients; BrokerError (one line, naming the bootstrap) when the broker
        cannot be reached or does not answer within the request timeout."""
        try:
            await start_client(self._admin, self.kafka, self.timeout_s)
            await start_client(self._consumer, self.kafka, self.timeout_s)
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        # Both, whether or not they started: an unstopped consumer warns when collected.
        # A half-broken client failing to close must not mask the error that got us here.
        with contextlib.suppress(Exception):
            await self._consumer.stop()
        with contextlib.suppress(Exception):
            await self._admin.close()

    async def __aenter__(self) -> LagCollector:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def sample(self, stages: Mapping[str, Stage] | Iterable[Stage] = STAGES) -> LagReport:
        """One snapshot, without rates. Raises BrokerError when the cluster stops answering."""
        try:
            return await self._sample(_stage_list(stages))
        except (TimeoutError, KafkaError, OSError) as exc:
            raise unreachable(self.kafka, exc, self.timeout_s) from None

    async def _sample(self, wanted: list[Stage]) -> LagReport:
        # All topics in one metadata request. Naming a missing topic in a metadata request
        # would create it on a broker with auto.create.topics.enable, so only existing ones are.
        described = await self._admin.describe_topics(None)
        parts_of = {d["topic"]: sorted(p["partition"] for p in d["partitions"])
                    for d in described if not d.get("error_code")}
        # Committed offsets first, end offsets after: a record committed in between then
        # shows as lag rather than as a negative one.
        groups = await asyncio.gather(*(self._group(s.app_id, s.input) for s in wanted))
        tps = [TopicPartition(t, p) for t in {s.input for s in wanted if s.input in parts_of} for p in parts_of[t]]
        starts = await self._consumer.beginning_offsets(tps) if tps else {}
        ends = await self._consumer.end_offsets(tps) if tps else {}
        out = []
        for stage, (committed, state, members, error) in zip(wanted, groups, strict=True):
            if stage.input not in parts_of:
                out.append(StageLag(stage.name, stage.app_id, stage.input, False, state=state, members=members,
                                    error=error))
                continue
            partitions = tuple(
                PartitionLag(p, committed.get(p), starts[TopicPartition(stage.input, p)],
                             ends[TopicPartition(stage.input, p)])
                for p in parts_of[stage.input])
            out.append(StageLag(stage.name, stage.app_id, stage.input, True, partitions, state, members,
                                error=error))
        return LagReport(self.bootstrap, time.time(), tuple(out), monotonic=time.monotonic())

    async def collect(self, stages: Mapping[str, Stage] | Iterable[Stage] = STAGES, *,
                      interval_s: float | None = None, previous: LagReport | None = None) -> LagReport:
        """A snapshot with rates: against `previous` if given, else from a second sample
        `interval_s` later; without either, rates stay None."""
        if previous is None and interval_s:
            previous = await self.sample(stages)
            await asyncio.sleep(interval_s)
        current = await self.sample(stages)
        return with_rates(current, previous) if previous is not None else current

    async def _group(self, group: str, topic: str) -> tuple[dict[int, int], str | None, int | None, str | None]:
        """Committed offsets on `topic` by partition, the group's state and member count, error."""
        deadline = time.monotonic() + self.coordinator_wait_s
        delay = 0.1
        while True:
            try:
                offsets = await self._admin.list_consumer_group_offsets(group)
                break
            except _COORDINATOR_BUSY as exc:
                if time.monotonic() + delay > deadline:
                    return {}, None, None, f"group coordinator not available: {exc}"
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except KafkaError as exc:  # e.g. not authorised for this group: report it, go on with the rest
                return {}, None, None, _explain(exc)
        # -1 means "no offset" in OffsetFetch answers.
        committed = {tp.partition: meta.offset for tp, meta in offsets.items()
                     if tp.topic == topic and meta.offset >= 0}
        state, members = await self._describe(group)
        return committed, state, members, None

    async def _describe(self, group: str) -> tuple[str | None, int | None]:
        # One group per request: aiokafka 0.14 decodes a v3 DescribeGroups answer with the v2
        # schema, which only keeps the first group intact. State is informative only, so a
        # failure here leaves it unknown rather than failing the report.
        try:
            answers = await self._admin.describe_consumer_groups([group])
            for g in answers[0].to_object()["groups"]:
                if g["group"] == group and not g["error_code"]:
                    return g["state"], len(g["members"])
        except (KafkaError, IndexError, KeyError) as exc:
            log.debug("describe group %s: %s", group, exc)
        return None, None


def with_rates(current: LagReport, previous: LagReport) -> LagReport:
    """`current` with each group's consumption and input rates measured since `previous`."""
    dt = current.monotonic - previous.monotonic
    if dt <= 0:
        return current
    before = {s.group: s for s in previous.stages}
    stages = []
    for s in current.stages:
        prev = before.get(s.group)
        if prev is None or s.topic != prev.topic or not (s.topic_exists and prev.topic_exists) \
                or s.error or prev.error:
            stages.append(s)  # nothing comparable: the rate stays unknown
            continue
        old = {p.partition: p for p in prev.partitions}
        consumed = produced = 0
        for p in s.partitions:
            o = old.get(p.partition)
            if o is None:
                continue  # a partition added since: nothing to compare with
            # From commits only: retention moving the log start is not consumption. A first
            # commit counts from where the group started (the log start, as it never committed).
            if p.committed is not None:
                since = o.committed if o.committed is not None else o.start
                # Clamped per partition: an offset reset backwards is not negative throughput.
                consumed += max(0, p.committed - since)
            produced += max(0, p.end - o.end)
        stages.append(replace(s, rate=consumed / dt, in_rate=produced / dt))
    return replace(current, stages=tuple(stages), interval_s=dt)


async def collect_lag(kafka: KafkaAccess | str, stages: Mapping[str, Stage] | Iterable[Stage] = STAGES, *,
                      interval_s: float | None = None, previous: LagReport | None = None) -> LagReport:
    """One lag report for `stages` (default: every stage in the topic table).

    Rates come from `previous` (a report taken earlier in this process) or, failing that,
    from two samples `interval_s` apart; with neither they are None and the bottleneck is
    the stage with the largest lag. Raises BrokerError when the cluster cannot be reached.
    """
    async with LagCollector(kafka) as collector:
        return await collector.collect(stages, interval_s=interval_s, previous=previous)


# ---------------------------------------------------------------- output


def to_json(report: LagReport) -> dict[str, Any]:
    """A JSON-ready dict. An infinite drain time (stalled) is null with `stalled: true`."""
    def stage(s: StageLag) -> dict[str, Any]:
        drain = s.drain_s
        return {
            "stage": s.stage, "group": s.group, "topic": s.topic, "topic_exists": s.topic_exists,
            "group_exists": s.group_exists, "state": s.state, "members": s.members,
            # null, not 0, when the topic is missing: an unknown lag is not a caught-up stage
            "lag": s.lag if s.topic_exists else None, "end_total": s.end_total, "expired": s.expired,
            "rate": s.rate, "in_rate": s.in_rate,
            "drain_s": None if drain is None or math.isinf(drain) else drain, "stalled": s.stalled,
            "error": s.error,
            "partitions": [{"partition": p.partition, "committed": p.committed, "start": p.start, "end": p.end,
                            "lag": p.lag, "expired": p.expired} for p in s.partitions],
        }

    return {"bootstrap": report.bootstrap, "taken_at": report.taken_at, "interval_s": report.interval_s,
            "bottleneck": report.bottleneck, "absent_groups": report.absent,
            "stages": [stage(s) for s in report.stages]}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if math.isinf(seconds):
        return "∞ stalled"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def render_table(report: LagReport) -> Table:
    """The lag table: one row per stage, the bottleneck marked."""
    span = f"rates over {report.interval_s:.1f}s" if report.interval_s else "one sample, no rates yet"
    when = time.strftime("%H:%M:%S", time.localtime(report.taken_at))
    table = Table(title=f"consumer lag at {report.bootstrap}  {when}  ({span})", title_justify="left")
    columns: list[tuple[str, JustifyMethod]] = [
        ("stage", "left"), ("topic", "left"), ("group", "left"), ("lag", "right"), ("partition:lag", "left"),
        ("read/s", "right"), ("in/s", "right"), ("drain", "right")]
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)
    table.add_column("", overflow="fold")  # the note takes what width is left
    bottleneck = report.bottleneck
    for s in report.stages:
        if s.group_exists:
            group = f"{s.state or '?'} ({s.members if s.members is not None else '?'} members)"
        else:
            group = "no group" if s.state in ("Dead", None) else f"{s.state}, no commits"
        if s.error:
            note = Text(s.error, style="red")
        elif not s.topic_exists:
            note = Text("topic missing (pipeline topics create)", style="yellow")
        elif not s.group_exists:
            note = Text("group never ran", style="yellow")
        elif s.stage == bottleneck:
            note = Text("◀ bottleneck", style="bold red")
        else:
            note = Text("")
        if s.expired:
            note.append(f"  {s.expired} expired unread", style="red")
        by_part = " ".join(f"{p.partition}:{p.lag}" for p in s.partitions)
        lag_style = "bold red" if s.stage == bottleneck else ("yellow" if s.lag else "green")
        table.add_row(s.stage, s.topic, group, Text(f"{s.lag:,}" if s.topic_exists else "—", style=lag_style),
                      by_part, _rate(s.rate), _rate(s.in_rate), _duration(s.drain_s), note)
    return table


# ---------------------------------------------------------------- export (workers and `pipeline lag --serve`)


def export_report(report: LagReport) -> None:
    """Set the lag gauges for every stage in the report.

    `pipeline_consumer_lag` per partition; beside it, per stage, whether the reading worked,
    when it last did, the group's members and the time to drain. A stage whose reading failed
    (coordinator error, missing input topic) keeps its last lag numbers and says so through
    `pipeline_lag_export_ok` = 0 and an ageing timestamp, so alerts can tell "caught up" from
    "unknown"."""
    for s in report.stages:
        for p in s.partitions:
            metrics.CONSUMER_LAG.labels(s.stage, s.topic, str(p.partition)).set(p.lag)
        ok = s.topic_exists and not s.error
        metrics.LAG_EXPORT_OK.labels(s.stage).set(1 if ok else 0)
        if ok:
            metrics.LAG_EXPORT_TIMESTAMP.labels(s.stage).set(report.taken_at)
        if s.members is not None:
            metrics.CONSUMER_GROUP_MEMBERS.labels(s.stage).set(s.members)
        drain = s.drain_s
        if drain is None:
            # Unknown (no rate yet, or no reading): no sample rather than a made-up number.
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG_DRAIN.remove(s.stage)
        else:
            metrics.CONSUMER_LAG_DRAIN.labels(s.stage).set(drain)  # +Inf when stalled


def export_failure(stages: Iterable[Stage]) -> None:
    """The broker did not answer: every stage's reading failed. The lag numbers stay as they
    were; `pipeline_lag_export_ok` drops to 0 and the timestamp stops moving."""
    for stage in stages:
        metrics.LAG_EXPORT_OK.labels(stage.name).set(0)


class _RateWindow:
    """Rates over at least `window_s`: one interval of a few seconds catches faust's once a
    second commits mid-flight, so a short span makes time to drain jumpy."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._history: collections.deque[LagReport] = collections.deque()

    def add(self, report: LagReport) -> LagReport:
        """`report` with rates against the newest earlier report at least `window_s` old
        (or the oldest one kept, until one is)."""
        self._history.append(report)
        while len(self._history) > 2 and report.monotonic - self._history[1].monotonic >= self.window_s:
            self._history.popleft()
        oldest = self._history[0]
        return with_rates(report, oldest) if oldest is not report else report


async def export_stages_forever(kafka: KafkaAccess | str, stages: Sequence[Stage], interval_s: float = 15.0, *,
                                rate_window_s: float = 60.0, name: str = "lag export",
                                **client_options: Any) -> None:
    """Keep the lag gauges (`export_report`) current for `stages`, every `interval_s` seconds.

    The one export loop: a worker runs it for its own stage, `pipeline lag --serve` for every
    stage, so both export the same series. A broker that cannot be reached is reported
    (`export_failure`, a warning when the problem changes) and retried with backoff; this
    never raises but for cancellation, so the process serving /metrics stays up and says
    what is wrong. Cancel the task to stop it.
    """
    rates = _RateWindow(rate_window_s)
    backoff = 1.0
    problem: str | None = None  # logged when it changes, not every interval

    def note(now: str | None) -> None:
        nonlocal problem
        if now != problem:
            log.log(logging.WARNING if now else logging.INFO, "%s: %s", name, now or "ok")
            problem = now

    while True:
        collector = LagCollector(kafka, coordinator_wait_s=min(interval_s, 15.0), **client_options)
        try:
            await collector.start()
            backoff = 1.0
            while True:
                report = rates.add(await collector.sample(stages))
                export_report(report)
                troubles = [f"{s.stage}: {s.error or f'input topic {s.topic} does not exist'}"
                            for s in report.stages if s.error or not s.topic_exists]
                note("; ".join(troubles) or None)
                await asyncio.sleep(interval_s)
        except (TimeoutError, KafkaError, BrokerError, OSError) as exc:
            export_failure(stages)
            note(f"{exc}; retrying")
            log.debug("%s: retrying in %.0fs", name, backoff)
        finally:
            await collector.close()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max(interval_s, 1.0) * 4)


async def export_lag_forever(kafka: KafkaAccess | str, stage_name: str, interval_s: float = 15.0) -> None:
    """Keep `pipeline_consumer_lag{stage=stage_name}` (and its companions) current, every
    `interval_s` seconds.

    Run inside a worker: every replica exports the same numbers for its group, so dashboards
    take `max by (stage, topic, partition)`. When every replica is down nothing exports the
    stage's lag from here: `pipeline lag --serve` is the exporter that survives that.
    """
    await export_stages_forever(kafka, [STAGES[stage_name]], interval_s, name=f"lag export for {stage_name}")
