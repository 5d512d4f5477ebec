"""The soak: a seeded fault campaign on the whole pipeline, then an account of every ended turn.

Traffic: two real `opencode serve` daemons (one password-protected) driven by the scripted
model stub, two concurrent sessions per daemon of 1-4 turns each, with tools, provider errors
and seeded secrets in the prompts; the real collector reads them into opencode.events, and every
stage is its own `pipeline worker` process on a broker of the soak's own (so it can be restarted),
against the contract-enforcing stub panel and scrubber. samplingRate 1.0, so every turn the
novelty policy does not forward the `sample` policy does (noveltyThreshold stays at its 0.7, so
both policies forward some: the sampler records no per-turn decision not to forward, see
tests/faults/invariants.py, and at rate 1.0 there is none).

Faults, one every 20-40 s (seeded; `SOAK_SEED`), each followed by its recovery and a wait until
every turn that ended by the fault's end or within 20 s after it is at the panel (bounded). The
fault's "time to recover" is the longest any of those turns waited after the fault's end (or
after its own end, when later) to be accepted by the panel: normal end-to-end latency when the
fault held nothing up.

- `kill9`: kill -9 of a stage worker (ingest, sample, scrub, sign, breaker, deliver) or of the
  collector, down 0-5 s, then started again;
- `broker`: the broker stopped (SIGTERM), down 3-10 s, started again on the same data dir;
- `panel_5xx`: the stub panel answers 500/502/503/504 for 8-20 s (breaker.open_s is 3 s);
- `panel_timeout`: the stub panel answers 2 s after the deliver stage's read timeout, 8-20 s;
- `scrubber_down`: the stub scrubber killed for 8-25 s (connection refused), or answering 503;
- `poison`: 1-3 records that can never be processed (not UTF-8, not JSON, not an object, not
  the schema) produced straight onto a random stage's input topic: each must end in that
  stage's dead-letter topic;
- `oversize`: 1-2 valid snapshots on sessions.idle whose trace (~3 MB) exceeds the
  `max.message.bytes` this soak sets on traces.sampled (2 MiB, above the producers' 1 MiB
  batches, so only these are refused): the sample stage must dead-letter them
  (`sample.dead`, `output_too_large`).

Then the traffic stops and the pipeline drains (until every stage's lag is 0 and every turn the
daemons ran is at the panel, or a bound), and tests/faults/invariants.py accounts for every
ended turn (the daemons' own listings and the driver's record of each prompt, the warm-up trace
and the oversize snapshots): delivered, dead-lettered with a reason, or not forwarded; nothing
unexplained, no second trace for a turn, every poison record dead-lettered. The run's row goes
to tests/faults/results.md, section "Soak".

    SOAK_MINUTES=2 .venv/bin/python -m pytest tests/faults/test_soak.py -m slow -x -q -s
    SOAK_SEED=1234 ./dev test tests/faults/test_soak.py -m slow      # replay a seed

The tests at the end of this file check the checker (synthetic input, no broker) and run in
the default suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from devkit.kafka_local import LocalBroker
from devkit.local_stack import Stack, StackSettings, hosts_toml, wait_for
from devkit.model_stub import ModelStub
from devkit.opencode_daemon import OpencodeDaemon
from pipeline.kafka.lag import LagCollector
from pipeline.model.records import dead_letter, encode
from pipeline.model.trace import sampled_trace
from pipeline.sampling.base import Decision
from pipeline.topics import MAX_MESSAGE_BYTES, PIPELINE_STAGES, STAGES, TOPICS, dead_letter_topics
from tests.factory import SEEDED_SECRETS, snapshot, turn_ended_envelope
from tests.faults import invariants as inv
from tests.faults.conftest import FAST_GROUP_ENV, own_broker
from tests.faults.test_faults import FORBIDDEN, RESULTS, RESULTS_HEADER, Feeder
from tests.kafka_util import read_to_end

# ---------------------------------------------------------------- settings

DEFAULT_MINUTES = 10.0
GAP_S = (20.0, 40.0)  # between the end of one fault and the start of the next
RECOVER_BOUND_S = 180.0  # per fault: longer and the campaign goes on, the final account decides
# turns ending this long after a fault's end still count for its recovery (a killed worker's
# partitions wait out its group session, 10 s, after the restart); at most the shortest gap
RECOVER_HORIZON_S = 20.0
DRAIN_BOUND_S = 300.0
WARMUP_S = 180.0
READ_TIMEOUT_S = 3  # the deliver stage's panel read timeout; panel_timeout answers slower
SAMPLED_LIMIT = 2 * 1024 * 1024  # traces.sampled max.message.bytes on the soak's broker
OVERSIZE_WORDS = 240_000  # per message text: a ~3 MB snapshot and trace
KILL_TARGETS = (*PIPELINE_STAGES, "collector")
KINDS = ("kill9", "broker", "panel_5xx", "panel_timeout", "scrubber_down", "poison", "oversize")
KIND_WEIGHTS = {"kill9": 3}  # per shuffled round; every other kind once
PIPELINE_ORDER = ("opencode.events", "sessions.idle", "traces.sampled", "traces.scrubbed", "traces.signed",
                  "traces.outbox")

# The collector section first (extra_toml lands right after [collector]): reconcile and
# checkpoint often, so a collector restart backfills within seconds. Then the fault suite's
# shortened breaker and retries, and a panel read timeout the panel_timeout fault can exceed.
SOAK_TOML = f"""checkpoint_interval_s = 1
poll_interval_s = 2

[breaker]
failure_window_s = 10
open_s = 3
mode = "hold"

[delivery]
retry_base_s = 0.2
retry_max_s = 1
read_timeout_s = {READ_TIMEOUT_S}

[scrub]
retry_base_s = 0.2
retry_max_s = 1
"""

# Prompts for the scripted model ({a}, {b}: words). Tools, a provider error, seeded secrets
# (the model stub echoes prompt words, so user and assistant text both carry them to the scrubber).
PROMPTS = (
    "explain the {a} module and how {b} uses it",
    "[[tool:bash:ls -la]] list the files then describe {a}",
    "[[tool:bash:echo {a} {b}]] echo the two words",
    "[[tool:read:missing-{a}.txt]] read the {a} notes",
    "[[error:400]] this request about {a} fails at the provider",
    "mail " + SEEDED_SECRETS[0] + " about the {a} plan",
    "[[tool:bash:echo " + SEEDED_SECRETS[2] + "]] a shell command about {a}",
    "summarise the {a} {b} discussion for the team, key " + SEEDED_SECRETS[1],
)
WORDS = ("parser", "cache", "scheduler", "router", "schema", "kafka", "sampler", "novelty", "scrubber", "panel",
         "breaker", "config", "logger", "metrics", "compiler", "linter", "bundler", "migrations", "auth", "search")
POISON_VARIANTS = ("not_utf8", "invalid_json", "not_an_object", "schema_invalid")
# Logged by a worker that is alive but will not go on (see test_faults.STUCK_MARKERS).
STUCK_MARKERS = ("Error in recovery", "Crashed reason=")


def say(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(text, flush=True)


# ---------------------------------------------------------------- the seeded schedule


@dataclass(frozen=True)
class Fault:
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"kill9 {self.params['target']}" if self.kind == "kill9" else self.kind


def schedule(seed: int) -> Iterator[tuple[float, Fault]]:
    """(gap before it, fault), for ever, from the seed alone: kinds in shuffled rounds (kill9
    three times a round, on targets in shuffled rounds of their own), so a short run still
    sees every kind and the same seed gives the same campaign."""
    rng = random.Random(seed)
    targets: list[str] = []
    while True:
        kinds = [k for k in KINDS for _ in range(KIND_WEIGHTS.get(k, 1))]
        rng.shuffle(kinds)
        for kind in kinds:
            gap = rng.uniform(*GAP_S)
            if kind == "kill9":
                if not targets:
                    targets = list(KILL_TARGETS)
                    rng.shuffle(targets)
                params: dict[str, Any] = {"target": targets.pop(), "down_s": round(rng.uniform(0, 5), 1)}
            elif kind == "broker":
                params = {"down_s": round(rng.uniform(3, 10), 1)}
            elif kind == "panel_5xx":
                params = {"for_s": round(rng.uniform(8, 20), 1), "status": rng.choice([500, 502, 503, 504])}
            elif kind == "panel_timeout":
                params = {"for_s": round(rng.uniform(8, 20), 1), "latency_ms": READ_TIMEOUT_S * 1000 + 2000}
            elif kind == "scrubber_down":
                params = {"for_s": round(rng.uniform(8, 25), 1), "how": rng.choice(["kill", "503"])}
            elif kind == "poison":
                params = {"records": [(rng.choice(PIPELINE_STAGES), rng.choice(POISON_VARIANTS))
                                      for _ in range(rng.randint(1, 3))]}
            else:
                params = {"count": rng.randint(1, 2)}
            yield gap, Fault(kind, params)


def poison_value(variant: str, tag: str) -> bytes:
    if variant == "not_utf8":
        return b"\xff\xfe" + tag.encode()
    if variant == "invalid_json":
        return b'{"soak": "poison", "tag": ' + tag.encode()
    if variant == "not_an_object":
        return json.dumps(["soak poison", tag]).encode()
    return json.dumps({"schema": "soak.poison/1", "tag": tag}).encode()


def oversize_snapshot(seed: int, n: int) -> dict[str, Any]:
    return snapshot(900_000 + n, host=f"soak-oversize-{seed}", turns=1, words=OVERSIZE_WORDS)


# ---------------------------------------------------------------- traffic: opencode daemons


class Driver:
    """Runs sessions on the daemons from a thread of its own until stopped; records every turn
    that ended (its last message, from the prompt's answer) and every session it created."""

    def __init__(self, daemons: Mapping[str, OpencodeDaemon], seed: int, on_turn: Callable[[inv.Turn], None],
                 workers_per_host: int = 2) -> None:
        self.daemons, self.seed, self.on_turn, self.workers = dict(daemons), seed, on_turn, workers_per_host
        self.turns: list[inv.Turn] = []
        self.sessions: dict[str, list[str]] = {host: [] for host in self.daemons}
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="soak-driver", daemon=True)

    def start(self) -> Driver:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 120.0) -> None:
        self.stopping.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the driver did not stop within {timeout_s}s")

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by the test
            self.error = exc

    async def _run(self) -> None:
        await asyncio.gather(*(self._worker(host, i) for host in self.daemons for i in range(self.workers)))

    async def _worker(self, host: str, index: int) -> None:
        rng = random.Random(f"{self.seed}:{host}:{index}")

        def prompt() -> str:
            return rng.choice(PROMPTS).format(a=rng.choice(WORDS), b=rng.choice(WORDS))

        async with self.daemons[host].client() as client:
            while not self.stopping.is_set():
                turns = rng.choice([1, 1, 2, 3, 4])
                try:
                    first = prompt()
                    session = await client.create_session(title=first[:30])
                    sid = str(session["id"])
                    self.sessions[host].append(sid)
                    for n in range(turns):
                        if n and self.stopping.is_set():
                            break
                        result = await client.continue_session(sid, first if n == 0 else prompt())
                        turn = inv.make_turn(host, sid, result["response"]["info"]["id"], ended_at=time.time())
                        self.turns.append(turn)
                        self.on_turn(turn)
                        await asyncio.sleep(rng.uniform(0.2, 1.0))
                except Exception as exc:  # noted; the turns it did end are in the daemon's listing
                    self.failures.append(f"{host}: {type(exc).__name__}: {str(exc)[:120]}")
                    await asyncio.sleep(1.0)
                await asyncio.sleep(rng.uniform(0.5, 2.0))


# ---------------------------------------------------------------- watching the panel


class Tracker:
    """Polls the stub panel, from a thread of its own, for the turns the driver saw end (oldest
    first, one trace id per request: the full list holds every body) and notes when each was
    first there; recovery after a fault is read from that."""

    PER_POLL = 150

    def __init__(self, panel_url: str) -> None:
        self.panel_url = panel_url
        self.ended: dict[str, float] = {}
        self.first_seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="soak-tracker", daemon=True)

    def add(self, turn: inv.Turn) -> None:
        with self._lock:
            self.ended.setdefault(turn.trace_id, turn.ended_at or time.time())

    def outstanding(self) -> list[str]:
        with self._lock:
            return sorted((t for t in self.ended if t not in self.first_seen), key=self.ended.__getitem__)

    def recovery(self, fault_end: float) -> float | None:
        """The fault's time to recover (invariants.recovery_s), once the horizon has passed."""
        if time.time() < fault_end + RECOVER_HORIZON_S:
            return None
        with self._lock:
            return inv.recovery_s(fault_end, dict(self.ended), dict(self.first_seen), RECOVER_HORIZON_S)

    def start(self) -> Tracker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _main(self) -> None:
        with httpx.Client(base_url=self.panel_url, timeout=10) as http:
            while not self._stop.wait(1.0):
                for tid in self.outstanding()[: self.PER_POLL]:
                    try:
                        found = http.get("/_stub/accepted", params={"trace_id": tid}).json()["count"]
                    except (httpx.HTTPError, ValueError, KeyError):
                        break  # the panel is busy or restarting: next poll
                    if found:
                        with self._lock:
                            self.first_seen.setdefault(tid, time.time())


# ---------------------------------------------------------------- process health


class Health:
    """Stage workers and the collector: one that exited on its own is started again (as the
    compose restart policy would) and noted; one logging a STUCK_MARKER is noted (it stays as it
    is: that is the finding). Only log text written since the last check is read."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.offsets: dict[str, int] = {}
        self.incidents: list[str] = []

    def check(self, t0: float) -> None:
        for name in (*self.stack.s.stages, "collector"):
            proc = self.stack.procs.get(name)
            if proc is None:
                continue
            if not proc.alive():
                code = proc.proc.returncode if proc.proc is not None else None
                self.incidents.append(f"t+{time.time() - t0:.0f}s {name} exited by itself (code {code}); restarted")
                self.stack.restart(name)
            new = self._new_log(name, proc.log_path)
            for marker in STUCK_MARKERS:
                if marker in new:
                    self.incidents.append(f"t+{time.time() - t0:.0f}s {name} logged {marker!r}")

    def _new_log(self, name: str, path: Path) -> str:
        if not path.exists():
            return ""
        with path.open("rb") as f:
            f.seek(self.offsets.get(name, 0))
            data = f.read()
            self.offsets[name] = f.tell()
        return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- reading the broker


def read_values(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes]]:
    return [(m.key, m.value or b"") for m in asyncio.run(read_to_end(bootstrap, topic, timeout_s=180))]


def read_json(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    out = []
    for _, value in read_values(bootstrap, topic):
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            record = json.loads(value)
            if isinstance(record, dict):
                out.append(record)
    return out


async def _set_topic_limit(bootstrap: str, topic: str, limit: int) -> str:
    """Set `max.message.bytes` of `topic` (its other configs as the topic table has them: a
    legacy AlterConfigs replaces the topic's whole set) and return the value the broker reports."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        configs = {**TOPICS[topic].configs(), "max.message.bytes": str(limit)}
        for response in await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs)]):
            for error_code, error_message, *_ in response.resources:
                if error_code:
                    raise RuntimeError(f"alter_configs {topic}: error {error_code} {error_message}")
        for response in await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)]):
            for resource in response.resources:
                for entry in resource[4]:
                    if entry[0] == "max.message.bytes":
                        return str(entry[1])
        raise RuntimeError(f"describe_configs {topic}: no max.message.bytes")
    finally:
        await admin.close()


async def _total_lag(bootstrap: str) -> int:
    async with LagCollector(bootstrap) as lags:
        report = await lags.sample([STAGES[s] for s in PIPELINE_STAGES])
    return sum(s.lag for s in report.stages)


def total_lag(bootstrap: str) -> int | None:
    try:
        return asyncio.run(_total_lag(bootstrap))
    except Exception:  # the broker restarting: unknown
        return None


class BigFeeder(Feeder):
    """The fault suite's feeder with a producer that may send records up to the topic limit."""

    async def _producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=True, acks="all",
                                    request_timeout_ms=30_000, max_request_size=MAX_MESSAGE_BYTES)
        try:
            await asyncio.wait_for(producer.start(), 15)
        except BaseException:
            await self._close(producer)
            raise
        return producer


# ---------------------------------------------------------------- the campaign


@dataclass
class FaultRun:
    fault: Fault
    started: float
    ended: float  # the fault's end: restart issued, broker answering, outage over, records produced
    recover_s: float | None = None
    notes: str = ""


class Campaign:
    def __init__(self, seed: int, stack: Stack, broker: LocalBroker, tracker: Tracker, health: Health,
                 t0: float, capsys: pytest.CaptureFixture[str]) -> None:
        self.seed, self.stack, self.broker, self.tracker, self.health = seed, stack, broker, tracker, health
        self.t0, self.capsys = t0, capsys
        self.runs: list[FaultRun] = []
        self.poison: list[inv.Poison] = []
        self.oversize: list[inv.Turn] = []
        self._n = itertools.count(1)

    def log(self, text: str) -> None:
        say(self.capsys, f"[soak] t+{time.time() - self.t0:6.1f}s {text}")

    def sleep(self, seconds: float) -> None:
        """A timed wait (a fault's own duration, the gap between faults), watching the workers."""
        end = time.time() + seconds
        while (left := end - time.time()) > 0:
            time.sleep(min(left, 2.0))
            self.health.check(self.t0)

    def run(self, minutes: float) -> None:
        end = self.t0 + minutes * 60
        last = time.time()
        for gap, fault in schedule(self.seed):
            at = last + gap
            if at > end - 10:
                break
            self.sleep(at - time.time())
            started = time.time()
            notes = getattr(self, f"_{fault.kind}")(fault)
            run = FaultRun(fault, started, time.time(), notes=notes or "")
            self.runs.append(run)
            try:
                wait_for(lambda r=run: self._recovered(r), RECOVER_BOUND_S, interval_s=1.0)
            except TimeoutError:
                run.notes += f"; not recovered in {RECOVER_BOUND_S:.0f}s ({len(self.tracker.outstanding())} turns " \
                             "outstanding)"
            self.log(f"{fault.label} {fault.params if fault.kind != 'poison' else ''} {run.notes} -> recovered in "
                     + ("-" if run.recover_s is None else f"{run.recover_s:.1f}s"))
            last = run.ended
        self.sleep(end - time.time())

    def _recovered(self, run: FaultRun) -> bool:
        self.health.check(self.t0)
        run.recover_s = self.tracker.recovery(run.ended)
        return run.recover_s is not None

    # -- the faults: each returns notes, its end is when it returns

    def _kill9(self, fault: Fault) -> str:
        target = fault.params["target"]
        self.stack.procs[target].kill9()
        time.sleep(fault.params["down_s"])
        self.stack.restart(target)  # a no-op kill of the dead process, then a fresh one
        return f"down {fault.params['down_s']}s"

    def _broker(self, fault: Fault) -> str:
        stopped = time.time()
        self.broker.stop()
        time.sleep(fault.params["down_s"])
        for attempt in range(3):
            try:
                self.broker.start()
                break
            except Exception as exc:  # a port still held by the old process, say: once more
                if attempt == 2:
                    raise
                self.log(f"broker start failed ({exc}); again")
                time.sleep(5)
        return f"down {time.time() - stopped:.1f}s"

    def _panel_5xx(self, fault: Fault) -> str:
        self.stack.panel_faults(fail_for_s=fault.params["for_s"], status=fault.params["status"])
        self.sleep(fault.params["for_s"])
        return ""

    def _panel_timeout(self, fault: Fault) -> str:
        self.stack.panel_faults(latency_ms=fault.params["latency_ms"])
        self.sleep(fault.params["for_s"])
        self.stack.panel_faults(latency_ms=0)
        return ""

    def _scrubber_down(self, fault: Fault) -> str:
        if fault.params["how"] == "503":
            self.stack.scrubber_faults(fail_for_s=fault.params["for_s"], status=503)
            self.sleep(fault.params["for_s"])
            return "503"
        proc = self.stack.procs["scrubber"]
        proc.kill9()
        self.sleep(fault.params["for_s"])
        proc.start()  # same port, same secrets

        def answers() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.stack.scrubber_url + "/_stub/stats", timeout=2).status_code == 200
            return False

        wait_for(answers, 60, interval_s=0.2, what="the scrubber back")
        return "killed"

    def _poison(self, fault: Fault) -> str:
        by_topic: dict[str, list[tuple[bytes, bytes]]] = {}
        for stage, variant in fault.params["records"]:
            tag = f"soak-{self.seed}-poison-{next(self._n)}"
            value = poison_value(variant, tag)
            src = STAGES[stage]
            self.poison.append(inv.Poison(src.input, tag, value, src.dead))
            by_topic.setdefault(src.input, []).append((tag.encode(), value))
        for topic, records in by_topic.items():
            Feeder(self.stack.s.bootstrap, records, first=len(records), interval_s=0, topic=topic).start().join(60)
        return ", ".join(f"{v} on {STAGES[s].input}" for s, v in fault.params["records"])

    def _oversize(self, fault: Fault) -> str:
        records = []
        for _ in range(fault.params["count"]):
            snap = oversize_snapshot(self.seed, next(self._n))
            turn = inv.make_turn(snap["host"], snap["session_id"], snap["messages"][-1]["info"]["id"],
                                 source="oversize", ended_at=time.time())
            self.oversize.append(turn)
            records.append((turn.key.encode(), encode(snap)))
        BigFeeder(self.stack.s.bootstrap, records, first=len(records), interval_s=0).start().join(90)
        return f"{len(records)} x {len(records[0][1]) / 1e6:.1f} MB"


# ---------------------------------------------------------------- results.md


SOAK_HEADING = "## Soak"
SOAK_INTRO = (
    "Appended by tests/faults/test_soak.py (`-m slow`), one row per run: a seeded fault campaign on the whole "
    "pipeline fed by two real opencode daemons through the collector, then every ended turn accounted for by "
    "tests/faults/invariants.py. `turns`: turns the daemons ran plus the warm-up and oversize snapshots; "
    "`repeats`: upserts beyond the first; `not forwarded`: turns the sampler decided not to forward (samplingRate "
    "1.0: none; the pipeline records that decision per turn nowhere); `max recover s`: over the faults, the longest a "
    "turn that ended before a fault's end or within 20 s after it waited, from the fault's end or its own end "
    "when later, to be accepted by the panel (normal end-to-end latency when nothing was held up). Replay a run with "
    "`SOAK_SEED=<seed> SOAK_MINUTES=<minutes>`.\n"
)
SOAK_HEADER = (
    "| date (UTC) | seed | minutes | faults injected | turns | delivered | dead-lettered (by reason) "
    "| not forwarded | repeats (upserts) | unexplained | max recover s | notes |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)
CASES_HEADING = "## Cases (tests/faults/test_faults.py)"


def with_soak_row(text: str, row: str) -> str:
    """`text` (results.md) with `row` added to the Soak table. The section goes before the
    fault cases' table, which tests/faults/test_faults.py appends rows to at the end of the file."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    if SOAK_HEADING + "\n" in lines:
        i = lines.index(SOAK_HEADING + "\n") + 1
        while i < len(lines) and not lines[i].startswith("|"):
            i += 1
        while i < len(lines) and lines[i].startswith("|"):
            i += 1
        return "".join([*lines[:i], row, *lines[i:]])
    section = [SOAK_HEADING + "\n", "\n", SOAK_INTRO, "\n", SOAK_HEADER, row, "\n"]
    cut = next((i for i, line in enumerate(lines) if line.startswith("Appended by tests/faults/test_faults.py")),
               None)
    if cut is None:
        cut = next((i for i, line in enumerate(lines) if line.startswith("| when (UTC) | case |")), None)
    if cut is not None:
        return "".join([*lines[:cut], *section, CASES_HEADING + "\n", "\n", *lines[cut:]])
    head = "".join(lines) or "# Fault test results\n\n"
    if not head.endswith("\n\n"):
        head += "\n"
    return head + "".join(section) + CASES_HEADING + "\n\n" + RESULTS_HEADER


def faults_text(runs: list[FaultRun]) -> str:
    kinds = Counter(r.fault.kind for r in runs)
    parts = []
    for kind in KINDS:
        if kinds[kind]:
            if kind == "kill9":
                targets = ", ".join(r.fault.params["target"] for r in runs if r.fault.kind == "kill9")
                parts.append(f"kill9 {kinds[kind]} ({targets})")
            else:
                parts.append(f"{kind} {kinds[kind]}")
    return f"{len(runs)}: " + ", ".join(parts) if runs else "0"


# ---------------------------------------------------------------- the soak


def _warm_up(stack: Stack, seed: int) -> inv.Turn:
    """One trace through sample..deliver before the clock starts (opencode traffic warms ingest)."""
    snap = snapshot(0, host=f"soak-warmup-{seed}")
    turn = inv.make_turn(snap["host"], snap["session_id"], snap["messages"][-1]["info"]["id"], source="warmup")
    Feeder(stack.s.bootstrap, [(turn.key.encode(), encode(snap))], first=1, interval_s=0).start().join(60)
    with httpx.Client(timeout=10) as http:
        wait_for(lambda: http.get(stack.panel_url + "/_stub/accepted", params={"trace_id": turn.trace_id})
                 .json()["count"], WARMUP_S, interval_s=0.5, what="the warm-up trace")
    return turn


async def _listings(daemons: Mapping[str, OpencodeDaemon], sessions: Mapping[str, list[str]]) -> list[inv.Turn]:
    turns: list[inv.Turn] = []
    for host, daemon in daemons.items():
        async with daemon.client() as client:
            for sid in sessions[host]:
                turns += inv.listing_turns(host, sid, await client.messages(sid))
    return turns


def drain(stack: Stack, tracker: Tracker, health: Health, t0: float) -> str | None:
    """Wait until every stage's lag is 0 and every turn the driver saw end is at the panel, twice
    in a row 3 s apart; None when it got there, else what was still pending at the bound."""
    quiet = 0
    deadline = time.time() + DRAIN_BOUND_S
    lag: int | None = None
    while time.time() < deadline:
        health.check(t0)
        lag = total_lag(stack.s.bootstrap)
        quiet = quiet + 1 if lag == 0 and not tracker.outstanding() else 0
        if quiet >= 2:
            return None
        time.sleep(3)
    return f"drain bound {DRAIN_BOUND_S:.0f}s reached: lag {lag}, {len(tracker.outstanding())} turns not at the panel"


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.integration
@pytest.mark.e2e
def test_soak(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    minutes = float(os.environ.get("SOAK_MINUTES") or DEFAULT_MINUTES)
    seed = int(os.environ["SOAK_SEED"]) if os.environ.get("SOAK_SEED") else random.SystemRandom().randrange(1, 2**31)
    replay = f"SOAK_SEED={seed} SOAK_MINUTES={minutes:g}"
    say(capsys, f"\n[soak] seed {seed}, {minutes:g} minutes (replay: {replay})")
    hosts = {"a": "soak-oc-a", "b": "soak-oc-b"}
    with ModelStub() as model, own_broker(tmp_path / "kafka") as broker:
        daemons = {hosts["a"]: OpencodeDaemon(tmp_path / "proj-a", model.base_url),
                   hosts["b"]: OpencodeDaemon(tmp_path / "proj-b", model.base_url, password=f"pw-{seed}")}
        driver: Driver | None = None
        tracker: Tracker | None = None
        try:
            for d in daemons.values():
                d.start()
            stack = Stack(StackSettings(
                bootstrap=broker.bootstrap, workdir=tmp_path / "stack", stages=PIPELINE_STAGES, sampling_rate=1.0,
                extra_toml=SOAK_TOML, hosts_toml=hosts_toml(daemons),
                extra_env=dict(FAST_GROUP_ENV), worker_loglevel="info"))
            with stack.start(collector=True):
                stack.procs["collector"].wait_for_log("collecting from 2 hosts", 90)
                limit = asyncio.run(_set_topic_limit(broker.bootstrap, "traces.sampled", SAMPLED_LIMIT))
                assert limit == str(SAMPLED_LIMIT), f"traces.sampled max.message.bytes is {limit}"
                warm = _warm_up(stack, seed)
                t0 = time.time()
                tracker = Tracker(stack.panel_url).start()
                driver = Driver(daemons, seed, tracker.add).start()
                health = Health(stack)
                health.check(t0)
                campaign = Campaign(seed, stack, broker, tracker, health, t0, capsys)
                campaign.run(minutes)

                say(capsys, f"[soak] t+{time.time() - t0:6.1f}s campaign over; traffic stops, draining")
                driver.stop()
                stack.panel_faults(reset=True)
                stack.scrubber_faults(reset=True)
                drained = drain(stack, tracker, health, t0)
                say(capsys, f"[soak] t+{time.time() - t0:6.1f}s " + (drained or "drained"))
                result = check(stack, daemons, driver, campaign, warm, drained)
                result.minutes = minutes
                record_soak(result, seed, campaign, capsys)
                failures = [*result.accounting.problems(), *([f"drain: {drained}"] if drained else []),
                            *([f"unscrubbed content reached the panel: {result.leaked[:5]}"] if result.leaked else [])]
                if failures or driver.error:
                    pytest.fail(f"soak seed {seed} ({replay}):\n" + "\n".join(failures)
                                + (f"\ndriver: {driver.error!r}" if driver.error else "")
                                + "\n" + "\n".join(result.diagnosis) + "\n" + stack.logs_tail(1500))
        finally:
            if driver is not None:
                with contextlib.suppress(Exception):
                    driver.stop(30)
            if tracker is not None:
                tracker.stop()
            for d in daemons.values():
                with contextlib.suppress(Exception):
                    d.stop()


# ---------------------------------------------------------------- the account


@dataclass
class SoakResult:
    accounting: inv.Accounting
    leaked: list[str]
    notes: list[str]
    diagnosis: list[str]
    minutes: float = 0.0


def check(stack: Stack, daemons: Mapping[str, OpencodeDaemon], driver: Driver, campaign: Campaign,
          warm: inv.Turn, drained: str | None) -> SoakResult:
    bootstrap = stack.s.bootstrap
    listed = asyncio.run(_listings(daemons, driver.sessions))
    by_driver = {t.trace_id for t in driver.turns}
    by_listing = {t.trace_id for t in listed}
    notes, diagnosis = [], []
    if by_driver - by_listing:
        notes.append(f"{len(by_driver - by_listing)} turns the driver saw end are not in the daemons' listings")
    if by_listing - by_driver:
        notes.append(f"{len(by_listing - by_driver)} turns only in the listings (their prompt call failed)")
    ended = {t.trace_id: t for t in driver.turns}
    turns = [*driver.turns, *(t for t in listed if t.trace_id not in ended), warm, *campaign.oversize]

    accepted = stack.panel_accepted()
    delivered = {t["trace_id"]: int(t.get("upserts") or 1) for t in accepted}
    dead = [inv.DeadLetter.from_record(topic, r) for topic in dead_letter_topics() for r in read_json(bootstrap, topic)]
    accounting = inv.account(turns, delivered, dead, not_forwarded=(), poison=campaign.poison)
    leaked = inv.leaks({t["trace_id"]: json.dumps(t["body"], ensure_ascii=False) for t in accepted}, FORBIDDEN)

    oversize = Counter(",".join(accounting.fates.get(t.trace_id, ())) or "none" for t in campaign.oversize)
    if campaign.oversize:
        notes.append("oversize " + ", ".join(f"{k} {n}" for k, n in sorted(oversize.items())))
    if campaign.poison:
        notes.append(f"poison {len(campaign.poison) - len(accounting.poison_missing)}/{len(campaign.poison)} "
                     "dead-lettered (" + ", ".join(f"{k} {n}" for k, n in sorted(accounting.poison_dead.items())) + ")")
    opened = sum(1 for o in read_json(bootstrap, "delivery.outcomes")
                 if o.get("status") == "transition" and (o.get("detail") or {}).get("to") == "open")
    notes.append(f"breaker opened {opened}x")
    if accounting.stray_dead:
        notes.append(f"{len(accounting.stray_dead)} dead letters of no turn ("
                     + ", ".join(sorted({f'{d.topic}:{d.reason}' for d in accounting.stray_dead})) + ")")
    if leaked:
        notes.append(f"LEAKED {len(leaked)}")
    if driver.failures:
        notes.append(f"{len(driver.failures)} prompt calls failed")
    notes += campaign.health.incidents
    if drained:
        notes.append(drained)
    unrecovered = [r for r in campaign.runs if r.recover_s is None]
    if unrecovered:
        notes.append("not recovered after: " + ", ".join(r.fault.label for r in unrecovered))

    if accounting.unexplained or accounting.strays:
        seen: dict[str, set[str]] = {}
        for topic in PIPELINE_ORDER:
            seen[topic] = {tid for _, v in read_values(bootstrap, topic) if (tid := inv.trace_id_of_bytes(v))}
        where = inv.last_seen([t.trace_id for t in accounting.unexplained], seen, PIPELINE_ORDER)
        for t in accounting.unexplained[:30]:
            diagnosis.append(f"unexplained {t.trace_id} {t.source} {t.key} last {t.last_message_id}: furthest topic "
                             f"{where[t.trace_id] or 'none (never reached opencode.events)'}")
        by_id = {t["trace_id"]: t for t in accepted}
        for tid in accounting.strays[:30]:
            blob = by_id[tid]["body"].get("blob") or {}
            last = (blob.get("messages") or [{}])[-1].get("id")
            diagnosis.append(f"stray trace {tid}: session {blob.get('session_id')} last message {last}")
    diagnosis += driver.failures[:10]
    return SoakResult(accounting, leaked, notes, diagnosis)


def record_soak(result: SoakResult, seed: int, campaign: Campaign, capsys: pytest.CaptureFixture[str]) -> None:
    a = result.accounting
    recovered = [r.recover_s for r in campaign.runs if r.recover_s is not None]
    max_recover = f"{max(recovered):.1f}" if recovered else "-"
    if len(recovered) < len(campaign.runs):
        max_recover += f" ({len(campaign.runs) - len(recovered)} not recovered)"
    dead = ", ".join(f"{k} {n}" for k, n in sorted(a.dead_by_reason.items())) or "0"
    problems = [f"{len(a.conflicting)} with two fates"] * bool(a.conflicting) + \
               [f"{len(a.strays)} stray traces"] * bool(a.strays)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    notes = "; ".join(["traffic: 2 opencode daemons + collector", *problems, *result.notes]).replace("|", "/")
    row = (f"| {when} | {seed} | {result.minutes:g} | {faults_text(campaign.runs)} | {a.turns} | {a.delivered} "
           f"| {dead} | {a.not_forwarded} | {a.repeats} | {len(a.unexplained)} | {max_recover} | {notes} |\n")
    RESULTS.write_text(with_soak_row(RESULTS.read_text() if RESULTS.exists() else "", row))
    say(capsys, f"[soak] seed {seed}: turns={a.turns} delivered={a.delivered} dead={dead} "
                f"not_forwarded={a.not_forwarded} repeats={a.repeats} unexplained={len(a.unexplained)} "
                f"max_recover={max_recover}\n[soak] faults: {faults_text(campaign.runs)}\n[soak] notes: {notes}")
    for run in campaign.runs:
        say(capsys, f"[soak]   t+{run.started - campaign.t0:6.1f}s {run.fault.label}: "
                    f"{'-' if run.recover_s is None else f'{run.recover_s:.1f}s'} {run.notes}")


# ---------------------------------------------------------------- tests of the checker (default suite)


def _dead(topic: str, stage: str, reason: str, original: bytes, key: str | None, n: int = 0) -> inv.DeadLetter:
    record = dead_letter(stage=stage, source_topic=STAGES[stage].input, raw=original, reason=reason, error="x",
                         key=key, partition=0, offset=n)
    return inv.DeadLetter.from_record(topic, record)


def _turn_of_snapshot(snap: Mapping[str, Any], **kw: Any) -> inv.Turn:
    return inv.make_turn(snap["host"], snap["session_id"], snap["messages"][-1]["info"]["id"], **kw)


def test_account_delivered_dead_and_missing() -> None:
    a, b, c = (snapshot(i, host="h") for i in (1, 2, 3))
    turns = [_turn_of_snapshot(s) for s in (a, b, c)]
    delivered = {turns[0].trace_id: 3}
    dead = [_dead("sample.dead", "sample", "output_too_large", encode(b), turns[1].key)]
    result = inv.account(turns, delivered, dead)
    assert (result.turns, result.delivered, result.repeats) == (3, 1, 2)
    assert result.dead_by_reason == {"sample.dead:output_too_large": 1}
    assert [t.trace_id for t in result.unexplained] == [turns[2].trace_id]
    assert not result.ok and "1 unexplained" in result.problems()[0]
    assert result.fates[turns[0].trace_id] == ("delivered",)


def test_account_every_fate_explained() -> None:
    snaps = [snapshot(i, host="h") for i in range(4)]
    turns = [_turn_of_snapshot(s) for s in snaps]
    trace = sampled_trace(snaps[2], Decision(forward=True, reason="sample", rate=1.0), 25, 0)
    dead = [
        # the same dead letter written twice (a crash between write and commit) counts once
        _dead("sample.dead", "sample", "output_too_large", encode(snaps[1]), turns[1].key, n=7),
        _dead("sample.dead", "sample", "output_too_large", encode(snaps[1]), turns[1].key, n=7),
        # after sampling, a trace names its turn
        _dead("scrub.dead", "scrub", "scrubber_400", encode(trace), turns[2].trace_id, n=8),
    ]
    result = inv.account(turns, {turns[0].trace_id: 1}, dead, not_forwarded={turns[3].trace_id})
    assert result.ok, result.problems()
    assert (result.delivered, result.not_forwarded, result.repeats) == (1, 1, 0)
    assert result.dead_by_reason == {"sample.dead:output_too_large": 1, "scrub.dead:scrubber_400": 1}


def test_account_truncated_original_is_found_by_key() -> None:
    snap = snapshot(5, host="big")
    turn = _turn_of_snapshot(snap)
    dead = [_dead("sample.dead", "sample", "output_too_large", encode(snap)[:1000], turn.key)]
    result = inv.account([turn], {}, dead)
    assert result.ok and result.dead_by_reason == {"sample.dead:output_too_large": 1}
    # a key shared by two turns of one session names neither
    env = turn_ended_envelope(6, host="h")
    two = inv.listing_turns("h", env["session_id"], env["properties"]["messages"])
    assert len(two) == 2
    result = inv.account(two, {two[0].trace_id: 1}, [_dead("ingest.dead", "ingest", "x", b"\xff", two[1].key)])
    assert len(result.unexplained) == 1 and len(result.stray_dead) == 1


def test_account_conflicts_strays_and_poison() -> None:
    snaps = [snapshot(i, host="h") for i in range(2)]
    turns = [_turn_of_snapshot(s) for s in snaps]
    poison = [inv.Poison("traces.signed", "p1", b"{nope", "breaker.dead"),
              inv.Poison("opencode.events", "p2", b"\xff\xfe", "ingest.dead")]
    dead = [_dead("sample.dead", "sample", "schema_invalid", encode(snaps[0]), turns[0].key),
            _dead("breaker.dead", "breaker", "invalid_json", b"{nope", "p1"),
            _dead("ingest.dead", "ingest", "invalid_utf8", b"\xff\xfe", "other-key")]
    result = inv.account(turns, {turns[0].trace_id: 1, turns[1].trace_id: 1, "tr_oc_other": 1}, dead,
                         poison=poison)
    assert [t.trace_id for t, _ in result.conflicting] == [turns[0].trace_id]
    assert result.strays == ["tr_oc_other"]
    assert result.poison_dead == {"breaker.dead:invalid_json": 1}
    assert [p.key for p in result.poison_missing] == ["p2"]
    assert len(result.stray_dead) == 1 and not result.ok and len(result.problems()) == 3


def test_turn_identity_agrees_across_records_and_with_the_collector() -> None:
    from pipeline.collector.turns import completed_turns

    env = turn_ended_envelope(9, host="h", tool_error=True)
    snap = snapshot(9, host="h", tool_error=True)
    trace = sampled_trace(snap, Decision(forward=True, reason="sample", rate=1.0), 25, 0)
    assert inv.trace_id_of(env) == inv.trace_id_of(snap) == inv.trace_id_of(trace) == trace["trace_id"]
    assert inv.trace_id_of({"type": "message.updated", "properties": {}}) is None
    assert inv.trace_id_of_bytes(b"\xff") is None
    listing = env["properties"]["messages"]
    mine = inv.listing_turns("h", env["session_id"], listing)
    theirs = [listing[end - 1]["info"]["id"] for end in completed_turns(listing)]
    assert [t.last_message_id for t in mine] == theirs
    assert mine[-1].trace_id == trace["trace_id"]


def test_recovery_and_last_seen_and_leaks() -> None:
    ended = {"a": 10.0, "b": 20.0, "c": 40.0, "d": 60.0}
    assert inv.recovery_s(30.0, ended, {"a": 12.0}) is None
    assert inv.recovery_s(30.0, ended, {"a": 12.0, "b": 35.5}) == 5.5
    assert inv.recovery_s(30.0, ended, {"a": 12.0, "b": 21.0}) == 0.0
    # a turn ending after the fault, held up by what followed it (a rebalance), counts from its end
    assert inv.recovery_s(30.0, ended, {"a": 12.0, "b": 35.5}, horizon_s=20.0) is None
    assert inv.recovery_s(30.0, ended, {"a": 12.0, "b": 35.5, "c": 52.0}, horizon_s=20.0) == 12.0
    where = inv.last_seen(["a", "b"], {"t1": {"a", "b"}, "t2": {"a"}}, ["t1", "t2", "t3"])
    assert where == {"a": "t2", "b": "t1"}
    assert inv.leaks({"x": "has sk-live-abc", "y": "clean"}, ["sk-live-abc"]) == ["x: sk-live-abc"]


def test_schedule_replays_and_covers_every_kind() -> None:
    first = list(itertools.islice(schedule(42), 30))
    assert first == list(itertools.islice(schedule(42), 30))
    assert first != list(itertools.islice(schedule(43), 30))
    round_one = [f.kind for _, f in first[: sum(KIND_WEIGHTS.get(k, 1) for k in KINDS)]]
    assert set(round_one) == set(KINDS)
    assert all(GAP_S[0] <= gap <= GAP_S[1] for gap, _ in first)
    targets = [f.params["target"] for _, f in first if f.kind == "kill9"]
    assert set(targets[: len(KILL_TARGETS)]) == set(KILL_TARGETS)


def test_soak_rows_go_before_the_cases_table() -> None:
    cases = ("# Fault test results\n\nAppended by tests/faults/test_faults.py, one row per case.\n\n"
             + RESULTS_HEADER + "| 2026 | kill -9 sign | 24 | 24 | 0 | 0 | 1 | 2 | x |\n")
    once = with_soak_row(cases, "| r1 |\n")
    twice = with_soak_row(once, "| r2 |\n")
    assert twice.index(SOAK_HEADING) < twice.index("| r1 |") < twice.index("| r2 |") < twice.index(CASES_HEADING)
    assert twice.endswith("| 2026 | kill -9 sign | 24 | 24 | 0 | 0 | 1 | 2 | x |\n")  # the cases table stays last
    fresh = with_soak_row("", "| r1 |\n")
    assert fresh.endswith(RESULTS_HEADER) and "| r1 |" in fresh
