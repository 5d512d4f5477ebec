"""The circuit breaker on the real broker, every stage its own process (issue 5).

The stack runs scrub -> sign -> breaker -> deliver against the stub panel and scrubber; the
tests write `trace.sampled/1` records (built from tests/factory.py snapshots by the same code
the sample stage uses) straight to traces.sampled, so what they exercise is the delivery half
and two fewer processes compete for the CPU. Durations are shortened through the config file
(`StackSettings.extra_toml`), so each test takes seconds, not the production minutes.

The helpers here are shared by test_scrubber_outage.py and test_dead_letters.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from pipeline.kafka_local import LocalBroker
from pipeline.local_stack import PipelineProcess, Stack, StackSettings, wait_for
from pipeline.records import encode, validate_for_topic
from pipeline.sampling.base import Decision
from pipeline.topics import STAGES
from pipeline.trace import sampled_trace
from tests.factory import snapshot
from tests.kafka_util import committed, produce

pytestmark = pytest.mark.integration

DELIVERY_STAGES = ("scrub", "sign", "breaker", "deliver")
BREAKER_GROUP = STAGES["breaker"].app_id
# Short enough for a test, long enough that a loaded 2-core machine still opens the breaker
# from one burst of retries: three failures within the window open it for open_s.
FAST_TOML = """
[breaker]
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


def fast_toml(*, open_s: float = 6, mode: str = "hold", extra: str = "") -> str:
    return FAST_TOML.format(open_s=open_s, mode=mode) + extra


def delivery_stack(kafka: LocalBroker, workdir: Path, extra_toml: str, **kw: Any) -> Stack:
    return Stack(StackSettings(bootstrap=kafka.bootstrap, workdir=workdir, stages=DELIVERY_STAGES,
                               extra_toml=extra_toml, **kw))


def unique_host(prefix: str) -> str:
    # The broker is shared by the whole session: a host of its own makes this test's trace
    # ids (derived from host, session and last message) its own too.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sampled(host: str, indices: Iterable[int], **kw: Any) -> list[dict[str, Any]]:
    """What the sample stage writes for forwarded factory snapshots (with seeded secrets)."""
    decision = Decision(forward=True, reason="sample", rate=1.0)
    records = []
    for i in indices:
        record = sampled_trace(snapshot(i, host=host, with_secrets=True, **kw), decision, 25,
                               int(time.time() * 1000))
        validate_for_topic("traces.sampled", record)
        records.append(record)
    return records


def send_sampled(bootstrap: str, records: Sequence[dict[str, Any]]) -> set[str]:
    asyncio.run(produce(bootstrap, "traces.sampled",
                        [(f"{r['host']}:{r['session_id']}".encode(), encode(r)) for r in records]))
    return {r["trace_id"] for r in records}


async def _consumer(bootstrap: str, topic: str) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
    # earliest: assign() starts an offset reset of its own, which can land after a seek
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    parts = consumer.partitions_for_topic(topic) or set()
    deadline = time.monotonic() + 10
    while not parts and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
    return consumer, [TopicPartition(topic, p) for p in sorted(parts)]


async def _read_to_end(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    consumer, tps = await _consumer(bootstrap, topic)
    try:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        # Done by the offsets seen: a read that stops early must not pass for "not there".
        todo = {tp for tp in tps if ends[tp] > starts[tp]}
        out: list[ConsumerRecord] = []
        deadline = time.monotonic() + 60
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: could not read up to {ends}")
            for tp, msgs in (await consumer.getmany(*todo, timeout_ms=500)).items():
                out.extend(m for m in msgs if m.offset < ends[tp])
                if msgs and msgs[-1].offset >= ends[tp] - 1:
                    todo.discard(tp)
        return out
    finally:
        await consumer.stop()


def read_topic(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    """Every record on `topic` now (up to the end offsets when called)."""
    return asyncio.run(_read_to_end(bootstrap, topic))


def read_values(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    return [json.loads(m.value) for m in read_topic(bootstrap, topic)]


def outcomes(stack: Stack) -> list[dict[str, Any]]:
    """This stack's delivery.outcomes, in topic order (one partition: the order all replicas see)."""
    return [o for o in read_values(stack.s.bootstrap, "delivery.outcomes") if o["endpoint"] == stack.panel_url]


def transitions(stack: Stack) -> list[tuple[str, str]]:
    return [(o["detail"]["from"], o["detail"]["to"]) for o in outcomes(stack) if o["status"] == "transition"]


async def _lag(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer, tps = await _consumer(bootstrap, topic)
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    done = await committed(bootstrap, group)
    # nothing committed yet: the group starts from the beginning (auto_offset_reset earliest)
    return {tp.partition: ends[tp] - done.get((topic, tp.partition), 0) for tp in tps}


def lag(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Per partition: end offset minus the group's committed offset."""
    return asyncio.run(_lag(bootstrap, group, topic))


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
    first, held = sampled(host, range(0, 3)), sampled(host, range(3, 7))
    with stack.start():
        # The panel fails until this test says otherwise, so the hold outlasts the refresh bound.
        stack.panel_faults(fail_for_s=600, status=503)
        first_ids = send_sampled(kafka.bootstrap, first)
        wait_for(lambda: ("closed", "open") in transitions(stack), WAIT_S, interval_s=0.5,
                 what="the breaker to open")
        held_ids = send_sampled(kafka.bootstrap, held)

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
        wait_for(lambda: ("half_open", "closed") in transitions(stack), WAIT_S, interval_s=0.5,
                 what="the breaker to close")
        accepted = {t["trace_id"]: t for t in stack.panel_accepted()}
        all_outcomes = outcomes(stack)
        signed = {json.loads(m.value)["trace_id"]: json.loads(m.value)
                  for m in read_topic(kafka.bootstrap, "traces.signed")}
        sampled_ids = {json.loads(m.value)["trace_id"] for m in read_topic(kafka.bootstrap, "traces.sampled")
                       if json.loads(m.value)["host"] == host}
        stats = stack.panel_stats()
        panel_requests = request_times(stack)

    assert sampled_ids == first_ids | held_ids
    assert set(accepted) == sampled_ids, "every forwarded trace is accepted, none invented"
    assert stats["refused"] == 0, stats  # only fault answers, never a contract refusal
    seq = [(o["detail"]["from"], o["detail"]["to"]) for o in all_outcomes if o["status"] == "transition"]
    assert seq[0] == ("closed", "open"), seq
    assert seq[-2:] == [("open", "half_open"), ("half_open", "closed")], seq
    # Three failed attempts opened it, and nothing reached the panel while it was open: not the
    # held traces, nor retries of those already past the breaker (in-flight grace aside).
    opened_at = next(o["at"] for o in all_outcomes if o["status"] == "transition")
    assert sum(o["status"] == "failed" and o["at"] <= opened_at for o in all_outcomes) >= 3
    assert not requests_while_open(all_outcomes, panel_requests, open_s=OPEN_S)
    held_seen = {o["trace_id"] for o in all_outcomes if o["status"] == "held" and o["stage"] == "breaker"}
    assert held_seen and held_seen <= held_ids, held_seen
    # Every trace that reached the panel later than the refresh bound after signing went with a
    # freshly minted attestation (the stub panel verified it; a reused one has the sign jti).
    for tid in held_seen:
        minted = jwt_claims(signed[tid]["attestation"])
        assert accepted[tid]["attestation_jti"] != minted["jti"], f"{tid}: held trace kept its old attestation"
        assert accepted[tid]["last_at"] - minted["iat"] >= REFRESH_S
