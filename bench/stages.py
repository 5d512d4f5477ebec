"""Each stage alone, as a real `pipeline worker STAGE` process, against the raw pass-through.

    python bench/stages.py [--records 3000] [--mix-turns 1000] [--stages passthrough,ingest,...]

One fresh local broker, the stub scrubber and stub panel (zero added latency), the topic table
created as `pipeline topics create` does (4 partitions), sampling rate 1.0. `opencode.events`
is filled with `--records` collector `pipeline.turn_ended` envelopes (26-message sessions, 13
turns) followed by `--mix-turns` turns as the collector really produces them (8 small events
and the turn_ended per turn). The stages then run one at a time in pipeline order, each alone,
each on an input topic already full: passthrough and ingest read those events, and every later
stage reads what the stage before it wrote (ingest's snapshots are sample's input, and so on
down to deliver), so each sees realistic records of its own input shape.

Per stage: the raw aiokafka pass-through (bench/common.py: consume, send, await the acks,
commit; no faust, decoding or validation) runs over the same input topic in its own process
and consumer group (the ceiling, measured in the same run right before the stage); then the
stage's worker is started and its output topic's end offsets are polled every 50 ms until it
has written what its input makes. Rate = records between the first poll that saw output and
the poll that saw the last, for both, so process start-up, faust's boot and the group join
are left out alike. On `opencode.events` the two parts (turn_ended only, then the event mix)
are timed separately, for the stage and the ceiling alike: the mix's rate is input records/s.
The worker is stopped once its group's committed offsets reach the end of its input. Each
stage with a target (ingest, sign, breaker) is measured `--attempts` times (default 3; sign and
breaker on a copy of their input, ingest on new sessions once every later stage has run, as it
drops repeated event ids) and the attempt with the median ratio is reported; any other stage
measured while the machine was busy is measured once more on a copy of its input. Besides
records/s, the CPU time (user + system) each process spent per record is reported: on a
machine shared with other work it is the steadier comparison. Writes bench/results/stages.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaConsumer

from bench.common import (
    EndOffsets,
    committed_total,
    create_topics,
    fill,
    keyed,
    load_is_high,
    loadavg,
    local_broker,
    md_table,
    measure_ceiling,
    publish,
    result_header,
    small_events,
    turn_ended_envelope,
    wait_for_calm,
    watch,
)
from devkit.local_stack import Stack, StackSettings
from pipeline.kafka.security import client_settings
from pipeline.topics import STAGES

ORDER = ("passthrough", "ingest", "sample", "scrub", "sign", "breaker", "deliver")
# the stage's output that gets one record per input record (deliver: one outcome per delivery)
OUTPUT = {"passthrough": "passthrough.out", "ingest": "sessions.idle", "sample": "traces.sampled",
          "scrub": "traces.scrubbed", "sign": "traces.signed", "breaker": "traces.outbox",
          "deliver": "delivery.outcomes"}
TARGET = {"ingest": 0.5, "sign": 0.5, "breaker": 0.5}
# measured once: ingest and sample drop repeated event / snapshot ids (a copy of their input
# makes no output), and scrub and deliver are slow (the run stays within ~5 minutes)
NO_REPEAT = {"ingest", "sample", "scrub", "deliver"}
MIX_PER_TURN = 9  # 8 small events + the turn_ended
CEILING_PASSES = 6


async def topic_size(bootstrap: str, topic: str) -> int:
    async with EndOffsets(bootstrap) as ends:
        return await ends.count(topic)


@dataclass(frozen=True)
class Phase:
    label: str
    inputs: int
    outputs: int


@dataclass
class Row:
    stage: str
    phase: str
    input_topic: str
    records: int
    input_bytes: int
    stage_rate: float
    ceiling_rate: float
    stage_s: float
    startup_s: float
    load: str
    attempt: int = 1
    stage_cpu_us: float | None = None  # worker CPU per input record
    ceiling_cpu_us: float | None = None

    @property
    def cpu_ratio(self) -> float | None:
        """Ceiling CPU / stage CPU per record: the ratio on idle cores."""
        if not self.stage_cpu_us or not self.ceiling_cpu_us:
            return None
        return self.ceiling_cpu_us / self.stage_cpu_us

    @property
    def ratio(self) -> float:
        return self.stage_rate / self.ceiling_rate


async def head(bootstrap: str, topic: str, n: int) -> list[tuple[bytes | None, bytes]]:
    """(key, value) of about the first `n` records of `topic`, partition by partition."""
    consumer = AIOKafkaConsumer(**client_settings(bootstrap), group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False, max_partition_fetch_bytes=16 * 1024 * 1024)
    await consumer.start()
    try:
        async with EndOffsets(bootstrap) as ends:
            parts = await ends.parts(topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        records: list[tuple[bytes | None, bytes]] = []
        while len(records) < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=1000)
            if not batch:
                break
            records += [(m.key, m.value or b"") for msgs in batch.values() for m in msgs]
        return records
    finally:
        await consumer.stop()


async def sizes(bootstrap: str, topic: str, n: int) -> list[int]:
    """Value sizes of the first `n` records of a topic."""
    return [len(value) for _, value in await head(bootstrap, topic, n)]


async def copy_head(bootstrap: str, topic: str, n: int, attempt: int) -> str:
    """Append the first `n` records of `topic` again (same keys, so same partitions and order),
    for the stage's next attempt, and put the same records alone in a new topic for that
    attempt's ceiling (whose name is returned): the ceiling reads a whole topic, and timed over
    the grown input it would move more records than the stage does in its attempt."""
    records = (await head(bootstrap, topic, n))[:n]
    await fill(bootstrap, topic, records)
    alone = f"bench.src.{topic}.{attempt}"
    await create_topics(bootstrap, [alone])
    await fill(bootstrap, alone, records)
    return alone


async def run_stage(stack: Stack, bootstrap: str, stage: str, phases: list[Phase],
                    timeout_s: float) -> tuple[list[float], list[float], float, list[float | None]]:
    """Start the worker on its new input, time its output per phase, stop it once its offsets
    are committed. Returns (input records/s per phase, timed seconds per phase, start-up s)."""
    output, group, topic = OUTPUT[stage], STAGES[stage].app_id, STAGES[stage].input
    base_in = await committed_total(bootstrap, group, topic)
    async with EndOffsets(bootstrap) as ends:
        base_out = await ends.count(output)
    marks = list(itertools.accumulate(p.outputs for p in phases))
    started = time.monotonic()
    proc = stack.start_stage(stage)
    try:
        progress = await watch(bootstrap, output, base_out, marks, started, timeout_s, alive=proc.alive,
                               pid=proc.proc.pid if proc.proc else None)
        deadline = time.monotonic() + 30
        total_in = sum(p.inputs for p in phases)
        while await committed_total(bootstrap, group, topic) < base_in + total_in and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
    except (TimeoutError, RuntimeError) as exc:
        raise RuntimeError(f"{stage}: {exc}\n{proc.log()[-3000:]}") from None
    finally:
        proc.stop()
        stack.procs.pop(stage, None)
    rates = progress.rates()
    if any(r is None for r in rates):
        raise RuntimeError(f"{stage}: output of a phase appeared all at once; use more records")
    per_input = [float(r or 0.0) * p.inputs / p.outputs for r, p in zip(rates, phases, strict=True)]
    cpu = [None if c is None else c * p.outputs / p.inputs for c, p in zip(progress.cpu_us(), phases, strict=True)]
    return per_input, progress.seconds(), progress.startup_s or 0.0, cpu


async def measure(stack: Stack, bootstrap: str, stage: str, phases: list[Phase], logdir: Path,
                  attempt: int, timeout_s: float, phase_bytes: list[int] | None = None,
                  phase_topics: list[str] | None = None) -> list[Row]:
    """Ceiling then stage, on the same input, under (nearly) the same load: one row per phase.
    The ceiling reads the stage's input topic (or, for phases, topics holding each phase's
    records alone) CEILING_PASSES times over, so it is timed over a second or more."""
    wait_for_calm(10)
    load_before = loadavg()
    src = STAGES[stage].input
    ceiling_rates: list[float] = []
    ceiling_cpu: list[float | None] = []
    for i, (_phase, topic) in enumerate(zip(phases, phase_topics or [src], strict=True)):
        whole = await topic_size(bootstrap, topic)
        got = await measure_ceiling(bootstrap, topic, whole, f"{stage}-{attempt}-{i}", logdir, timeout_s,
                                    passes=CEILING_PASSES)
        ceiling_rates.append(got.rate)
        ceiling_cpu.append(got.cpu_us[0])
    rates, seconds, startup, cpu = await run_stage(stack, bootstrap, stage, phases, timeout_s)
    load = f"{load_before} -> {loadavg()}"
    if phase_bytes is None:
        phase_bytes = [int(statistics.median(await sizes(bootstrap, src, 300)))] * len(phases)
    rows = []
    for phase, size, rate, ceil, secs, cpu_us, ceil_cpu in zip(phases, phase_bytes, rates, ceiling_rates, seconds,
                                                               cpu, ceiling_cpu, strict=True):
        rows.append(Row(stage=stage, phase=phase.label, input_topic=src, records=phase.inputs,
                        input_bytes=size, stage_rate=rate, ceiling_rate=ceil,
                        stage_s=secs, startup_s=startup, load=load, attempt=attempt, stage_cpu_us=cpu_us,
                        ceiling_cpu_us=ceil_cpu))
        print(f"{stage} [{phase.label}] #{attempt}: stage {rate:,.0f}/s, ceiling {ceil:,.0f}/s, "
              f"ratio {rate / ceil:.0%}; CPU us/record stage {cpu_us or 0:,.0f}, ceiling {ceil_cpu or 0:,.0f} "
              f"(load {load})", file=sys.stderr)
    return rows


def phases_for(stage: str, records: int, mix_turns: int) -> list[Phase]:
    turns = records + mix_turns
    if stage == "passthrough":
        return [p for p in (Phase("turn_ended envelopes", records, records),
                            Phase("event mix, 9 per turn", MIX_PER_TURN * mix_turns, MIX_PER_TURN * mix_turns))
                if p.inputs]
    if stage == "ingest":
        return [p for p in (Phase("turn_ended envelopes", records, records),
                            Phase("event mix, 9 per turn", MIX_PER_TURN * mix_turns, mix_turns)) if p.inputs]
    return [Phase("all", turns, turns)]


Keyed = list[tuple[bytes, bytes]]


def event_parts(records: int, mix_turns: int, prefix: str) -> tuple[Keyed, Keyed]:
    """opencode.events records: `records` turn_ended envelopes, then `mix_turns` turns of 9 events,
    all of sessions named from `prefix` (fresh ids for a stage that drops repeated ones)."""
    turned = keyed(turn_ended_envelope(i, prefix=prefix) for i in range(records))
    mixed = keyed(e for i in range(records, records + mix_turns)
                  for e in [*small_events(i, prefix=prefix), turn_ended_envelope(i, prefix=prefix)])
    return turned, mixed


async def run(stack: Stack, bootstrap: str, stages: list[str], records: int, mix_turns: int,
              logdir: Path, timeout_s: float, repeat_busy: bool, attempts: int) -> list[Row]:
    turned, mixed = event_parts(records, mix_turns, "ses_bench")
    await fill(bootstrap, "opencode.events", turned + mixed)
    event_bytes = [int(statistics.median(len(v) for _, v in part)) for part in (turned, mixed) if part]
    # the ceiling's copies of each part of opencode.events, to time it on each part alone
    event_topics = [name for name, part in (("bench.src.turn_ended", turned), ("bench.src.mix", mixed)) if part]
    await create_topics(bootstrap, event_topics)
    for name, part in zip(event_topics, [p for p in (turned, mixed) if p], strict=True):
        await fill(bootstrap, name, part)
    print(f"opencode.events: {records} turn_ended + {mix_turns} turns of 9 events (load {loadavg()})",
          file=sys.stderr)
    rows: list[Row] = []
    later: list[str] = []  # ingest's further attempts: after every stage that reads what it wrote
    for stage in stages:
        phases = phases_for(stage, records, mix_turns)
        on_events = STAGES[stage].input == "opencode.events"
        known, topics = (event_bytes, event_topics) if on_events else (None, None)
        rows += await measure(stack, bootstrap, stage, phases, logdir, 1, timeout_s, known, topics)
        if stage in TARGET and stage in NO_REPEAT:
            later.append(stage)
            continue
        extra = attempts - 1 if stage in TARGET else int(repeat_busy and load_is_high() and stage not in NO_REPEAT)
        for attempt in range(2, 2 + extra):
            print(f"{stage}: attempt {attempt} on a copy of its input (load {loadavg()})", file=sys.stderr)
            alone = await copy_head(bootstrap, STAGES[stage].input, sum(p.inputs for p in phases), attempt)
            rows += await measure(stack, bootstrap, stage, phases, logdir, attempt, timeout_s, known,
                                  topics or [alone])
    for stage in later:  # only ingest: new sessions each time, as it drops repeated event ids
        phases = phases_for(stage, records, mix_turns)
        for attempt in range(2, attempts + 1):
            print(f"{stage}: attempt {attempt} on new sessions (load {loadavg()})", file=sys.stderr)
            turned, mixed = event_parts(records, mix_turns, f"ses_bench{attempt}")
            await fill(bootstrap, "opencode.events", turned + mixed)
            rows += await measure(stack, bootstrap, stage, phases, logdir, attempt, timeout_s, event_bytes,
                                  event_topics)
    return rows


def median_attempt(rows: list[Row]) -> Row:
    """The attempt with the median stage/ceiling ratio (the lower one of an even count)."""
    ranked = sorted(rows, key=lambda r: r.ratio)
    return ranked[(len(ranked) - 1) // 2]


def cpu_cell(row: Row) -> str:
    if row.stage_cpu_us is None or row.ceiling_cpu_us is None:
        return ""
    return f"{row.stage_cpu_us:,.0f} / {row.ceiling_cpu_us:,.0f}"


def verdict(row: Row) -> str:
    target = TARGET.get(row.stage)
    if target is None:
        return ""
    return f">= {target:.0%}: " + ("met" if row.ratio >= target else "MISSED")


def table(rows: list[Row], args: argparse.Namespace) -> str:
    best: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        best.setdefault((row.stage, row.phase), []).append(row)
    lines = [
        *result_header("Stages alone vs the raw pass-through",
                       f"python bench/stages.py --records {args.records} --mix-turns {args.mix_turns}"),
        "- method: one fresh local broker (4 partitions per topic), the stub scrubber and panel with zero "
        "added latency, sampling rate 1.0. `opencode.events` holds the collector's turn_ended envelopes "
        "(26-message sessions), then turns as the collector produces them (8 small events + the turn_ended "
        "each). Each stage runs alone as a real `pipeline worker STAGE` process on an input topic already "
        "holding its records (what the stage before it wrote: events -> snapshots -> sampled -> scrubbed -> "
        "signed -> outbox) and is timed from the first to the last record it wrote (output topic end "
        "offsets polled every 50 ms; process start-up, faust boot and group join left out). Ceiling = the "
        "raw aiokafka pass-through (consume, send, await acks, commit; own process, own group) over the same "
        "input, run right before the stage and timed the same way; both in input records/s. Deliver's "
        "output is one `delivered` outcome per trace: its rate includes a POST to the stub panel, which "
        "checks HMAC and attestation. Stages with a target are measured several times (ingest on new "
        "sessions each time) and the attempt with the median ratio is shown; another stage measured under "
        "high load is measured again on a copy of its input. Every attempt is listed below.",
        "",
    ]
    lines += md_table(
        ["stage", "input", "records", "input bytes (median)", "stage records/s", "ceiling records/s",
         "stage / ceiling", "target", "CPU us/record stage / ceiling", "CPU ratio", "load avg before -> after"],
        "llrrrrrlrrl",
        [[b.stage, f"{b.input_topic}: {b.phase}" if b.phase != "all" else b.input_topic, f"{b.records:,}",
          f"{b.input_bytes:,}", f"{b.stage_rate:,.0f}", f"{b.ceiling_rate:,.0f}", f"{b.ratio:.0%}", verdict(b),
          cpu_cell(b), f"{b.cpu_ratio:.0%}" if b.cpu_ratio else "", b.load]
         for b in (median_attempt(rs) for rs in best.values())])
    lines += ["", "Every attempt:", ""]
    lines += md_table(
        ["stage", "input", "attempt", "stage records/s", "ceiling records/s", "ratio", "CPU us/record stage / ceiling",
         "stage timed s", "worker start-up s", "load avg before -> after"], "llrrrrrrrl",
        [[r.stage, r.phase, r.attempt, f"{r.stage_rate:,.0f}", f"{r.ceiling_rate:,.0f}", f"{r.ratio:.0%}",
          cpu_cell(r), f"{r.stage_s:.1f}", f"{r.startup_s:.1f}", r.load] for r in rows])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3000, help="turn_ended envelopes")
    parser.add_argument("--mix-turns", type=int, default=600, help="turns as 9 events each (0: none)")
    parser.add_argument("--stages", default=",".join(ORDER))
    parser.add_argument("--timeout", type=float, default=180.0, help="per stage")
    parser.add_argument("--attempts", type=int, default=3,
                        help="measurements of each stage with a target (ingest on new sessions each time)")
    parser.add_argument("--no-repeat", action="store_true", help="never measure a stage twice (--attempts 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the broker, config and logs here")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(ORDER))
    if unknown:
        parser.error(f"unknown stages {unknown}; known: {', '.join(ORDER)}")
    begun = time.monotonic()
    print(f"load before: {loadavg()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        with local_broker(workdir) as broker:
            stack = Stack(StackSettings(bootstrap=broker.bootstrap, workdir=workdir, stages=(), sampling_rate=1.0))
            with stack.start():
                rows = asyncio.run(run(stack, broker.bootstrap, stages, args.records, args.mix_turns, stack.logs,
                                       args.timeout, not args.no_repeat, 1 if args.no_repeat else args.attempts))
    text = table(rows, args)
    return publish("stages", text, begun)


if __name__ == "__main__":
    sys.exit(main())
