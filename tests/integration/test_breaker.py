"""The circuit breaker on the real broker, every stage its own process (issue 5).

The stack runs sample -> scrub -> sign -> breaker -> deliver against the stub panel and
scrubber; tests produce tests/factory.py snapshots (with seeded secrets) to sessions.idle, as
the ingest stage would. Durations are shortened through the config file
(`StackSettings.extra_toml`), so each test takes seconds, not the production minutes.

The helpers here are shared by test_scrubber_outage.py and test_dead_letters.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from aiokafka.structs import OffsetAndMetadata

from devkit.kafka_local import LocalBroker
from devkit.local_stack import PipelineProcess, Stack, StackSettings, wait_for
from pipeline.kafka.admin import create_topics
from pipeline.model.records import encode
from pipeline.model.trace import trace_id
from pipeline.topics import STAGES
from tests.factory import snapshot
from tests.kafka_util import committed, end_offsets, produce, read_to_end

pytestmark = pytest.mark.integration

DELIVERY_STAGES = ("sample", "scrub", "sign", "breaker", "deliver")
BREAKER_GROUP = STAGES["breaker"].app_id
# Short enough for a test, long enough that a loaded 2-core machine still opens the breaker
# from one burst of retries: three failures within the window open it for open_s.
FAST_TOML = """
[breaker]
failure_threshold = {threshold}
failure_window_s = 10
open_s = {open_s}
mode = "{mode}"

[delivery]
retry_base_s = 0.2
retry_max_s = 1
attestation_refresh_s = 2
"""
REFRESH_S = 2
OPEN_S = 8
WAIT_S = 90  # generous: other test runs share the two cores


# ---------------------------------------------------------------- helpers (shared)


def fast_toml(*, open_s: float = 6, mode: str = "hold", threshold: int = 3, extra: str = "") -> str:
    return FAST_TOML.format(open_s=open_s, mode=mode, threshold=threshold) + extra


def delivery_stack(kafka: LocalBroker, workdir: Path, extra_toml: str,
                   stages: tuple[str, ...] = DELIVERY_STAGES) -> Stack:
    return Stack(StackSettings(bootstrap=kafka.bootstrap, workdir=workdir, stages=stages, extra_toml=extra_toml))


def unique_host(prefix: str) -> str:
    # The broker is shared by the whole session: a host of its own makes this test's trace
    # ids (derived from host, session and last message) its own too.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _commit_ends(bootstrap: str, group: str, topic: str) -> None:
    ends = {TopicPartition(topic, p): end for p, end in (await end_offsets(bootstrap, topic)).items()}
    committer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await committer.start()
    try:
        committer.assign(list(ends))
        await committer.commit({tp: OffsetAndMetadata(end, "") for tp, end in ends.items()})
    finally:
        await committer.stop()


def skip_leftovers(bootstrap: str, groups: Sequence[tuple[str, str]], timeout_s: float) -> None:
    """Commit each (group, topic) at its end offsets.

    The stage groups are shared by every stack on the session's broker, and records are
    delivered to the endpoint signed into them: what an earlier (failed) test left in the
    pipeline would be retried against its dead stub panel at the head of a partition, and
    block this test's traces behind it. A group with live members refuses the commit (a
    worker killed with -9 stays a member until its session times out), hence the retries.
    """
    def commit_all() -> bool:
        try:
            for group, topic in groups:
                asyncio.run(_commit_ends(bootstrap, group, topic))
        except KafkaError:
            return False
        return True

    wait_for(commit_all, timeout_s, interval_s=2, what=f"committing past leftovers for {groups}")


STAGE_GROUPS = [(STAGES[s].app_id, STAGES[s].input) for s in DELIVERY_STAGES]


@contextlib.contextmanager
def running(stack: Stack, extra_groups: Sequence[tuple[str, str]] = ()) -> Iterator[Stack]:
    """The stack started past anything earlier tests left, and nothing of this one left to later
    tests (its stub panel is gone with it) when it stops."""
    groups = [*STAGE_GROUPS, *extra_groups]
    asyncio.run(create_topics(stack.s.bootstrap, stack.s.partitions, 1))
    skip_leftovers(stack.s.bootstrap, groups, timeout_s=WAIT_S)
    try:
        with stack.start():
            yield stack
    finally:
        # best effort: the test's own outcome is what gets reported
        with contextlib.suppress(TimeoutError):
            skip_leftovers(stack.s.bootstrap, groups, timeout_s=30)


def snapshots(host: str, indices: Iterable[int], **kw: Any) -> list[dict[str, Any]]:
    return [snapshot(i, host=host, with_secrets=True, **kw) for i in indices]


def expected_trace_id(snap: dict[str, Any]) -> str:
    """The id the sample stage gives the snapshot's trace (host, session, last message)."""
    return trace_id(snap["host"], snap["session_id"], snap["messages"][-1]["info"]["id"])


def send_snapshots(bootstrap: str, snaps: Sequence[dict[str, Any]]) -> set[str]:
    """Produce to sessions.idle as the ingest stage does; the trace ids the sampler will give them
    (sampling_rate 1.0 forwards every one)."""
    asyncio.run(produce(bootstrap, "sessions.idle",
                        [(f"{s['host']}:{s['session_id']}".encode(), encode(s)) for s in snaps]))
    return {expected_trace_id(s) for s in snaps}


def sampled_ids(bootstrap: str, host: str) -> set[str]:
    return {r["trace_id"] for r in read_values(bootstrap, "traces.sampled") if r["host"] == host}


def forward(stack: Stack, snaps: Sequence[dict[str, Any]]) -> set[str]:
    """Produce the snapshots and wait until the sampler forwarded every one of them."""
    ids = send_snapshots(stack.s.bootstrap, snaps)
    host = snaps[0]["host"]
    try:
        wait_for(lambda: ids <= sampled_ids(stack.s.bootstrap, host), WAIT_S, interval_s=0.5,
                 what=f"{len(ids)} traces on traces.sampled")
    except TimeoutError as exc:
        pytest.fail(f"{exc}: the sample stage did not forward them\n{stack.procs['sample'].log()[-3000:]}")
    return ids


def read_topic(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    """Every record on `topic` now (up to the end offsets when called)."""
    return asyncio.run(read_to_end(bootstrap, topic))


def read_values(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    return [json.loads(m.value) for m in read_topic(bootstrap, topic)]


def outcomes(stack: Stack) -> list[dict[str, Any]]:
    """This stack's delivery.outcomes, in topic order (one partition: the order all replicas see)."""
    return [o for o in read_values(stack.s.bootstrap, "delivery.outcomes") if o["endpoint"] == stack.panel_url]


def transitions(stack: Stack) -> list[tuple[str, str]]:
    return [(o["detail"]["from"], o["detail"]["to"]) for o in outcomes(stack) if o["status"] == "transition"]


async def _lag(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    ends = await end_offsets(bootstrap, topic)
    done = await committed(bootstrap, group)
    # nothing committed yet: the group starts from the beginning (auto_offset_reset earliest)
    return {p: end - done.get((topic, p), 0) for p, end in ends.items()}


def lag(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Per partition: end offset minus the group's committed offset."""
    return asyncio.run(_lag(bootstrap, group, topic))


def wait_committed(bootstrap: str, group: str, topic: str, what: str) -> None:
    """Until `group` has committed everything on `topic` (no lag on any partition)."""
    wait_for(lambda: not any(lag(bootstrap, group, topic).values()), WAIT_S, what=what)


def accepted_ids(stack: Stack) -> set[str]:
    return {t["trace_id"] for t in stack.panel_accepted()}


def wait_accepted(stack: Stack, ids: set[str], timeout_s: float = WAIT_S) -> None:
    try:
        wait_for(lambda: ids <= accepted_ids(stack), timeout_s, interval_s=0.5,
                 what=f"{len(ids)} traces accepted by the panel")
    except TimeoutError as exc:
        missing = sorted(ids - accepted_ids(stack))
        pytest.fail(f"{exc}; missing {missing}\n{stack.logs_tail(3000)}")


def jwt_claims(token: str) -> dict[str, Any]:
    """A JWT's claims, unverified (only to compare what was minted where)."""
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


def request_times(stack: Stack) -> list[float]:
    """When (epoch s, the stub's clock) each ingest request reached the stub panel: faulted and
    refused ones from its refusal log, accepted ones by their first and last upsert."""
    refused = httpx.get(stack.panel_url + "/_stub/refused", timeout=10).json()["refused"]
    times = [r["at"] for r in refused]
    for t in stack.panel_accepted():
        times += [t["first_at"], t["last_at"]] if t["upserts"] > 1 else [t["first_at"]]
    return sorted(times)


def requests_while_open(all_outcomes: list[dict[str, Any]], times: list[float], *, open_s: float,
                        grace_s: float = 2.0) -> list[float]:
    """Panel requests inside an open period, past `grace_s` for requests already in flight when
    it opened and for the stages to read the transition back from delivery.outcomes."""
    windows = [(o["at"] / 1000 + grace_s, o["at"] / 1000 + open_s) for o in all_outcomes
               if o["status"] == "transition" and o["detail"]["to"] == "open"]
    return [t for t in times if any(start <= t < end for start, end in windows)]


def wait_transition(stack: Stack, change: tuple[str, str]) -> None:
    """Until this stack's breaker made the (from, to) transition."""
    wait_for(lambda: change in transitions(stack), WAIT_S, interval_s=0.5,
             what=f"the breaker to go {change[0]} -> {change[1]}")


def open_breaker(stack: Stack, first: Sequence[dict[str, Any]],
                 then: Sequence[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """The panel fails from now on (503, until the test says otherwise); `first` is forwarded and
    its failed deliveries open the breaker, then `then` is forwarded while it is open. Their ids."""
    stack.panel_faults(fail_for_s=600, status=503)
    first_ids = forward(stack, first)
    wait_transition(stack, ("closed", "open"))
    return first_ids, forward(stack, then)


def extra_worker(stack: Stack, stage: str, name: str, env: dict[str, str] | None = None) -> PipelineProcess:
    """One more `pipeline worker STAGE` process, stopped with the stack (env: overrides)."""
    proc = PipelineProcess(["worker", stage], {**stack.env, **(env or {})}, stack.logs, name).start()
    stack.procs[name] = proc
    return proc


# ---------------------------------------------------------------- tests


def test_hold_opens_holds_in_the_topic_and_delivers_everything_after_recovery(kafka: LocalBroker,
                                                                              tmp_path: Path) -> None:
    stack = delivery_stack(kafka, tmp_path, fast_toml(open_s=OPEN_S, mode="hold"))
    host = unique_host("hold")
    first, held = snapshots(host, range(0, 3)), snapshots(host, range(3, 7))
    with running(stack):
        # The panel fails until this test says otherwise, so the hold outlasts the refresh bound.
        first_ids, held_ids = open_breaker(stack, first, then=held)

        def held_outcome() -> dict[str, Any] | None:
            return next((o for o in outcomes(stack) if o["status"] == "held" and o["trace_id"] in held_ids), None)

        first_held = wait_for(held_outcome, WAIT_S, interval_s=0.5, what="a held outcome")
        signed = {json.loads(m.value)["trace_id"]: m for m in read_topic(kafka.bootstrap, "traces.signed")}
        held_record = signed[first_held["trace_id"]]
        held_signed = json.loads(held_record.value)
        # Hold past the attestation refresh bound: the held trace's attestation must be re-minted.
        wait_for(lambda: time.time() > held_signed["attestation_iat"] + REFRESH_S + 2, 30, what="hold time")

        # The held trace waits in traces.signed: the breaker group has not committed past it.
        behind = lag(kafka.bootstrap, BREAKER_GROUP, "traces.signed")
        assert behind[held_record.partition] > 0, behind
        done = asyncio.run(committed(kafka.bootstrap, BREAKER_GROUP))
        assert done.get(("traces.signed", held_record.partition), 0) <= held_record.offset
        outbox = {json.loads(m.value)["trace_id"] for m in read_topic(kafka.bootstrap, "traces.outbox")}
        assert not held_ids & outbox, "held traces reached traces.outbox while the breaker was open"

        stack.panel_faults(fail_for_s=0)  # the panel recovers
        wait_accepted(stack, first_ids | held_ids)
        wait_transition(stack, ("half_open", "closed"))
        accepted = {t["trace_id"]: t for t in stack.panel_accepted()}
        all_outcomes = outcomes(stack)
        signed = {json.loads(m.value)["trace_id"]: json.loads(m.value)
                  for m in read_topic(kafka.bootstrap, "traces.signed")}
        forwarded = sampled_ids(kafka.bootstrap, host)
        stats = stack.panel_stats()
        panel_requests = request_times(stack)

    assert forwarded == first_ids | held_ids
    assert set(accepted) == forwarded, "every forwarded trace is accepted, none invented"
    assert stats["refused"] == 0, stats  # only fault answers, never a contract refusal
    seq = [(o["detail"]["from"], o["detail"]["to"]) for o in all_outcomes if o["status"] == "transition"]
    assert seq[0] == ("closed", "open"), seq
    assert seq[-2:] == [("open", "half_open"), ("half_open", "closed")], seq
    # closed by a probe: the one delivery let through after the open period, not by whichever
    # retry happened to come first
    closing = [o for o in all_outcomes if o["status"] == "transition" and o["detail"]["to"] == "closed"][-1]
    assert closing["detail"]["reason"] == "probe succeeded", closing
    assert any(o["status"] == "probe" for o in all_outcomes), "no probe outcome"
    # Three failed attempts opened it, and nothing reached the panel while it was open: not the
    # held traces, nor retries of those already past the breaker (in-flight grace aside).
    opened_at = next(o["at"] for o in all_outcomes if o["status"] == "transition")
    assert sum(o["status"] == "failed" and o["at"] <= opened_at for o in all_outcomes) >= 3
    assert not requests_while_open(all_outcomes, panel_requests, open_s=OPEN_S)
    held_seen = {o["trace_id"] for o in all_outcomes if o["status"] == "held" and o["stage"] == "breaker"}
    assert held_seen and held_seen <= held_ids, held_seen
    # Every trace that reached the panel later than the refresh bound after signing went with a
    # freshly minted attestation (the stub panel verified it; a reused one has the sign stage's
    # iat), claiming the same verified scrubber result (its jti) as the one the sign stage minted.
    for tid in held_seen:
        minted = jwt_claims(signed[tid]["attestation"])
        assert accepted[tid]["attestation_iat"] > minted["iat"], f"{tid}: held trace kept its old attestation"
        assert accepted[tid]["attestation_jti"] == minted["jti"] == signed[tid]["scrub"]["jti"]
        assert accepted[tid]["last_at"] - minted["iat"] >= REFRESH_S


def test_drop_mode_records_circuit_open_and_delivers_nothing_that_arrived_while_open(kafka: LocalBroker,
                                                                                     tmp_path: Path) -> None:
    # open long enough that the dropped batch surely reaches the breaker inside the period
    stack = delivery_stack(kafka, tmp_path, fast_toml(open_s=12, mode="drop"))
    host = unique_host("drop")
    first, dropped, after = snapshots(host, range(0, 3)), snapshots(host, range(3, 6)), snapshots(host, range(6, 8))
    with running(stack):
        first_ids, dropped_ids = open_breaker(stack, first, then=dropped)

        def circuit_open() -> set[str]:
            return {o["trace_id"] for o in outcomes(stack) if o["status"] == "circuit_open"}

        wait_for(lambda: dropped_ids <= circuit_open(), WAIT_S, interval_s=0.5,
                 what="circuit_open outcomes for the traces that arrived while open")
        stack.panel_faults(fail_for_s=0)
        wait_transition(stack, ("half_open", "closed"))
        after_ids = forward(stack, after)  # closed again: these pass
        wait_accepted(stack, first_ids | after_ids)
        # dropped, not held: the breaker group moves past them
        wait_committed(kafka.bootstrap, BREAKER_GROUP, "traces.signed",
                       what="the breaker group to commit past the dropped traces")
        outbox = {json.loads(m.value)["trace_id"] for m in read_topic(kafka.bootstrap, "traces.outbox")}
        all_outcomes = outcomes(stack)
        accepted = accepted_ids(stack)

    assert not dropped_ids & accepted, "a trace dropped while open reached the panel"
    assert not dropped_ids & outbox, "a trace dropped while open went on to traces.outbox"
    assert accepted == first_ids | after_ids
    dropped_outcomes = [o for o in all_outcomes if o["status"] == "circuit_open"]
    assert sorted(o["trace_id"] for o in dropped_outcomes) == sorted(dropped_ids), "one record per dropped trace"
    assert all(o["stage"] == "breaker" and o["detail"]["reason"] == "open" for o in dropped_outcomes)
    assert not [o for o in all_outcomes if o["status"] == "held" and o["stage"] == "breaker"]


async def _breaker_assignments(bootstrap: str) -> list[set[int]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([BREAKER_GROUP])
    finally:
        await admin.close()
    _, _, state, _, _, members = response.groups[0]
    if state != "Stable":
        return []
    out = []
    for member in members:
        assignment = ConsumerProtocolMemberAssignment.decode(member[4]) if member[4] else None
        parts = {p for topic, ps in (assignment.assignment if assignment else []) if topic == "traces.signed"
                 for p in ps}
        out.append(parts)
    return out


def covering_partitions(host: str, start: int, partitions: int) -> list[dict[str, Any]]:
    """Snapshots from index `start` on until every traces.signed partition gets one (the sign
    stage keys traces by trace_id; faust's producer partitions keys as Kafka's default does)."""
    chosen, seen, i = [], set(), start
    while len(seen) < partitions:
        snap = snapshot(i, host=host, with_secrets=True)
        part = (murmur2(expected_trace_id(snap).encode()) & 0x7FFFFFFF) % partitions
        if part not in seen:
            seen.add(part)
            chosen.append(snap)
        i += 1
    return chosen


def test_two_breaker_replicas_agree_and_lose_nothing(kafka: LocalBroker, tmp_path: Path) -> None:
    stack = delivery_stack(kafka, tmp_path, fast_toml(open_s=8, mode="hold"))
    host = unique_host("two")
    partitions = stack.s.partitions
    first = snapshots(host, range(0, 3))
    held = covering_partitions(host, 100, partitions)
    with running(stack):
        second = extra_worker(stack, "breaker", "breaker-2")
        replicas = [stack.procs["breaker"], second]

        def split_between_two() -> bool:
            parts = asyncio.run(_breaker_assignments(kafka.bootstrap))
            return len(parts) == 2 and all(parts) and set().union(*parts) == set(range(partitions))

        wait_for(split_between_two, WAIT_S, interval_s=1, what="two breaker replicas sharing traces.signed")
        first_ids, held_ids = open_breaker(stack, first, then=held)
        # every partition has a held trace, so each replica holds one of its own
        wait_for(lambda: all(re.search(r"open: holding trace", p.log()) for p in replicas), WAIT_S,
                 interval_s=0.5, what="both replicas to hold a trace")
        stack.panel_faults(fail_for_s=0)
        wait_accepted(stack, first_ids | held_ids)
        wait_committed(kafka.bootstrap, BREAKER_GROUP, "traces.signed", what="the breaker group to commit everything")
        all_outcomes = outcomes(stack)
        forwarded = sampled_ids(kafka.bootstrap, host)
        logs = [p.log() for p in replicas]

    assert forwarded == first_ids | held_ids
    # Both replicas built the same state from delivery.outcomes: each logged the opening, and
    # each wrote the transition with the same deterministic id, so readers can dedupe it.
    for log in logs:
        assert re.search(r"breaker \S+: closed -> open", log), log[-2000:]
        assert re.search(r"breaker \S+: half_open -> closed", log), log[-2000:]
    opened = [o for o in all_outcomes if o["status"] == "transition" and o["detail"]["to"] == "open"
              and o["detail"]["from"] == "closed"]
    assert len(opened) == 2 and len({o["outcome_id"] for o in opened}) == 1, opened
    held_by_breaker = {o["trace_id"] for o in all_outcomes if o["status"] == "held" and o["stage"] == "breaker"}
    assert held_by_breaker <= held_ids
    delivered = {o["trace_id"] for o in all_outcomes if o["status"] == "delivered"}
    assert delivered == forwarded
