"""Faults injected into the running pipeline, every stage its own `pipeline worker` process on a
real broker, against the contract-enforcing stub panel and scrubber.

Each case runs a known workload, injects its fault mid-stream (while records are still being
produced and some are in flight), lets the pipeline recover by itself, and then compares what
the stub panel accepted with what the sampler forwarded (the trace ids on traces.sampled):

- every forwarded trace delivered (lost == 0);
- nothing unscrubbed delivered (no tests/factory.py seeded secret in an accepted body);
- repeats only as upserts of the same trace id (the stub counts upserts per trace; an extra
  trace id would be a second trace for one turn).

Per case the numbers (expected, delivered, duplicates = sum of upserts - 1, lost, time to
recover) are printed and appended as a markdown row to tests/faults/results.md.

The workload: factory snapshots with seeded secrets produced to sessions.idle with
samplingRate 1.0, so every one is forwarded and its trace id is known in advance (for ingest's
kill -9, the collector envelopes those snapshots are made of, produced to opencode.events; for
the collector case, real opencode daemons produce the turns). Waits are polls with bounds
(devkit.local_stack.wait_for); the only timed waits are the fault's own duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from devkit.local_stack import Stack, hosts_toml, wait_for
from devkit.model_stub import ModelStub
from devkit.opencode_daemon import OpencodeDaemon
from pipeline.model.records import encode
from pipeline.model.trace import sampled_trace
from pipeline.sampling.base import Decision
from pipeline.topics import PIPELINE_STAGES
from tests.factory import SEEDED_ASSIGNMENT, SEEDED_SECRETS, snapshot, turn_ended_envelope
from tests.faults.conftest import FAST_TOML, fault_stack, own_broker, warm_up
from tests.kafka_util import read_to_end, values

pytestmark = [pytest.mark.faults, pytest.mark.integration]

RESULTS = Path(__file__).with_name("results.md")
RESULTS_HEADER = (
    "| when (UTC) | case | expected | delivered | duplicates | lost | recover s | case s | notes |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
)
FORBIDDEN = [*SEEDED_SECRETS, SEEDED_ASSIGNMENT, "sk-live-abcdef"]
DEAD_TOPICS = ("collector.dead", "ingest.dead", "sample.dead", "scrub.dead", "sign.dead", "breaker.dead",
               "traces.dead")
RECOVER_BOUND_S = 120.0  # from the end of a fault to the last trace delivered; generous for a shared 2-core box
FLOWING_BOUND_S = 90.0


# ---------------------------------------------------------------- workload


_CASES = itertools.count(1)


def workload(host: str, n: int, *, as_events: bool = False) -> tuple[list[tuple[bytes, bytes]], list[str]]:
    """n snapshots of `host` (seeded secrets, some failing tools) as sessions.idle records (or,
    `as_events`, the collector's turn_ended envelopes they are made from, for opencode.events),
    and the trace ids the sampler derives for them (by the sampler's own code), in order.

    Session ids are the case's own too (factory index ranges that no other case uses), so a
    trace the panel holds for one of them can only be this case's."""
    decision = Decision(forward=True, reason="sample", rate=1.0)
    base = 100_000 * next(_CASES)
    records, ids = [], []
    for i in range(base, base + n):
        snap = snapshot(i, host=host, with_secrets=True, tool_error=(i % 4 == 0))
        value = turn_ended_envelope(i, host=host, with_secrets=True, tool_error=(i % 4 == 0)) if as_events else snap
        records.append((f"{host}:{snap['session_id']}".encode(), encode(value)))
        ids.append(sampled_trace(snap, decision, 25, 0)["trace_id"])
    return records, ids


class Feeder:
    """Produces records to `topic` (sessions.idle) from a thread of its own, one at a time: the first
    `first` at `interval_s`, then, once released, the rest. A case thereby has records arriving
    before its fault, while the pipeline is flowing, and after it; and the feeder (the test's
    client, not the system under test) retries a send until the broker has it, so what a case
    counts as produced is on the broker (the idempotent producer makes a retry no duplicate)."""

    def __init__(self, bootstrap: str, records: list[tuple[bytes, bytes]], *, first: int,
                 interval_s: float = 0.1, topic: str = "sessions.idle") -> None:
        self.bootstrap, self.records, self.first, self.interval_s = bootstrap, records, first, interval_s
        self.topic = topic
        self.produced = 0
        self.error: BaseException | None = None
        self._gate = threading.Event()
        self._thread = threading.Thread(target=self._main, name="feeder", daemon=True)

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def release(self) -> None:
        self._gate.set()

    def join(self, timeout_s: float) -> None:
        self.release()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"feeder still producing after {timeout_s}s ({self.produced} produced)")
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # handed to join(): a test must not pass on a half workload
            self.error = exc

    async def _run(self) -> None:
        producer: AIOKafkaProducer | None = None
        try:
            for i, (key, value) in enumerate(self.records):
                if i == self.first:
                    await asyncio.to_thread(self._gate.wait)
                while True:
                    try:
                        if producer is None:
                            producer = await self._producer()
                        # bounded: an aiokafka producer whose broker went away mid-send can wait
                        # forever for that batch, so a stuck send gets a new producer instead
                        await asyncio.wait_for(
                            producer.send_and_wait(self.topic, value=value, key=key), 15)
                        break
                    except (KafkaError, TimeoutError):
                        if producer is not None:
                            await self._close(producer)
                            producer = None
                        await asyncio.sleep(0.5)
                self.produced += 1
                await asyncio.sleep(self.interval_s)
        finally:
            if producer is not None:
                await self._close(producer)

    async def _producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=True, acks="all",
                                    request_timeout_ms=10_000)
        try:
            await asyncio.wait_for(producer.start(), 15)
        except BaseException:
            await self._close(producer)
            raise
        return producer

    @staticmethod
    async def _close(producer: AIOKafkaProducer) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 10)


# ---------------------------------------------------------------- reading what happened


def read_topic(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    return values(asyncio.run(read_to_end(bootstrap, topic, timeout_s=60)))


def forwarded(bootstrap: str, hosts: Iterable[str]) -> list[dict[str, Any]]:
    """What the sampler wrote to traces.sampled for these hosts (repeats included)."""
    wanted = set(hosts)
    return [t for t in read_topic(bootstrap, "traces.sampled") if t["host"] in wanted]


def dead_letters(bootstrap: str, hosts: Iterable[str], trace_ids: set[str]) -> list[dict[str, Any]]:
    """Dead letters of this case: keyed host:session_id before signing, trace_id after."""
    prefixes = tuple(f"{h}:" for h in hosts)
    return [d for topic in DEAD_TOPICS for d in read_topic(bootstrap, topic)
            if (d.get("key") or "").startswith(prefixes) or d.get("key") in trace_ids]


def accepted_by_id(stack: Stack) -> dict[str, dict[str, Any]]:
    return {t["trace_id"]: t for t in stack.panel_accepted()}


# What a worker logs when it is broken: a table recovery it will not get out of (faust retries
# it forever), or an agent that crashed (agents/base.bind never lets an exception out, so a
# crash is a bug, and faust stops feeding a crashed agent). Waiting out the bound would only
# delay the same failure.
STUCK_MARKERS = ("Error in recovery", "Crashed reason=")


def stuck_workers(stack: Stack) -> list[str]:
    """Stage workers that exited or log one of the STUCK_MARKERS."""
    out = []
    for stage in stack.s.stages:
        proc = stack.procs[stage]
        if not proc.alive():
            out.append(f"{stage} exited")
        elif any(marker in proc.log() for marker in STUCK_MARKERS):
            out.append(f"{stage} broken ({', '.join(m for m in STUCK_MARKERS if m in proc.log())})")
    return out


@dataclass
class Waited:
    """How a wait for delivery ended: when everything was accepted, or what went wrong."""

    at: float | None
    problem: str | None = None


def wait_delivered(stack: Stack, ids: Callable[[], set[str]] | set[str], bound_s: float, what: str) -> Waited:
    """Poll the stub panel until every id is accepted. Gives up at once when a worker is dead
    or broken. A failure is returned, not raised, so the case still records its numbers."""
    wanted = ids if callable(ids) else (lambda: ids)
    polls = itertools.count()
    broken: list[str] = []

    def done() -> bool:
        if next(polls) % 8 == 7:  # logs are read every ~2 s only
            broken.extend(stuck_workers(stack))
        w = wanted()
        return bool(broken) or (bool(w) and w <= set(accepted_by_id(stack)))

    try:
        wait_for(done, bound_s, interval_s=0.25, what=what)
    except TimeoutError as exc:
        missing = len(wanted() - set(accepted_by_id(stack)))
        return Waited(None, f"{exc} ({missing} missing; workers: {stuck_workers(stack) or 'all up'})")
    if broken:
        return Waited(None, f"{what}: gave up, workers {broken}")
    return Waited(time.monotonic())


def flowing(stack: Stack, ids: set[str], at_least: int) -> None:
    """Wait until traces of this workload reach the panel: the fault must land mid-stream."""
    wait_for(lambda: len(ids & set(accepted_by_id(stack))) >= at_least, FLOWING_BOUND_S, interval_s=0.1,
             what=f"{at_least} traces delivered before the fault")


# ---------------------------------------------------------------- the verdict


@dataclass
class Result:
    case: str
    expected: int
    delivered: int
    duplicates: int
    lost: int
    recover_s: float | None  # None: it did not recover within the case's bound
    case_s: float
    notes: str

    def row(self) -> str:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        return (f"| {when} | {self.case} | {self.expected} | {self.delivered} | {self.duplicates} | {self.lost} "
                f"| {self.recover_text} | {self.case_s:.1f} | {self.notes} |\n")

    @property
    def recover_text(self) -> str:
        return "-" if self.recover_s is None else f"{self.recover_s:.1f}"


def record(result: Result, capsys: pytest.CaptureFixture[str]) -> None:
    """Append the case's row to results.md (header first in a new file) and show it even
    under -q: these numbers are what the suite is for."""
    if not RESULTS.exists() or not RESULTS.read_text().strip():
        RESULTS.write_text("# Fault test results\n\nAppended by tests/faults/test_faults.py, one row per case run. "
                           "`duplicates`: upserts - 1 summed over the case's traces; `recover s`: from the end "
                           "of the fault (restart issued, broker answering, outage over) to the last forwarded "
                           "trace accepted; `case s`: the whole case.\n\n" + RESULTS_HEADER)
    with RESULTS.open("a") as out:
        out.write(result.row())
    with capsys.disabled():
        print(f"\n[faults] {result.case}: expected={result.expected} delivered={result.delivered} "
              f"duplicates={result.duplicates} lost={result.lost} recover={result.recover_text}s "
              f"case={result.case_s:.1f}s {result.notes}")


def verdict(case: str, stack: Stack, hosts: Iterable[str], *, produced: set[str] | None, fault_end: float,
            waited: Waited, started: float, notes: str, capsys: pytest.CaptureFixture[str]) -> Result:
    """Compare the panel with traces.sampled, record the numbers, then assert the invariants
    (recorded first: a failing case's numbers are the most interesting ones)."""
    hosts = list(hosts)
    sampled = forwarded(stack.s.bootstrap, hosts)
    expected = {t["trace_id"] for t in sampled}
    accepted = accepted_by_id(stack)
    mine = {tid: accepted[tid] for tid in expected if tid in accepted}
    duplicates = sum(t["upserts"] - 1 for t in mine.values())
    lost = sorted(expected - set(mine))
    leaked = [f"{tid}: {secret}" for tid, t in mine.items() for secret in FORBIDDEN
              if secret in json.dumps(t["body"], ensure_ascii=False)]
    dead = dead_letters(stack.s.bootstrap, hosts, expected)
    if produced is not None and len(expected) < len(produced):
        notes += f"; only {len(expected)} of {len(produced)} produced were forwarded"
    notes += (f"; {len(dead)} dead letters" if dead else "") + (f"; LEAKED {len(leaked)}" if leaked else "")
    if waited.problem:
        notes += f"; NOT RECOVERED: {waited.problem}"
    recover_s = None if waited.at is None else waited.at - fault_end
    result = Result(case, len(expected), len(mine), duplicates, len(lost), recover_s, time.monotonic() - started,
                    notes)
    record(result, capsys)

    if waited.problem:
        pytest.fail(f"{case}: {waited.problem}\n{stack.logs_tail(2500)}")
    assert not lost, f"{case}: {len(lost)} forwarded traces never delivered: {lost[:5]}"
    assert not leaked, f"{case}: unscrubbed content reached the panel: {leaked[:5]}"
    if produced is not None:  # samplingRate 1.0: every snapshot is forwarded, as itself
        assert expected == produced, (f"{case}: forwarded {len(expected)} of {len(produced)} produced; "
                                      f"missing {sorted(produced - expected)[:5]}")
    assert not dead, f"{case}: dead letters {[(d['stage'], d['reason']) for d in dead]}"
    # A repeat is an upsert of the same trace id, never a trace of its own: no other trace of
    # these sessions reached the panel.
    sessions = {t["session_id"] for t in sampled}
    strays = [tid for tid, t in accepted.items() if tid not in expected and t["body"]["blob"]["session_id"] in sessions]
    assert not strays, f"{case}: traces of these sessions the sampler never forwarded: {strays[:5]}"
    return result


def unique_host(prefix: str) -> str:
    # one host per case: trace ids derive from (host, session, last message), so they are the case's own
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def breaker_transitions(stack: Stack) -> list[tuple[str, str]]:
    return [(o["detail"]["from"], o["detail"]["to"]) for o in read_topic(stack.s.bootstrap, "delivery.outcomes")
            if o["endpoint"] == stack.panel_url and o["status"] == "transition"]


# ---------------------------------------------------------------- 1. kill -9 of each stage


@pytest.mark.parametrize("stage", ["ingest", "sample", "scrub", "sign", "breaker", "deliver"])
def test_kill9_stage_mid_stream(stage: str, stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    host = unique_host(f"kill-{stage}")
    # ingest's case starts where the collector writes; every other case where ingest writes
    on_events = stage == "ingest"
    records, order = workload(host, 24, as_events=on_events)
    ids = set(order)
    # Latency on both services keeps requests in flight at the moment of the kill, so the
    # scrub and deliver kills lose work half done (the panel may have a trace whose offset
    # was never committed: a redelivery, which must be an upsert).
    stack.panel_faults(latency_ms=150)
    stack.scrubber_faults(latency_ms=150)
    feeder = Feeder(stack.s.bootstrap, records, first=12,
                    topic="opencode.events" if on_events else "sessions.idle").start()
    flowing(stack, ids, at_least=3)
    at_kill = len(ids & set(accepted_by_id(stack)))
    stack.restart(stage)  # kill -9 of the worker's process group, then a fresh worker
    restarted = time.monotonic()
    feeder.release()  # the other half arrives while the stage is down or rejoining
    feeder.join(60)
    waited = wait_delivered(stack, ids, RECOVER_BOUND_S, f"every trace after the {stage} kill")
    verdict(f"kill -9 {stage}", stack, [host], produced=ids, fault_end=restarted, waited=waited,
            started=started, notes=f"killed with {at_kill}/{len(ids)} delivered", capsys=capsys)


# ---------------------------------------------------------------- 3. panel outage, breaker in hold


PANEL_OUTAGE_S = 10.0  # > open_s (3 s): the breaker opens, half-opens, probes into the outage, reopens


def test_panel_outage_longer_than_breaker_open(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    host = unique_host("panel-down")
    records, order = workload(host, 24)
    ids = set(order)
    before = breaker_transitions(stack)
    # one steady stream: traces are in every stage when the outage begins, and the rest meet
    # the failing panel, then the open breaker
    feeder = Feeder(stack.s.bootstrap, records, first=len(records), interval_s=0.25).start()
    flowing(stack, ids, at_least=3)
    stack.panel_faults(fail_for_s=PANEL_OUTAGE_S, status=503)
    fault_end = time.monotonic() + PANEL_OUTAGE_S
    at_fault = len(ids & set(accepted_by_id(stack)))
    assert feeder.produced < len(records), "the workload was all produced before the outage: not mid-stream"
    feeder.join(60)
    waited = wait_delivered(stack, ids, PANEL_OUTAGE_S + RECOVER_BOUND_S, "every trace after the panel outage")
    if waited.at is not None:  # the breaker closes again (for the cases after this one too)
        wait_for(lambda: breaker_transitions(stack)[len(before):][-1:] == [("half_open", "closed")], 60,
                 interval_s=0.5, what="the breaker to close after the outage")
    seen = breaker_transitions(stack)[len(before):]
    result = verdict("panel 503 outage (hold)", stack, [host], produced=ids, fault_end=fault_end,
                     waited=waited, started=started,
                     notes=f"{PANEL_OUTAGE_S:.0f}s outage from {at_fault}/{len(ids)} delivered, open_s 3; "
                           f"breaker opened "
                           f"{seen.count(('closed', 'open')) + seen.count(('half_open', 'open'))}x",
                     capsys=capsys)
    assert ("closed", "open") in seen, f"the breaker never opened during a {PANEL_OUTAGE_S}s outage: {seen}"
    assert result.lost == 0


# ---------------------------------------------------------------- 4. scrubber outage


SCRUBBER_OUTAGE_S = 8.0


def test_scrubber_outage_fails_closed_then_delivers(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    host = unique_host("scrub-down")
    records, order = workload(host, 24)
    ids = set(order)
    # one steady stream: traces are in every stage when the outage begins, the rest arrive during it
    feeder = Feeder(stack.s.bootstrap, records, first=len(records), interval_s=0.25).start()
    flowing(stack, ids, at_least=3)
    fault_end_wall = time.time() + SCRUBBER_OUTAGE_S  # the stub's own end is its receipt of the knob + S: later
    stack.scrubber_faults(fail_for_s=SCRUBBER_OUTAGE_S, status=503)
    fault_end = time.monotonic() + SCRUBBER_OUTAGE_S
    # on the broker only after the knob was set, so scrubbed (and delivered) only after the outage
    produced_after = order[feeder.produced:]
    at_fault = len(ids & set(accepted_by_id(stack)))
    assert produced_after, "the workload was all produced before the outage: not mid-stream"
    feeder.join(60)
    waited = wait_delivered(stack, ids, SCRUBBER_OUTAGE_S + RECOVER_BOUND_S, "every trace after the scrubber outage")
    verdict("scrubber 503 outage", stack, [host], produced=ids, fault_end=fault_end, waited=waited,
            started=started, notes=f"{SCRUBBER_OUTAGE_S:.0f}s outage from {at_fault}/{len(ids)} delivered, "
                                   f"{len(produced_after)} produced during it",
            capsys=capsys)
    # Fail closed: what was produced after the outage began can only have been scrubbed, so
    # delivered, once the scrubber answered again (the stub panel stamps first_at, same clock).
    accepted = accepted_by_id(stack)
    early = [tid for tid in produced_after if accepted[tid]["first_at"] < fault_end_wall]
    assert not early, f"traces produced during the scrubber outage were delivered before it ended: {early}"


# ---------------------------------------------------------------- 2. broker stopped and restarted


BROKER_DOWN_S = 5.0
RECONNECT_BOUND_S = 120.0  # workers that are not delivering again by then did not reconnect: a finding


def test_broker_restart_mid_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with own_broker(tmp_path / "kafka") as broker:
        stack = fault_stack(broker.bootstrap, tmp_path / "stack")
        with stack.start():
            warm_up(stack, broker.bootstrap)
            started = time.monotonic()
            host = unique_host("broker-restart")
            records, order = workload(host, 24)
            ids = set(order)
            stack.panel_faults(latency_ms=150)  # traces in flight at the panel when the broker goes
            feeder = Feeder(broker.bootstrap, records, first=12).start()
            flowing(stack, ids, at_least=3)
            stopped = time.monotonic()
            broker.stop()
            # the outage itself: a fault parameter, not a wait for anything
            time.sleep(BROKER_DOWN_S)
            broker.start()  # same data dir, same ports
            back = time.monotonic()
            dead_workers = [n for n in stack.s.stages if not stack.procs[n].alive()]
            feeder.release()  # the second half is produced once the broker is back
            feeder.join(90)
            # gives up at once, naming them, if workers exited or broke instead of reconnecting
            waited = wait_delivered(stack, ids, RECONNECT_BOUND_S, "every trace after the broker restart")
            verdict("broker stop/start", stack, [host], produced=ids, fault_end=back, waited=waited,
                    started=started,
                    notes=f"broker down {back - stopped:.1f}s (stop+{BROKER_DOWN_S:.0f}s+start); "
                          f"workers dead while down: {dead_workers or 'none'}", capsys=capsys)


# ---------------------------------------------------------------- 5. collector kill -9 on real opencode

# (host, prompts of one session). Seeded secrets in the prompts: the model stub echoes prompt
# words in its replies, so user and assistant messages both carry them to the scrubber.
WORKLOAD_BEFORE = [
    ("a", [f"plain reply about parsers, mail {SEEDED_SECRETS[0]}"]),
    ("b", [f"[[tool:bash:echo {SEEDED_SECRETS[2]}]] run a shell command"]),
    ("a", ["[[tool:read:missing.txt]] read a missing file"]),
    ("b", ["first turn of a long talk", "second turn please continue", "third and last turn"]),
    ("a", [f"multi turn on a {SEEDED_SECRETS[2]}", "[[tool:bash:echo again]] and a tool"]),
    ("b", ["[[error:400]] this turn fails at the provider"]),
    ("a", ["a plain session about schemas", "and one more turn about topics"]),
    ("b", [f"key {SEEDED_SECRETS[1]} in a plain turn"]),
]
WORKLOAD_AFTER = [
    ("a", [f"after the collector came back {SEEDED_SECRETS[0]}"]),
    ("b", ["[[tool:bash:echo back]] a tool after the restart", "and a second turn"]),
]


async def drive(daemons: dict[str, OpencodeDaemon], workload_: list[tuple[str, list[str]]],
                progress: list[int] | None = None) -> dict[str, int]:
    """Run the sessions concurrently; session id -> turns driven. `progress` counts ended turns."""
    turns: dict[str, int] = {}

    async def one(host: str, prompts: list[str]) -> None:
        async with daemons[host].client() as client:
            result = await client.run_task(prompts[0], title=prompts[0][:20])
            sid = result["session_id"]
            if progress is not None:
                progress[0] += 1
            for prompt in prompts[1:]:
                await client.continue_session(sid, prompt)
                if progress is not None:
                    progress[0] += 1
            turns[sid] = len(prompts)

    await asyncio.gather(*(one(h, p) for h, p in workload_))
    return turns


@pytest.mark.slow
@pytest.mark.e2e
def test_collector_kill9_while_turns_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    hosts = {"a": unique_host("oc-a"), "b": unique_host("oc-b")}
    with ModelStub() as model, own_broker(tmp_path / "kafka") as broker:
        daemons = {hosts["a"]: OpencodeDaemon(tmp_path / "proj-a", model.base_url),
                   hosts["b"]: OpencodeDaemon(tmp_path / "proj-b", model.base_url, password="pw-" + tmp_path.name)}
        by_letter = {letter: daemons[name] for letter, name in hosts.items()}
        for d in daemons.values():
            d.start()
        try:
            # ingest..deliver all running; the collector reconciles often so a restart backfills fast
            stack = fault_stack(broker.bootstrap, tmp_path / "stack", stages=PIPELINE_STAGES,
                                hosts_toml=hosts_toml(daemons),
                                extra_toml="checkpoint_interval_s = 1\npoll_interval_s = 2\n" + FAST_TOML)
            with stack.start(collector=True):
                stack.procs["collector"].wait_for_log("collecting from 2 hosts", 90)
                turns: dict[str, int] = {}
                ended = [0]
                failure: list[BaseException] = []

                def run_before() -> None:
                    try:
                        turns.update(asyncio.run(drive(by_letter, WORKLOAD_BEFORE, ended)))
                    except BaseException as exc:  # re-raised in the test's thread below
                        failure.append(exc)

                driver = threading.Thread(target=run_before, name="drive-before", daemon=True)
                driver.start()
                # turns are ending: kill the collector in the middle of it
                total_before = sum(len(p) for _, p in WORKLOAD_BEFORE)
                try:
                    wait_for(lambda: ended[0] >= 3 or failure, 180, interval_s=0.1, what="the first turns ended")
                except TimeoutError as exc:
                    pytest.fail(f"{exc}: {failure}\n{stack.logs_tail(2500)}")
                at_kill = ended[0]
                assert not failure, failure
                assert at_kill < total_before, "the workload ended before the kill: not mid-stream"
                stack.procs["collector"].kill9()
                driver.join(240)
                assert not driver.is_alive() and not failure, failure
                stack.restart("collector")
                restarted = time.monotonic()
                turns.update(asyncio.run(drive(by_letter, WORKLOAD_AFTER)))
                n_turns = sum(turns.values())

                def all_forwarded() -> set[str]:
                    ids = {t["trace_id"] for t in forwarded(broker.bootstrap, daemons)}
                    return ids if len(ids) >= n_turns or stuck_workers(stack) else set()

                try:
                    ids = wait_for(all_forwarded, 240, interval_s=1.0, what=f"traces of all {n_turns} turns forwarded")
                except TimeoutError:
                    ids = {t["trace_id"] for t in forwarded(broker.bootstrap, daemons)}
                waited = wait_delivered(stack, ids, RECOVER_BOUND_S, f"the traces of all {n_turns} turns")
                if waited.at is not None and len(ids) < n_turns:
                    waited = Waited(None, f"only {len(ids)} of {n_turns} turns forwarded; workers: "
                                          f"{stuck_workers(stack) or 'all up'}")
                result = verdict("kill -9 collector (opencode)", stack, daemons, produced=None,
                                 fault_end=restarted, waited=waited, started=started,
                                 notes=f"{n_turns} turns, {at_kill} ended before the kill, "
                                       f"{total_before - at_kill} while it was down", capsys=capsys)
                # every turn one forwarded trace (samplingRate 1.0), none missed across the kill
                assert result.expected == n_turns, f"{result.expected} traces forwarded for {n_turns} turns"
                # the secrets went in unscrubbed, so the scrub check in verdict() proved something
                assert any(SEEDED_SECRETS[0] in json.dumps(t) for t in forwarded(broker.bootstrap, daemons))
        finally:
            for d in daemons.values():
                with contextlib.suppress(Exception):
                    d.stop()
