"""Idle to delivered: the whole pipeline after ingest, with zero-latency stubs.

    python bench/end_to_end.py [--burst 0] [--duration 20] [--levels 0.25,0.5,0.9]

One fresh local broker; `sample`, `scrub`, `sign`, `breaker` and `deliver` as real worker
processes (devkit/local_stack.py's Stack), the stub scrubber and stub panel with no added
latency, sampling rate 1.0 (every snapshot is forwarded). Snapshots are 25-message
`session.snapshot/1` records (bench/common.py), each produced to `sessions.idle` with its
`emitted_at` set to the wall-clock millisecond it is handed to the producer (the produce
timestamp); a trace's latency is the stub panel's accept time (`first_at`: when its POST
arrived) minus that. Every process runs on this machine's clock.

1. Max sustainable throughput: a burst of snapshots produced at once; the rate the panel
   accepted them at between the 10th and the 90th percentile of their accept times (the
   pipeline's steady drain rate, start-up and tail left out). `--burst 0`: 25 s worth, sized
   from a 300-snapshot probe.
2. Latency: snapshots produced open-loop at 25 %, 50 % and 90 % of that rate for `--duration`
   seconds each (evenly spaced, sent on schedule whatever the pipeline does), then drained;
   p50 / p90 / p99 / max of idle-to-accepted. The panel's records are reset between levels.
   A level run while the machine was busy is run once more; both attempts are listed.
Writes bench/results/end_to_end.md and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    load_is_high,
    loadavg,
    local_broker,
    md_table,
    producer,
    publish,
    result_header,
    snapshot_record,
    wait_for_calm,
)
from devkit.local_stack import Stack, StackSettings
from pipeline.model.records import encode

STAGES = ("sample", "scrub", "sign", "breaker", "deliver")
TARGET_P99_MS = 1000.0  # at 50 % of the max sustainable rate


class Snapshots:
    """Fresh 25-message snapshots (unique sessions, so the sampler never sees a repeat)."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> list[dict[str, Any]]:
        out = [snapshot_record(i, prefix="ses_e2e", emitted_at_ms=0) for i in range(self.next, self.next + n)]
        self.next += n
        return out


class Panel:
    """The stub panel's inspection endpoints."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=120)

    def count(self) -> int:
        return int(self.client.get("/_stub/stats").json()["accepted_traces"])

    def accepted_at(self) -> dict[str, float]:
        """session id -> accept time (epoch seconds) of every accepted trace."""
        traces = self.client.get("/_stub/accepted").json()["traces"]
        return {t["body"]["blob"]["session_id"]: float(t["first_at"]) for t in traces}

    def reset(self) -> None:
        self.client.post("/_stub/reset").raise_for_status()

    def wait_for(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the panel accepted {self.count()} of {n} traces in {timeout_s:.0f} s")
            time.sleep(0.5)


async def produce(bootstrap: str, snaps: list[dict[str, Any]], rate: float | None) -> dict[str, int]:
    """Send every snapshot to sessions.idle (at `rate`/s, or at once), stamping `emitted_at`
    when each is handed to the producer. Returns session id -> emitted_at ms."""
    prod = producer(bootstrap, linger_ms=0)
    await prod.start()
    emitted: dict[str, int] = {}
    pending: list[asyncio.Future[Any]] = []
    try:
        start = time.monotonic()
        for i, snap in enumerate(snaps):
            if rate:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            snap["emitted_at"] = int(time.time() * 1000)
            emitted[snap["session_id"]] = snap["emitted_at"]
            pending.append(await prod.send("sessions.idle", encode(snap),
                                           key=f"{snap['host']}:{snap['session_id']}".encode()))
        await asyncio.gather(*pending)
    finally:
        await prod.stop()
    return emitted


@dataclass
class Level:
    share: float
    rate: float
    sent: int
    seconds: float
    latencies_ms: list[float]
    load: str
    attempt: int

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]


def run_level(stack: Stack, panel: Panel, bootstrap: str, snaps: Snapshots, share: float, max_rate: float,
              duration_s: float, attempt: int, timeout_s: float) -> Level:
    rate = share * max_rate
    batch = snaps.take(max(1, round(rate * duration_s)))
    wait_for_calm(10)
    panel.reset()
    load_before = loadavg()
    began = time.monotonic()
    emitted = asyncio.run(produce(bootstrap, batch, rate))
    seconds = time.monotonic() - began
    panel.wait_for(len(batch), timeout_s)
    accepted = panel.accepted_at()
    latencies = [accepted[sid] * 1000 - at for sid, at in emitted.items()]
    level = Level(share=share, rate=rate, sent=len(batch), seconds=seconds, latencies_ms=latencies,
                  load=f"{load_before} -> {loadavg()}", attempt=attempt)
    print(f"{share:.0%} ({rate:,.1f}/s, {len(batch)} sent in {seconds:.1f} s): p50 {level.pct(50):,.0f} ms, "
          f"p99 {level.pct(99):,.0f} ms (load {level.load})", file=sys.stderr)
    return level


def burst_rate(panel: Panel, bootstrap: str, snaps: Snapshots, n: int, timeout_s: float) -> tuple[float, str]:
    """Produce `n` snapshots at once; the panel's accept rate between its 10th and 90th
    percentile accept times."""
    wait_for_calm(10)
    panel.reset()
    load_before = loadavg()
    asyncio.run(produce(bootstrap, snaps.take(n), None))
    panel.wait_for(n, timeout_s)
    times = sorted(panel.accepted_at().values())
    lo, hi = round(0.1 * (n - 1)), round(0.9 * (n - 1))
    rate = (hi - lo) / (times[hi] - times[lo])
    return rate, f"{load_before} -> {loadavg()}"


def table(capacity: float, capacity_n: int, capacity_load: str, probe: float, levels: list[Level],
          args: argparse.Namespace) -> str:
    halves = [lv for lv in levels if abs(lv.share - 0.5) < 1e-9]
    lines = [
        *result_header("End to end: idle to delivered",
                       f"python bench/end_to_end.py --burst {args.burst} --duration {args.duration:g} "
                       f"--levels {args.levels}"),
        "- method: one fresh local broker (4 partitions), sample, scrub, sign, breaker and deliver as real "
        "worker processes (Stack from devkit/local_stack.py), the stub scrubber and stub panel with zero "
        "added latency, sampling rate 1.0, so every snapshot is scrubbed, signed and delivered. Each "
        "25-message snapshot gets `emitted_at` = the wall-clock ms it is handed to the producer; latency = "
        "the stub panel's `first_at` (when the trace's POST arrived) - `emitted_at`, same machine clock. "
        "Max sustainable throughput = the panel's accept rate between the 10th and 90th percentile accept "
        "times of a burst produced at once. Each level then produces snapshots open-loop, evenly spaced, for "
        f"{args.duration:g} s and drains; a level run under high load is run again (every attempt listed).",
        "",
        f"Max sustainable throughput: **{capacity:,.1f} traces/s** (burst of {capacity_n:,} snapshots; "
        f"probe of 300: {probe:,.1f}/s; load avg {capacity_load}).",
        "",
    ]
    lines += md_table(
        ["share of max", "offered traces/s", "snapshots", "p50 ms", "p90 ms", "p99 ms", "max ms", "attempt",
         "load avg before -> after"], "rrrrrrrrl",
        [[f"{lv.share:.0%}", f"{lv.rate:,.1f}", f"{lv.sent:,}", f"{lv.pct(50):,.0f}", f"{lv.pct(90):,.0f}",
          f"{lv.pct(99):,.0f}", f"{max(lv.latencies_ms):,.0f}", lv.attempt, lv.load] for lv in levels])
    if halves:
        verdicts = "; ".join(f"attempt {lv.attempt}: {lv.pct(99):,.0f} ms ("
                             f"{'met' if lv.pct(99) <= TARGET_P99_MS else 'MISSED'}, load {lv.load})" for lv in halves)
        lines += ["", f"Target p99 <= {TARGET_P99_MS:,.0f} ms at 50 % of the max rate: {verdicts}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=0, help="snapshots in the throughput burst (0: 25 s worth)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per latency level")
    parser.add_argument("--levels", default="0.25,0.5,0.9")
    parser.add_argument("--timeout", type=float, default=120.0, help="drain timeout per level")
    parser.add_argument("--no-repeat", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    shares = [float(x) for x in args.levels.split(",") if x]
    begun = time.monotonic()
    print(f"load before: {loadavg()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        with local_broker(workdir) as broker:
            settings = StackSettings(bootstrap=broker.bootstrap, workdir=workdir, stages=STAGES, sampling_rate=1.0)
            with Stack(settings).start() as stack:
                panel = Panel(stack.panel_url)
                snaps = Snapshots()
                # warm-up: every stage has joined its group and delivered once
                asyncio.run(produce(broker.bootstrap, snaps.take(20), None))
                panel.wait_for(20, 180)
                probe, _ = burst_rate(panel, broker.bootstrap, snaps, 300, args.timeout)
                n = args.burst or max(300, round(probe * 25))
                capacity, capacity_load = burst_rate(panel, broker.bootstrap, snaps, n, args.timeout * 2)
                print(f"max sustainable: {capacity:,.1f}/s ({n} burst; probe {probe:,.1f}/s)", file=sys.stderr)
                levels: list[Level] = []
                for share in shares:
                    levels.append(run_level(stack, panel, broker.bootstrap, snaps, share, capacity, args.duration,
                                            1, args.timeout))
                    if not args.no_repeat and load_is_high():
                        levels.append(run_level(stack, panel, broker.bootstrap, snaps, share, capacity,
                                                args.duration, 2, args.timeout))
                panel.client.close()
    text = table(capacity, n, capacity_load, probe, levels, args)
    return publish("end_to_end", text, begun)


if __name__ == "__main__":
    sys.exit(main())
