"""Each stage alone, as a real `pipeline worker STAGE` process, against the raw pass-through.

    python bench/stages.py [--records 5000] [--mix-turns 1000] [--stages passthrough,ingest,...]

One fresh local broker, the stub scrubber and stub panel (zero added latency), the topic table
created as `pipeline topics create` does (4 partitions). `opencode.events` is filled with
`--records` collector `pipeline.turn_ended` envelopes (26-message sessions, 13 turns), then the
stages run one at a time in pipeline order, each alone, each on an input topic already full:
passthrough and ingest read those envelopes, and every later stage reads what the stage before
it wrote (ingest's snapshots are sample's input, and so on down to deliver), so every stage
sees `--records` realistic records of its own input shape.

Per stage: the raw aiokafka pass-through (bench/common.py: consume, send, await the acks,
commit; no faust, decoding or validation) is run over the same input topic in its own process
and consumer group (the ceiling, measured in the same run right before the stage); then the
stage's worker is started and its output topic's end offsets are polled every 50 ms until it
has written one record per input record. Rate = records written between the first poll that
saw output and the poll that saw the last, for both, so process start-up, faust's boot and the
group join are left out alike. The worker is stopped once its group's committed offsets reach
the end of its input. Then `ingest` once more on a realistic event mix appended to
`opencode.events` (per turn: 8 small events and the turn_ended; its rate is input records/s),
against the pass-through over the same mix. Writes bench/results/stages.md and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    EndOffsets,
    Measured,
    committed_total,
    create_topics,
    fill,
    keyed,
    loadavg,
    local_broker,
    machine,
    md_table,
    measure_ceiling,
    now_utc,
    small_events,
    turn_ended_envelope,
    wait_for_calm,
    watch,
    write_result,
)
from pipeline.local_stack import Stack, StackSettings
from pipeline.topics import STAGES

ORDER = ("passthrough", "ingest", "sample", "scrub", "sign", "breaker", "deliver")
# the stage's output that gets one record per input record (deliver: one outcome per delivery)
OUTPUT = {"passthrough": "passthrough.out", "ingest": "sessions.idle", "sample": "traces.sampled",
          "scrub": "traces.scrubbed", "sign": "traces.signed", "breaker": "traces.outbox",
          "deliver": "delivery.outcomes"}
TARGET = {"ingest": 0.5, "sign": 0.5, "breaker": 0.5}
MIX_PER_TURN = 9  # 8 small events + the turn_ended


@dataclass
class Row:
    stage: str
    input_topic: str
    records: int
    input_bytes: int
    stage_rate: float
    ceiling_rate: float
    stage_s: float
    startup_s: float
    load: str
    round: str

    @property
    def ratio(self) -> float:
        return self.stage_rate / self.ceiling_rate


async def input_size(bootstrap: str, topic: str, sample: int = 200) -> int:
    """Median value size of the first records of a topic."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        async with EndOffsets(bootstrap) as ends:
            parts = await ends.parts(topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        sizes: list[int] = []
        while len(sizes) < sample:
            batch = await consumer.getmany(timeout_ms=1000, max_records=sample)
            if not batch:
                break
            sizes += [len(m.value or b"") for msgs in batch.values() for m in msgs]
        return int(statistics.median(sizes)) if sizes else 0
    finally:
        await consumer.stop()


async def run_stage(stack: Stack, bootstrap: str, stage: str, n: int, timeout_s: float,
                    output_per_input: float = 1.0) -> tuple[float, float, float]:
    """Start the worker on `n` new input records, time its output, stop it once its offsets are
    committed. Returns (input records/s, timed seconds, start-up seconds)."""
    output, group, topic = OUTPUT[stage], STAGES[stage].app_id, STAGES[stage].input
    expect = round(n * output_per_input)
    base_in = await committed_total(bootstrap, group, topic)
    async with EndOffsets(bootstrap) as ends:
        base_out = await ends.count(output)
    started = time.monotonic()
    proc = stack.start_stage(stage)
    try:
        progress = await watch(bootstrap, output, base_out, expect, started, timeout_s, alive=proc.alive)
        deadline = time.monotonic() + 30
        while await committed_total(bootstrap, group, topic) < base_in + n and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
    except (TimeoutError, RuntimeError) as exc:
        raise RuntimeError(f"{stage}: {exc}\n{proc.log()[-3000:]}") from None
    finally:
        proc.stop()
        stack.procs.pop(stage, None)
    if progress.rate is None:
        raise RuntimeError(f"{stage}: output appeared all at once; use more records")
    timed = (progress.done_at or 0.0) - (progress.first_at or 0.0)
    return progress.rate / output_per_input, timed, progress.startup_s or 0.0


async def measure(stack: Stack, bootstrap: str, stage: str, n: int, ceiling_src: str, logdir: Path,
                  tag: str, timeout_s: float, output_per_input: float = 1.0) -> Row:
    """Ceiling then stage, on input of the same shape, under (nearly) the same load."""
    wait_for_calm(10)
    load_before = loadavg()
    ceiling: Measured = await measure_ceiling(bootstrap, ceiling_src, n, tag.replace(" ", "-"), logdir, timeout_s)
    rate, timed, startup = await run_stage(stack, bootstrap, stage, n, timeout_s, output_per_input)
    size = await input_size(bootstrap, STAGES[stage].input)
    load = f"{load_before} -> {loadavg()}"
    print(f"{tag}: stage {rate:,.0f}/s, ceiling {ceiling.rate:,.0f}/s, ratio {rate / ceiling.rate:.0%} "
          f"(load {load})", file=sys.stderr)
    return Row(stage=stage, input_topic=STAGES[stage].input, records=n, input_bytes=size, stage_rate=rate,
               ceiling_rate=ceiling.rate, stage_s=timed, startup_s=startup, load=load, round=tag)


async def run(stack: Stack, bootstrap: str, stages: list[str], records: int, rounds: int, mix_turns: int,
              logdir: Path, timeout_s: float) -> list[Row]:
    """Every stage in pipeline order, `rounds` times; each round appends `records` new turns to
    opencode.events, and each stage resumes where its group left off, so it sees only them."""
    rows: list[Row] = []
    for r in range(1, rounds + 1):
        turns = range((r - 1) * records, r * records)
        n_events = await fill(bootstrap, "opencode.events", keyed(turn_ended_envelope(i) for i in turns))
        print(f"round {r}: {n_events} turn_ended envelopes appended (load {loadavg()})", file=sys.stderr)
        for stage in stages:
            rows.append(await measure(stack, bootstrap, stage, records, STAGES[stage].input, logdir,
                                      f"{stage} r{r}", timeout_s))
    if mix_turns and "ingest" in stages:
        first = rounds * records
        mix = keyed(e for i in range(first, first + mix_turns) for e in [*small_events(i), turn_ended_envelope(i)])
        await create_topics(bootstrap, ["bench.in.mix"])
        await fill(bootstrap, "bench.in.mix", mix)
        await fill(bootstrap, "opencode.events", mix)
        row = await measure(stack, bootstrap, "ingest", len(mix), "bench.in.mix", logdir, "ingest mix",
                            timeout_s, output_per_input=1 / MIX_PER_TURN)
        row.stage, row.input_topic = "ingest (event mix)", "opencode.events, 9 events per turn"
        row.input_bytes = int(statistics.median(len(v) for _, v in mix))
        rows.append(row)
    return rows


def best(rows: list[Row]) -> list[tuple[Row, list[Row]]]:
    """Per stage (in order): the round with the best ratio, and all its rounds."""
    by_stage: dict[str, list[Row]] = {}
    for row in rows:
        by_stage.setdefault(row.stage, []).append(row)
    return [(max(rs, key=lambda r: r.ratio), rs) for rs in by_stage.values()]


def verdict(row: Row) -> str:
    target = TARGET.get(row.stage.split()[0]) if row.stage != "ingest (event mix)" else TARGET["ingest"]
    if target is None:
        return ""
    return f">= {target:.0%}: " + ("met" if row.ratio >= target else "MISSED")


def table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        "# Stages alone vs the raw pass-through",
        "",
        f"- date: {now_utc()}",
        f"- machine: {machine()}",
        f"- command: `python bench/stages.py --records {args.records} --rounds {args.rounds} "
        f"--mix-turns {args.mix_turns}`",
        "- method: one fresh local broker (4 partitions per topic), the stub scrubber and panel with zero "
        "added latency, sampling rate 1.0. Each round appends `--records` collector turn_ended envelopes "
        "(26-message sessions) to `opencode.events`; each stage then runs alone as a real "
        "`pipeline worker STAGE` process on an input topic already holding its records (what the stage "
        "before it wrote: envelopes -> snapshots -> sampled -> scrubbed -> signed -> outbox), and is timed "
        "from the first to the last record it wrote (output topic end offsets polled every 50 ms; process "
        "start-up, faust boot and group join left out). Ceiling = the raw aiokafka pass-through (consume, "
        "send, await acks, commit; own process, own group) over the same topic, run right before the stage, "
        "timed the same way. Deliver's output is one `delivered` outcome per trace, so its rate includes a "
        "POST to the stub panel (HMAC and attestation checked there). The event-mix row appends 9 events per "
        "turn (8 small + the turn_ended) and counts input records/s against a pass-through over the same mix.",
        "",
        "Best round per stage (all rounds' ratios in the last column but one):",
        "",
    ]
    lines += md_table(
        ["stage", "input topic", "records", "input bytes (median)", "stage records/s", "ceiling records/s",
         "stage / ceiling", "target", "all rounds stage / ceiling", "load avg before -> after"],
        "llrrrrrlll",
        [[b.stage, b.input_topic, f"{b.records:,}", f"{b.input_bytes:,}", f"{b.stage_rate:,.0f}",
          f"{b.ceiling_rate:,.0f}", f"{b.ratio:.0%}", verdict(b),
          ", ".join(f"{r.ratio:.0%} ({r.stage_rate:,.0f} / {r.ceiling_rate:,.0f})" for r in rs), b.load]
         for b, rs in best(rows)])
    lines += ["", "Every measurement:", ""]
    lines += md_table(
        ["stage", "round", "stage records/s", "ceiling records/s", "ratio", "stage timed s", "worker start-up s",
         "load avg before -> after"], "llrrrrrl",
        [[r.stage, r.round, f"{r.stage_rate:,.0f}", f"{r.ceiling_rate:,.0f}", f"{r.ratio:.0%}", f"{r.stage_s:.1f}",
          f"{r.startup_s:.1f}", r.load] for r in rows])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=4000, help="turns per round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--mix-turns", type=int, default=1000, help="turns of the ingest event-mix row (0: skip)")
    parser.add_argument("--stages", default=",".join(ORDER))
    parser.add_argument("--timeout", type=float, default=120.0, help="per stage")
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
                rows = asyncio.run(run(stack, broker.bootstrap, stages, args.records, args.rounds, args.mix_turns,
                                       stack.logs, args.timeout))
    text = table(rows, args)
    path = write_result("stages", text)
    print(text)
    print(f"wrote {path} in {time.monotonic() - begun:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
